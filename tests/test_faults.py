"""Fault injection (README: Guarantees): real processes are killed, Redis is lost, the web is
restarted mid-load — and no accepted task is lost, none runs twice, every callback arrives."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from dashboard.runtime.processes import DELIVERY_WORKER_CLASS
from tasks.models import CallbackAttempt, Task, TaskLog
from tasks.plumbing.queueing import redis_client
from tests.conftest import api_submit, wait_for, wait_for_exit, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)

ALL_QUEUES = ("tasks", "callbacks", "maintenance")


def counting_runner(inputs, ctx):
    """Leaves one log line per execution, so a test can prove nothing ran twice."""
    ctx.log("executed")
    if inputs.get("seconds"):
        time.sleep(float(inputs["seconds"]))
    return inputs


def post(base_url: str, app, body: dict, key: str | None = None, timeout: float = 15):
    headers = {"Authorization": f"Bearer {app.api_key}", "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    return requests.post(
        f"{base_url}/api/applications/{app.application.id}/generate",
        data=json.dumps(body), headers=headers, timeout=timeout,
    )  # fmt: skip


submit_in_process = api_submit


def kill_worker(worker) -> None:
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()


def test_killed_worker_task_fails_fast_and_its_callback_is_sent(stack, make_app, receiver):
    app = make_app("sleep", retry_schedule=[1])
    doomed = stack.start_worker("doomed", ("tasks",))
    task_id = submit_in_process(app, {"inputs": {"seconds": 60}, "response_mode": "async",
                                      "callback_url": receiver.url})  # fmt: skip
    running = wait_for_status(task_id, ("running",))
    assert running.worker_name == doomed.name
    stack.start_worker("survivor", ("callbacks", "maintenance"))
    stack.start_cron()
    killed_at = time.monotonic()
    kill_worker(doomed)

    task = wait_for_status(task_id, ("failed",), timeout=60)
    detected_after = time.monotonic() - killed_at
    assert "worker lost" in task.error
    assert detected_after < 120  # the promised bound; here: TTL 3 s + reconcile every 2 s
    wait_for(lambda: Task.objects.get(pk=task_id).callback_status == "delivered", timeout=30)
    assert receiver.received[0].json()["status"] == "failed"
    # Workers write their counters about once a second (tasks.telemetry.counters).
    wait_for(lambda: int(redis_client().hget("taskhook:reconciler:corrections", "lost") or 0) >= 1,
             timeout=5)  # fmt: skip


def test_killed_worker_task_is_rerun_when_the_app_allows(stack, make_app):
    app = make_app("tests.test_faults.counting_runner", task_retries=1)
    doomed = stack.start_worker("doomed", ("tasks",))
    task_id = submit_in_process(app, {"inputs": {"seconds": 5}, "response_mode": "async"})
    wait_for(lambda: TaskLog.objects.filter(task_id=task_id, message="executed").exists())
    kill_worker(doomed)
    stack.start_worker("survivor", ALL_QUEUES)
    stack.start_cron()
    task = wait_for(lambda: Task.objects.filter(pk=task_id, run=2, status="succeeded").first(),
                    timeout=60)  # fmt: skip
    assert task.past_runs.get().error.startswith("worker lost")
    assert TaskLog.objects.filter(task_id=task_id, message="executed").count() == 2  # one per run


def test_redis_lost_then_back_empty_nothing_lost_nothing_twice(stack, make_app, receiver):
    app = make_app("tests.test_faults.counting_runner", retry_schedule=[1, 1, 2, 4])
    stack.start_web()
    stack.start_worker("w", ALL_QUEUES)
    stack.start_cron()
    stack.kill_redis()

    ids = []
    for i in range(10):
        response = post(stack.base_url, app, {"inputs": {"i": i}, "response_mode": "async",
                                              "callback_url": receiver.url})  # fmt: skip
        assert response.status_code == 200, response.text  # accepted while Redis is down
        ids.append(response.json()["task_id"])
    assert Task.objects.filter(pk__in=ids, status="pending").count() == 10

    stack.start_redis()  # a fresh, empty Redis: every job and schedule is gone
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        stack.ensure_running()  # a supervisor restarts whatever died with Redis
        if Task.objects.filter(pk__in=ids, callback_status="delivered").count() == 10:
            break
        time.sleep(0.5)
    assert Task.objects.filter(pk__in=ids, status="succeeded").count() == 10
    assert Task.objects.filter(pk__in=ids, callback_status="delivered").count() == 10
    executions = Counter(
        str(t) for t in TaskLog.objects.filter(task_id__in=ids, message="executed")
        .values_list("task_id", flat=True)
    )  # fmt: skip
    assert set(executions.values()) == {1}, executions  # nothing ran twice
    delivered = {r.json()["task_id"] for r in receiver.received}
    assert delivered == set(ids)


def test_receiver_down_then_up_is_delivered_on_a_retry(make_app, live_worker):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = make_app("echo", retry_schedule=[1, 1, 2, 2])
    task_id = submit_in_process(
        app,
        {"inputs": {}, "response_mode": "async", "callback_url": f"http://127.0.0.1:{port}/hook"},
    )
    wait_for(lambda: CallbackAttempt.objects.filter(task_id=task_id).exists())
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        task = wait_for(
            lambda: Task.objects.filter(pk=task_id, callback_status="delivered").first()
        )
    finally:
        server.shutdown()
        server.server_close()
    rows = list(CallbackAttempt.objects.filter(task_id=task_id).order_by("number"))
    assert rows[0].error.startswith("could not connect") and rows[-1].status_code == 204
    assert task.callback_attempts == len(rows) >= 2 and len(received) == 1


def test_500_concurrent_submissions_with_callbacks(stack, make_app, receiver):
    app = make_app("echo", rate_limit_per_second=100000, rate_limit_burst=100000)
    stack.start_web()
    for name in ("w1", "w2"):
        stack.start_worker(name, ("tasks", "callbacks"))

    def submit(i: int):
        body = {"inputs": {"i": i}, "response_mode": "async", "callback_url": receiver.url}
        return post(stack.base_url, app, body, key=f"order-{i % 500}", timeout=60)

    with ThreadPoolExecutor(max_workers=50) as pool:
        # 500 distinct keys, and 100 of them sent twice at the same time.
        responses = list(pool.map(submit, [*range(500), *range(100)]))
    assert all(r.status_code == 200 for r in responses), Counter(r.status_code for r in responses)
    by_key: dict[int, set[str]] = {}
    for i, response in zip([*range(500), *range(100)], responses, strict=True):
        by_key.setdefault(i, set()).add(response.json()["task_id"])
    assert all(len(ids) == 1 for ids in by_key.values())  # same key, same task
    assert Task.objects.filter(application=app.application).count() == 500
    wait_for(lambda: Task.objects.filter(application=app.application,
                                         callback_status="delivered").count() == 500,
             timeout=120, interval=0.5)  # fmt: skip
    assert Task.objects.filter(application=app.application, status="succeeded").count() == 500
    assert len({r.json()["task_id"] for r in receiver.received}) == 500


def test_web_restart_mid_load_loses_no_accepted_task(stack, make_app):
    app = make_app("echo", rate_limit_per_second=100000, rate_limit_burst=100000)
    stack.start_web()
    stack.start_worker("w", ("tasks", "maintenance"))
    # The reconciler enqueues any task whose web process died between commit and enqueue.
    stack.start_cron()
    accepted: dict[str, str] = {}
    lock = threading.Lock()

    def client(worker: int) -> None:
        for n in range(20):
            key = f"client-{worker}-{n}"
            for _ in range(100):  # a real client retries with the same Idempotency-Key
                try:
                    response = post(stack.base_url, app, {"inputs": {"k": key},
                                                          "response_mode": "async"}, key=key,
                                    timeout=10)  # fmt: skip
                except requests.RequestException:
                    time.sleep(0.1)
                    continue
                if response.status_code == 200:
                    with lock:
                        accepted[key] = response.json()["task_id"]
                    break
                time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(accepted) >= 40, timeout=30)
    stack.kill_web()  # the web process dies mid-load ...
    time.sleep(0.5)
    stack.start_web()  # ... and comes back
    for thread in threads:
        thread.join(120)
    assert len(accepted) == 160
    assert Task.objects.filter(application=app.application).count() == 160
    wait_for(lambda: Task.objects.filter(pk__in=accepted.values(), status="succeeded").count()
             == 160, timeout=60, interval=0.5)  # fmt: skip


def _drop_database_connections_of(process_id: int) -> int:
    """Terminate, server side, the PostgreSQL connections the processes under `process_id` hold
    (what a database restart or a proxy's idle timeout does to them)."""
    import psutil
    from django.db import connection

    root = psutil.Process(process_id)
    ports = [
        conn.laddr.port
        for proc in (root, *root.children(recursive=True))
        for conn in proc.net_connections("tcp")
        if conn.raddr and conn.raddr.port == 5432
    ]
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE client_port = ANY(%s)", [ports])  # fmt: skip
        return cursor.fetchone()[0]


@pytest.mark.skipif(os.environ.get("DATABASE_URL", "")[:8] != "postgres",
                    reason="drops PostgreSQL server connections")  # fmt: skip
@pytest.mark.parametrize("idle_seconds", ["3600", "0"])
def test_dropped_database_connection_costs_one_503_at_most(stack, make_app, idle_seconds):
    """A connection in steady use is trusted without a ping (HEALTH_CHECK_IDLE_SECONDS): when
    the server dropped it, that one request answers 503 and the next reconnects. A connection
    idle longer than that is checked first, so even that request succeeds."""
    app = make_app("echo")
    stack.start_web(workers=1, GUNICORN_THREADS="1", HEALTH_CHECK_IDLE_SECONDS=idle_seconds)
    body = {"inputs": {}, "response_mode": "async"}
    assert post(stack.base_url, app, body).status_code == 200
    assert _drop_database_connections_of(stack.web.pid) >= 1

    first = post(stack.base_url, app, body)
    if idle_seconds == "0":
        assert first.status_code == 200
    else:
        assert first.status_code == 503
        assert first.json()["error"]["code"] == "unavailable"
        assert first.headers["Retry-After"] == "1"
    assert post(stack.base_url, app, body).status_code == 200
    expected = 3 if idle_seconds == "0" else 2  # the 503 accepted nothing
    assert Task.objects.filter(application=app.application).count() == expected


@pytest.mark.skipif(os.environ.get("DATABASE_URL", "")[:8] != "postgres",
                    reason="drops PostgreSQL server connections")  # fmt: skip
def test_worker_reconnects_after_its_database_connection_dropped(stack, make_app):
    """A database restart (or a proxy's idle timeout) under a running worker costs no task: the
    worker notices the dead connection before its next job and opens a new one."""
    app = make_app("echo")
    worker = stack.start_worker("w", ("tasks",))
    first = submit_in_process(app, {"inputs": {"n": 1}, "response_mode": "async"})
    wait_for_status(first, ("succeeded",), timeout=20)
    assert _drop_database_connections_of(worker.process.pid) >= 1
    later = [submit_in_process(app, {"inputs": {"n": n}, "response_mode": "async"})
             for n in range(2, 5)]  # fmt: skip
    for task_id in later:
        assert wait_for_status(task_id, ("succeeded", "failed"), timeout=20).status == "succeeded"


def test_reconciler_reruns_a_pending_task_whose_job_failed(stack, make_app):
    """A job that failed before its task started (the worker could not reach the database, every
    retry spent) leaves the task pending with a failed job in Redis: the reconciler runs it
    again."""
    from datetime import timedelta

    from rq.job import Job, JobStatus

    from tasks.plumbing.queueing import queue
    from tasks.upkeep.reconciler import reconcile

    app = make_app("echo")
    task_id = submit_in_process(app, {"inputs": {"n": 1}, "response_mode": "async"})
    task = Task.objects.get(pk=task_id)
    job = Job.fetch(task.rq_job_id, connection=redis_client())
    # What a worker's failure handling leaves behind, through RQ's own API.
    with redis_client().pipeline() as pipeline:
        queue("tasks").remove(job, pipeline=pipeline)
        job.set_status(JobStatus.FAILED, pipeline=pipeline)
        queue("tasks").failed_job_registry.add(job, ttl=3600, exc_string="OperationalError",
                                               pipeline=pipeline)  # fmt: skip
        pipeline.execute()
    Task.objects.filter(pk=task_id).update(
        created_at=task.created_at - timedelta(minutes=1),
        queued_at=task.created_at - timedelta(minutes=1),
    )

    report = reconcile()
    assert report.requeued == [task_id]
    assert Job.fetch(task.rq_job_id, connection=redis_client()).get_status() == JobStatus.QUEUED
    stack.start_worker("w", ("tasks",))
    assert wait_for_status(task_id, ("succeeded", "failed"), timeout=20).status == "succeeded"
    assert reconcile().requeued == []  # nothing left to correct


class InFlightReceiver:
    """A receiver that answers after `delay` seconds and records how many requests it held at
    once, and every delivery's webhook-id."""

    def __init__(self, delay: float) -> None:
        self.delay, self.in_flight, self.peak = delay, 0, 0
        self.ids: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.in_flight += 1
                    receiver.peak = max(receiver.peak, receiver.in_flight)
                time.sleep(receiver.delay)
                with receiver.lock:
                    receiver.in_flight -= 1
                    receiver.ids.append(self.headers["webhook-id"])
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rq_worker_state(name: str) -> str | None:
    from rq.worker import Worker

    worker = Worker.find_by_key(f"{Worker.redis_worker_namespace_prefix}{name}",
                                connection=redis_client())  # fmt: skip
    return worker.get_state() if worker else None


def deliveries_in_flight(stack, make_app, receiver, *, concurrency: int, tasks: int):
    """A task worker and a delivery worker running `concurrency` deliveries at once; `tasks`
    tasks with a callback to `receiver` submitted, and returns once the worker's threads are all
    waiting on the receiver. Returns the delivery worker and the task ids."""
    app = make_app("echo")
    stack.start_worker("tasks", ("tasks",))
    worker = stack.start_worker("deliveries", ("callbacks",), DELIVERY_WORKER_CLASS,
                                CALLBACK_CONCURRENCY=str(concurrency))  # fmt: skip
    body = {"inputs": {}, "response_mode": "async", "callback_url": receiver.url}
    ids = [submit_in_process(app, body) for _ in range(tasks)]
    wait_for(lambda: receiver.in_flight == concurrency, timeout=30)
    return worker, ids


def test_delivery_worker_delivers_to_a_slow_receiver_concurrently(stack, make_app):
    """One delivery worker process holds up to CALLBACK_CONCURRENCY requests to a slow receiver at
    once, and still delivers each callback exactly once, recorded."""
    receiver = InFlightReceiver(delay=0.5)
    try:
        worker, ids = deliveries_in_flight(stack, make_app, receiver, concurrency=4, tasks=12)
        assert rq_worker_state(worker.name) == "busy"
        wait_for(lambda: Task.objects.filter(pk__in=ids, callback_status="delivered").count()
                 == 12, timeout=60)  # fmt: skip
        assert receiver.peak == 4  # never more than the configured concurrency
        # Idle once the last delivery in flight has ended (the dashboard's worker list shows it).
        wait_for(lambda: rq_worker_state(worker.name) == "idle", timeout=10)
        assert sorted(receiver.ids) == sorted(
            f"msg_{task_id.replace('-', '')}_1" for task_id in ids
        )
        assert CallbackAttempt.objects.filter(task_id__in=ids, delivered=True).count() == 12
    finally:
        receiver.close()


def test_delivery_worker_finishes_deliveries_in_flight_on_sigterm(stack, make_app):
    """Warm shutdown: a SIGTERM while deliveries are in flight lets them finish and be recorded;
    the worker takes no new job and exits cleanly."""
    receiver = InFlightReceiver(delay=1.5)
    try:
        worker, ids = deliveries_in_flight(stack, make_app, receiver, concurrency=3, tasks=5)
        worker.process.send_signal(signal.SIGTERM)
        # Past STOP_REPORT_SECONDS the worker logs every thread's stack: shown on a failure.
        assert wait_for_exit(worker.process, 30) == 0, worker.output()[-6000:]
        delivered = Task.objects.filter(pk__in=ids, callback_status="delivered")
        assert delivered.count() == 3  # the three in flight, recorded before the exit
        assert CallbackAttempt.objects.filter(task_id__in=ids).count() == 3
        # The other two wait on the queue for the next worker.
        stack.start_worker("deliveries-2", ("callbacks",), DELIVERY_WORKER_CLASS)
        wait_for(lambda: Task.objects.filter(pk__in=ids, callback_status="delivered").count()
                 == 5, timeout=30)  # fmt: skip
        assert len(receiver.ids) == len(set(receiver.ids)) == 5
    finally:
        receiver.close()


def test_rate_limit_over_http(stack, make_app):
    stack.start_web()
    app = make_app("echo", rate_limit_per_second=5, rate_limit_burst=5)
    body = {"inputs": {}, "response_mode": "async"}
    burst = [post(stack.base_url, app, body) for _ in range(8)]
    codes = [r.status_code for r in burst]
    assert codes[:5] == [200] * 5 and 429 in codes[5:]
    limited = next(r for r in burst if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    time.sleep(1.2)
    steady = []
    for _ in range(5):  # 4 requests/s, under the 5/s refill: never limited
        steady.append(post(stack.base_url, app, body).status_code)
        time.sleep(0.25)
    assert steady == [200] * 5


def test_per_application_concurrency_cap(stack, make_app):
    app = make_app("sleep", max_concurrency=1)
    for name in ("w1", "w2", "w3"):
        stack.start_worker(name, ("tasks",))
    ids = [submit_in_process(app, {"inputs": {"seconds": 0.8}, "response_mode": "async"})
           for _ in range(4)]  # fmt: skip
    peak = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = Task.objects.filter(pk__in=ids, status="running").count()
        peak = max(peak, running)
        if Task.objects.filter(pk__in=ids, status="succeeded").count() == 4:
            break
        time.sleep(0.05)
    assert Task.objects.filter(pk__in=ids, status="succeeded").count() == 4
    assert peak == 1  # three idle workers, yet never two of this app's tasks at once


def test_runaway_task_is_stopped_by_its_job_timeout(make_app, live_worker, receiver):
    app = make_app("sleep", job_timeout_seconds=2, retry_schedule=[])
    task_id = submit_in_process(app, {"inputs": {"seconds": 30}, "response_mode": "async",
                                      "callback_url": receiver.url})  # fmt: skip
    task = wait_for_status(task_id, ("failed",), timeout=20)
    assert task.error == "timed out after 2 s"
    assert (task.finished_at - task.started_at).total_seconds() < 5
    wait_for(lambda: Task.objects.get(pk=task_id).callback_status == "delivered")
    assert receiver.received[0].json()["error"] == "timed out after 2 s"
