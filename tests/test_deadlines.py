"""Deadlines (tasks.execution.deadlines): a client's `Cancel-After` / `deadline_seconds` and an
application's `max_queue_seconds`, through the API, the worker (in process and real RQ workers,
forking and not), the sweep and the real cron process, with the callback each failed run gets."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone
from rq.job import Job
from standardwebhooks import Webhook

from dashboard.runtime.embedded_redis import EmbeddedRedis
from dashboard.runtime.processes import DELIVERY_WORKER_CLASS, cron_argv, task_lanes
from tasks.api.events import finished_state
from tasks.events.stream import decode, stream_key
from tasks.execution import deadlines
from tasks.execution.executor import execute_task
from tasks.models import Task, TaskRunHistory
from tasks.plumbing.queueing import queue, redis_client, task_job_id
from tasks.submission import SubmitRequest
from tests.conftest import Client, WorkerProcess, subprocess_env, wait_for, wait_for_status

CODE = "deadline_exceeded"
GATE = "test-deadlines-gate:"


# --- runners the tests use (imported by the workers by their dotted paths) ---------------------


def gated(inputs, ctx):
    """Holds its worker until the test opens the gate (a Redis key); never calls ctx."""
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=90)
    if client.blpop([GATE + inputs["gate"]], timeout=60) is None:
        raise RuntimeError("the test never opened the gate")
    return {"opened": True}


def sleeps_quietly(inputs, ctx):
    """A runner that never calls ctx: only a killed work horse stops it early."""
    time.sleep(float(inputs.get("seconds", 60)))
    return {"slept": True}


def reports_until_stopped(inputs, ctx):
    for step in range(1000):
        ctx.progress(step % 100)
        time.sleep(0.01)
    raise RuntimeError("never stopped")


def returns_late(inputs, ctx):
    """Waits out its deadline without a ctx call, then returns (or raises)."""
    while timezone.now() < ctx.deadline_at:
        time.sleep(0.01)
    if inputs.get("raise"):
        raise RuntimeError("the runner failed after its deadline")
    return {"late": True}


# --- helpers -----------------------------------------------------------------------------------


def submit(app, body: dict, **headers: str):
    extra = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()}
    return Client().post(
        f"/api/applications/{app.application.id}/generate",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
        **extra,
    )


def submitted(app, body: dict, **headers: str) -> Task:
    response = submit(app, {"response_mode": "async", **body}, **headers)
    assert response.status_code == 200, response.content
    return Task.objects.get(pk=response.json()["task_id"])


def poll(app, task_id) -> dict:
    response = Client().get(f"/api/tasks/{task_id}", HTTP_AUTHORIZATION=f"Bearer {app.api_key}")
    assert response.status_code == 200
    return response.json()


def events_of(task_id) -> list[str]:
    return [decode(entry).event for entry in redis_client().xrange(stream_key(task_id))]


def pending_task(app, **fields) -> Task:
    return Task.objects.create(application=app.application, **{"inputs": {"q": 1}, **fields})


def ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


def verified(app, received) -> dict:
    """The callback body, after checking both of its signatures."""
    expected = hmac.new(app.webhook_secret.encode(), received.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(received.headers["X-Dify-Signature-V1"], expected)
    headers = {name.lower(): value for name, value in received.headers.items()}
    return Webhook(app.webhook_secret).verify(received.body, headers)


@contextlib.contextmanager
def blocking_the_worker(make_app) -> Iterator[Task]:
    """A task that holds the (one) task worker until the block ends."""
    gate = uuid.uuid4().hex
    blocker = submitted(make_app("tests.test_deadlines.gated"), {"inputs": {"gate": gate}})
    try:
        started = wait_for_status(blocker.id, ("running", "failed", "succeeded"))
        assert started.status == "running", started.error
        yield blocker
    finally:
        client = redis_client()
        client.rpush(GATE + gate, "1")
        client.expire(GATE + gate, 120)
    wait_for_status(blocker.id, ("succeeded",))


# --- the submit ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_cancel_after_and_deadline_seconds_set_the_deadline_the_sooner_winning(make_app):
    app = make_app("echo")

    def bound(body: dict, **headers: str) -> float | None:
        task = submitted(app, {"inputs": {}, **body}, **headers)
        return (task.deadline_at - task.created_at).total_seconds() if task.deadline_at else None

    assert bound({}, **{"Cancel-After": "2m"}) == 120
    assert bound({"deadline_seconds": 45}) == 45
    assert bound({"deadline_seconds": 0.5}) == 0.5
    assert bound({"deadline_seconds": 45}, **{"Cancel-After": "10s"}) == 10
    assert bound({"deadline_seconds": 4}, **{"Cancel-After": "1h"}) == 4
    assert bound({}) is None
    assert bound({"deadline_seconds": None}, **{"Cancel-After": ""}) is None
    assert Task.objects.filter(start_by__isnull=False).count() == 0  # the app sets no bound


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("headers", "body", "field"),
    [
        ({"Cancel-After": "0"}, {}, "Cancel-After"),
        ({"Cancel-After": "soon"}, {}, "Cancel-After"),
        ({"Cancel-After": "8d"}, {}, "Cancel-After"),
        ({"Cancel-After": "169h"}, {}, "Cancel-After"),
        ({"Cancel-After": "-1"}, {}, "Cancel-After"),
        ({}, {"deadline_seconds": 0}, "deadline_seconds"),
        ({}, {"deadline_seconds": -3}, "deadline_seconds"),
        ({}, {"deadline_seconds": "30"}, "deadline_seconds"),
        ({}, {"deadline_seconds": True}, "deadline_seconds"),
        ({}, {"deadline_seconds": 604801}, "deadline_seconds"),
        ({"Cancel-After": "30"}, {"deadline_seconds": [30]}, "deadline_seconds"),
        ({"Cancel-After": "30x"}, {"deadline_seconds": 30}, "Cancel-After"),
    ],
)
def test_a_bad_deadline_is_400_and_stores_nothing(make_app, headers, body, field):
    app = make_app("echo")
    response = submit(app, {"inputs": {}, "response_mode": "async", **body}, **headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_request", field)
    assert field in error["message"]
    assert Task.objects.count() == 0


@pytest.mark.django_db
def test_the_deadline_is_part_of_what_an_idempotency_key_repeats(make_app):
    app = make_app("echo")
    body = {"inputs": {"a": 1}, "response_mode": "async", "deadline_seconds": 30}
    first = submit(app, body, **{"Idempotency-Key": "k-1"}).json()["task_id"]
    again = submit(app, body, **{"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json()["task_id"] == first
    # The same bound as a header is the same request; another bound is not.
    same = submit(app, {**body, "deadline_seconds": None}, **{"Idempotency-Key": "k-1",
                                                              "Cancel-After": "30s"})  # fmt: skip
    assert same.status_code == 200 and same.json()["task_id"] == first
    other = submit(app, {**body, "deadline_seconds": 31}, **{"Idempotency-Key": "k-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert Task.objects.count() == 1
    # A request without a deadline hashes as before deadlines existed.
    request = SubmitRequest(inputs={"a": 1}, response_mode="async", user="", callback_url="")
    canonical = json.dumps({"inputs": {"a": 1}, "response_mode": "async", "user": "",
                            "callback_url": ""}, sort_keys=True, separators=(",", ":"))  # fmt: skip
    assert request.request_hash == hashlib.sha256(canonical.encode()).hexdigest()


# --- the worker, in process ---------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("bound", "error"),
    [("deadline_at", deadlines.CLIENT_BOUND_PENDING),
     ("start_by", deadlines.QUEUE_BOUND.format("9"))],
)  # fmt: skip
def test_a_run_past_its_bound_is_failed_by_the_worker_and_never_starts(
    make_app, private_queues, receiver, bound, error
):
    app = make_app("echo")
    task = pending_task(app, queued_at=ago(10), callback_url=receiver.url, **{bound: ago(1)})
    assert execute_task(task_id=str(task.id), run=1, worker_name="inline") == "failed"
    task.refresh_from_db()
    assert (task.status, task.error_code, task.error) == ("failed", CODE, error)
    assert task.started_at is None and task.output is None and task.worker_name == ""
    assert task.callback_status == "pending"  # and its first attempt is queued:
    (job_id,) = queue(settings.CALLBACK_QUEUE).get_job_ids()
    assert Job.fetch(job_id, connection=redis_client()).args[:2] == (str(task.id), 1)
    assert events_of(task.id) == ["task.finished"]
    # The job again (RQ's infrastructure retry, a duplicate): nothing more happens.
    assert execute_task(task_id=str(task.id), run=1, worker_name="inline") == "not-started"
    assert events_of(task.id) == ["task.finished"]


@pytest.mark.django_db
def test_a_cooperative_runner_is_stopped_at_its_deadline(make_app):
    app = make_app("tests.test_deadlines.reports_until_stopped")
    task = pending_task(app, deadline_at=timezone.now() + timedelta(seconds=0.3))
    assert execute_task(task_id=str(task.id), run=1, worker_name="inline") == "failed"
    task.refresh_from_db()
    assert (task.status, task.error_code) == ("failed", CODE)
    assert task.error == deadlines.CLIENT_BOUND_RUNNING and task.started_at is not None
    # Stopped at a ctx call (not at the end of the run, which would also end it so).
    assert "reports_until_stopped" in task.traceback and "never stopped" not in task.traceback
    assert task.finished_at >= task.deadline_at
    assert events_of(task.id)[0] == "task.started" and events_of(task.id)[-1] == "task.finished"


@pytest.mark.django_db
@pytest.mark.parametrize("raises", [False, True])
def test_a_run_that_ends_after_its_deadline_ends_with_the_deadline(make_app, raises):
    app = make_app("tests.test_deadlines.returns_late")
    task = pending_task(app, inputs={"raise": raises},
                        deadline_at=timezone.now() + timedelta(seconds=0.2))  # fmt: skip
    assert execute_task(task_id=str(task.id), run=1, worker_name="inline") == "failed"
    task.refresh_from_db()
    assert (task.status, task.error_code, task.output) == ("failed", CODE, None)
    assert task.error == deadlines.CLIENT_BOUND_RUNNING


@pytest.mark.django_db
def test_a_task_that_meets_its_deadline_succeeds_with_a_null_error_code(make_app):
    app = make_app("echo", max_queue_seconds=60)
    task = submitted(app, {"inputs": {"q": 1}}, **{"Cancel-After": "1m"})
    assert task.start_by is not None and task.deadline_at is not None
    assert execute_task(task_id=str(task.id), run=1, worker_name="inline") == "succeeded"
    body = poll(app, task.id)
    assert (body["status"], body["error"], body["error_code"]) == ("succeeded", None, None)
    keys = list(body)
    assert keys[keys.index("error") + 1] == "error_code"


# --- the sweep ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_sweep_fails_every_run_past_a_bound_and_nothing_else(make_app, private_queues):
    app = make_app("echo")
    waited = pending_task(app, queued_at=ago(10), start_by=ago(1))
    late = pending_task(app, deadline_at=ago(1))
    both = pending_task(app, queued_at=ago(10), start_by=ago(1), deadline_at=ago(2))
    running = pending_task(app, status="running", started_at=ago(5), deadline_at=ago(1),
                           worker_name="w")  # fmt: skip
    untouched = [
        pending_task(app, queued_at=ago(10), start_by=timezone.now() + timedelta(minutes=1)),
        pending_task(app, status="running", start_by=ago(1)),  # start_by bounds the wait only
        pending_task(app, status="running", deadline_at=timezone.now() + timedelta(minutes=1)),
        pending_task(app, status="succeeded", deadline_at=ago(1), finished_at=ago(2)),
        pending_task(app, status="cancelled", start_by=ago(1), finished_at=ago(2)),
    ]
    assert deadlines.sweep(batch=1).expired == 2  # at most one of each bound per pass
    assert deadlines.sweep().expired == 2 and deadlines.sweep().expired == 0
    errors = {
        waited.id: deadlines.QUEUE_BOUND.format("9"),
        late.id: deadlines.CLIENT_BOUND_PENDING,
        both.id: deadlines.CLIENT_BOUND_PENDING,  # the bound that passed first
        running.id: deadlines.CLIENT_BOUND_RUNNING,
    }
    for task_id, error in errors.items():
        task = Task.objects.get(pk=task_id)
        assert (task.status, task.error_code, task.error) == ("failed", CODE, error)
        assert task.finished_at is not None and events_of(task_id) == ["task.finished"]
    for task in untouched:
        after = Task.objects.get(pk=task.id)
        assert (after.status, after.error_code) == (task.status, None)


@pytest.mark.django_db(transaction=True)  # finished_state drops a connection inside a transaction
def test_a_past_runs_finished_event_carries_its_error_code(make_app):
    app = make_app("echo")
    task = pending_task(app, run=2)
    TaskRunHistory.objects.create(task=task, run=1, status="failed", error="late",
                                  error_code=CODE, finished_at=ago(1))  # fmt: skip
    body, current = finished_state(task.id, 1)
    assert current == 2 and body is not None
    assert (body["error"], body["error_code"]) == ("late", CODE)
    keys = list(body)
    assert keys[keys.index("error") + 1] == "error_code"


# --- real workers -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_task_behind_a_busy_worker_fails_on_time_and_its_callback_arrives_signed(
    make_app, live_worker, receiver
):
    """The deployment's own processes: the cron process enqueues the sweep, the callbacks
    worker runs it and delivers; the task worker is busy the whole time."""
    cron = subprocess.Popen(
        cron_argv(), env=subprocess_env(RECONCILE_INTERVAL="3600", CLEANUP_INTERVAL="3600"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    callbacks = WorkerProcess(
        (settings.CALLBACK_QUEUE, settings.MAINTENANCE_QUEUE),
        name="deadline-callbacks",
        worker_class=DELIVERY_WORKER_CLASS,
    )
    app = make_app("echo")
    try:
        with blocking_the_worker(make_app) as blocker:
            task = submitted(app, {"inputs": {"q": 1}, "deadline_seconds": 1,
                                   "callback_url": receiver.url})  # fmt: skip
            failed = wait_for_status(task.id, ("failed",), timeout=60)
            assert Task.objects.get(pk=blocker.id).status == "running"  # failed on time
            assert (failed.error_code, failed.error) == (CODE, deadlines.CLIENT_BOUND_PENDING)
            assert failed.started_at is None
            wait_for(lambda: receiver.received, timeout=30)
        payload = verified(app, receiver.received[0])
        assert (payload["status"], payload["error_code"]) == ("failed", CODE)
        assert payload["error"] == deadlines.CLIENT_BOUND_PENDING
        keys = list(json.loads(receiver.received[0].body))
        assert keys[keys.index("error") + 1] == "error_code"
        assert poll(app, task.id)["error_code"] == CODE
        # The worker that reaches the run's job skips it: one callback, one finish.
        wait_for(lambda: not queue(settings.TASK_QUEUE).get_job_ids(), timeout=30)
        assert len(receiver.received) == 1 and events_of(task.id).count("task.finished") == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cron.pid, signal.SIGTERM)
        cron.wait(15)
        callbacks.stop()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("bound", ["deadline_seconds", "max_queue_seconds"])
def test_a_worker_that_reaches_a_run_past_its_bound_fails_it_without_running_it(
    make_app, live_worker, receiver, bound
):
    app = make_app("echo", **({"max_queue_seconds": 1} if bound == "max_queue_seconds" else {}))
    body = {"inputs": {"q": 1}, "callback_url": receiver.url}
    with blocking_the_worker(make_app):
        task = submitted(app, body | ({"deadline_seconds": 1} if bound == "deadline_seconds"
                                      else {}))  # fmt: skip
        limit = task.deadline_at or task.start_by
        assert limit is not None
        wait_for(lambda: timezone.now() > limit, timeout=10)
    failed = wait_for_status(task.id, ("failed",))
    expected = (
        deadlines.CLIENT_BOUND_PENDING
        if bound == "deadline_seconds"
        else deadlines.QUEUE_BOUND.format("1")
    )
    assert (failed.error_code, failed.error) == (CODE, expected)
    assert failed.started_at is None and failed.output is None
    wait_for(lambda: receiver.received, timeout=30)
    payload = verified(app, receiver.received[0])
    assert (payload["error_code"], payload["error"]) == (CODE, expected)


@pytest.mark.django_db(transaction=True)
def test_a_running_sleep_task_past_its_deadline_is_stopped_and_fails(
    make_app, live_worker, receiver
):
    app = make_app("sleep")
    # Long enough for the run to start first, even on a loaded machine.
    task = submitted(app, {"inputs": {"seconds": 30}, "callback_url": receiver.url},
                     **{"Cancel-After": "3s"})  # fmt: skip
    wait_for_status(task.id, ("running",))
    failed = wait_for_status(task.id, ("failed",), timeout=20)  # long before its 30 s
    assert (failed.error_code, failed.error) == (CODE, deadlines.CLIENT_BOUND_RUNNING)
    assert failed.started_at is not None and failed.output is None
    wait_for(lambda: "task stopped: deadline exceeded" in live_worker.output(), timeout=5)
    wait_for(lambda: receiver.received, timeout=30)
    assert verified(app, receiver.received[0])["error_code"] == CODE


@pytest.mark.django_db(transaction=True)
def test_a_task_that_meets_its_deadline_succeeds_on_a_real_worker(make_app, live_worker):
    app = make_app("sleep")
    task = submitted(app, {"inputs": {"seconds": 0.2}, "deadline_seconds": 60})
    done = wait_for_status(task.id, ("succeeded", "failed"))
    assert (done.status, done.error_code) == ("succeeded", None)
    assert poll(app, task.id)["error_code"] is None


@pytest.fixture
def own_redis(tmp_path, settings) -> Iterator[str]:
    """A Redis of this test's own, for this process and the workers it starts: the session's
    worker listens on the task lanes of the suite's Redis and must not take these runs."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    server.start()
    settings.REDIS_URL = server.url
    redis_client.cache_clear()
    try:
        yield server.url
    finally:
        redis_client.cache_clear()  # the suite's Redis again, once `settings` is restored
        server.stop()


@pytest.mark.django_db(transaction=True)
def test_a_forking_workers_horse_is_killed_at_the_deadline(make_app, own_redis):
    """A runner that never calls ctx, on a forking worker: the sweep fails the task and sends
    RQ's stop-job command, and the worker is free again long before the runner would be."""
    worker = WorkerProcess(
        task_lanes(settings.TASK_QUEUE),
        name="deadline-fork",
        env=subprocess_env(REDIS_URL=own_redis),
        worker_class="tasks.execution.worker.TaskhookForkingWorker",
    )
    try:
        echo = make_app("echo")
        warm = submitted(echo, {"inputs": {"n": 0}})  # the worker is up and taking jobs
        assert wait_for_status(warm.id, ("succeeded",), timeout=30)
        app = make_app("tests.test_deadlines.sleeps_quietly")
        # Long enough for the run to start first, even on a loaded machine.
        task = submitted(app, {"inputs": {"seconds": 60}, "deadline_seconds": 3})
        wait_for_status(task.id, ("running",))
        assert task.deadline_at is not None
        wait_for(lambda: timezone.now() > task.deadline_at, timeout=10)
        assert deadlines.sweep().expired_running == [str(task.id)]
        job = Job.fetch(task_job_id(task.id, 1), connection=redis_client())
        wait_for(lambda: job.get_status(refresh=True) == "stopped", timeout=20)
        failed = Task.objects.get(pk=task.id)
        assert (failed.status, failed.error_code) == ("failed", CODE)
        assert failed.error == deadlines.CLIENT_BOUND_RUNNING
        # The horse is gone: the next run starts now, not after the 60 s sleep.
        quick = submitted(echo, {"inputs": {"n": 1}})
        assert wait_for_status(quick.id, ("succeeded",), timeout=20)
    finally:
        worker.stop()
