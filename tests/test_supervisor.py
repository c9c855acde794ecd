"""`make run` is a supervisor, and its processes ride out a Redis outage: the real `make run`
(tests.makerun) is killed piece by piece, and its Redis is taken away, while tasks with
callbacks go through it; a worker whose registration Redis lost puts it back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from dashboard.runtime.embedded_redis import is_reachable
from tasks.execution.worker import KNOWN_WORKERS_KEY, alive_key
from tasks.models import Task
from tasks.plumbing.queueing import redis_client
from tasks.upkeep.reconciler import reconcile
from tests.conftest import Receiver, api_submit, wait_for, wait_for_status
from tests.makerun import MakeRun, free_port
from tests.stack import Stack

pytestmark = pytest.mark.timeout(170)

RUN_ENV = {
    "DEBUG": "true",
    "CALLBACK_ALLOW_PRIVATE_NETWORKS": "true",
    "RECONCILE_INTERVAL": "2",  # tasks accepted while Redis was away are enqueued soon after
    "WEB_CONCURRENCY": "2",
}
CHILD_KINDS = ("task-worker-1", "callback-worker-1", "cron", "web")


class RedisServer:
    """/usr/bin/redis-server on a free port, persisting to an append-only file in `data_dir`,
    so that a kill and a start on the same port and directory is a Redis restart."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["/usr/bin/redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "",
             "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: is_reachable(self.url), timeout=10)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def external_redis(tmp_path):
    server = RedisServer(tmp_path / "redis-data")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def make_run(tmp_path):
    runs: list[MakeRun] = []

    def start(**env: str) -> MakeRun:
        run = MakeRun(tmp_path, RUN_ENV | env)
        runs.append(run)
        run.start()
        run.wait_ready()
        return run

    yield start
    for run in runs:
        run.stop()


class Client:
    """The API of a `make run`, for one application created with its own manage.py; its tasks
    call `receiver` back when there is one."""

    def __init__(self, run: MakeRun, receiver: Receiver | None, runner: str = "echo") -> None:
        created = run.manage("createapplication", runner, "--runner", runner, "--json")
        assert created.returncode == 0, created.stderr
        app = json.loads(created.stdout)
        self.run = run
        self.receiver = receiver
        self.app_id = app["app_id"]
        self.headers = {"Authorization": f"Bearer {app['api_key']}"}

    def submit(self, n: int = 3, inputs: dict | None = None, timeout: float = 30) -> list[str]:
        """n async tasks; retried while the web server is down (restarting)."""
        ids = []
        for i in range(n):
            body = {"inputs": inputs or {"i": i}, "response_mode": "async"}
            if self.receiver:
                body["callback_url"] = self.receiver.url
            response = wait_for(lambda body=body: self._post(body), timeout=timeout, interval=0.2)
            ids.append(response.json()["task_id"])
        return ids

    def _post(self, body: dict) -> requests.Response | None:
        try:
            response = requests.post(
                f"{self.run.base_url}/api/applications/{self.app_id}/generate",
                json=body, headers=self.headers, timeout=10,
            )  # fmt: skip
        except requests.RequestException:
            return None
        assert response.status_code not in range(400, 500), response.text  # never refused
        return response if response.status_code == 200 else None

    def statuses(self, ids: list[str]) -> set[str]:
        """Each task's status, and `delivered` or not for its callback ("?" if unreadable)."""
        found = set()
        for task_id in ids:
            try:
                body = requests.get(f"{self.run.base_url}/api/tasks/{task_id}",
                                    headers=self.headers, timeout=5).json()  # fmt: skip
            except (requests.RequestException, ValueError):
                return {"?"}
            found.add(body["status"])
            if self.receiver and body["callback"]["status"] != "delivered":
                found.add("undelivered")
        return found

    def finished(self, ids: list[str]) -> bool:
        if self.statuses(ids) != {"succeeded"}:
            return False
        return not self.receiver or set(ids) <= {
            r.json()["task_id"] for r in self.receiver.received
        }

    def wait_finished(self, ids: list[str], timeout: float = 45) -> None:
        try:
            wait_for(lambda: self.finished(ids), timeout=timeout, interval=0.3)
        except AssertionError:
            raise AssertionError(f"tasks unfinished:\n{self.run.log()[-5000:]}") from None


def restarted(run: MakeRun, name: str, before: psutil.Process) -> psutil.Process | None:
    after = run.children().get(name)
    if after is None or after.pid == before.pid or not after.is_running():
        return None
    return after


def alive_children(run: MakeRun) -> dict[str, int]:
    return {name: p.pid for name, p in run.children().items() if p.is_running()}


@pytest.mark.parametrize("redis_mode", ["embedded", "external"])
def test_make_run_restarts_every_child_that_dies(request, receiver, redis_mode):
    env = {}
    if redis_mode == "external":
        env["REDIS_URL"] = request.getfixturevalue("external_redis").url
    run = request.getfixturevalue("make_run")(**env)  # stopped before its Redis
    client = Client(run, receiver)
    client.wait_finished(client.submit())
    kinds = (*CHILD_KINDS, "redis") if redis_mode == "embedded" else CHILD_KINDS
    assert set(kinds) <= set(run.children()), run.children()

    for name in kinds:
        before = run.children()[name]
        os.kill(before.pid, signal.SIGKILL)
        exited = f"{name} exited with code -9; restarting in 1 s."
        wait_for(lambda exited=exited: exited in run.log(), timeout=5)
        # Submitted once the child is reaped: Redis hands a job pushed in the milliseconds
        # before it closes a killed worker's socket to that BLPOP, and the reconciler leaves a
        # pending task whose job says `queued` alone.
        meanwhile = client.submit()
        after = wait_for(lambda name=name, before=before: restarted(run, name, before),
                         timeout=15, interval=0.1)  # fmt: skip
        # Logged once the new process is up (the embedded Redis: once it answers).
        wait_for(lambda line=f"{name} restarted (pid {after.pid}).": line in run.log(), timeout=15)
        client.wait_finished(meanwhile)
        run.wait_ready(timeout=30)  # the stack serves again, Redis and all

    assert set(kinds) <= set(alive_children(run))  # none gave up


def test_workers_and_cron_ride_out_a_redis_outage(external_redis, make_run, receiver):
    run = make_run(REDIS_URL=external_redis.url)
    client = Client(run, receiver)
    before_ids = client.submit()
    client.wait_finished(before_ids)
    pids = alive_children(run)
    assert set(CHILD_KINDS) <= set(pids)
    # Both task workers are in a job when Redis goes, and its bookkeeping fails at the end.
    slow = Client(run, None, runner="sleep")
    running = slow.submit(2, inputs={"seconds": 4})
    wait_for(lambda: slow.statuses(running) == {"running"}, timeout=15, interval=0.2)

    external_redis.kill()
    during_ids: list[str] = []
    down_until = time.monotonic() + 10
    while time.monotonic() < down_until:
        assert requests.get(f"{run.base_url}/healthz", timeout=5).status_code == 200
        during_ids += client.submit(1, timeout=5)  # committed; the reconciler enqueues it later
        time.sleep(1)
    assert requests.get(f"{run.base_url}/readyz", timeout=5).status_code == 503
    external_redis.start()  # the same port and data
    after_ids = client.submit()

    client.wait_finished(before_ids + during_ids + after_ids, timeout=60)
    slow.wait_finished(running, timeout=5)
    assert len(during_ids) >= 5
    # Nothing exited, not even to be restarted: the processes waited for Redis themselves.
    assert alive_children(run) == pids, run.log()[-5000:]
    assert "exited with code" not in run.log()
    assert "Redis unavailable" in run.log() and "Redis is back" in run.log()


@pytest.mark.django_db(transaction=True)
def test_worker_registers_again_after_flushall_and_keeps_its_task(tmp_path, settings, make_app):
    stack = Stack(tmp_path, WORKER_ALIVE_TTL="3")
    stack.start_redis()
    settings.REDIS_URL = stack.redis_url
    redis_client.cache_clear()
    try:
        app = make_app("sleep")
        worker = stack.start_worker("flushed", ("tasks",))
        task_id = api_submit(app, {"inputs": {"seconds": 12}, "response_mode": "async"})
        task = wait_for_status(task_id, ("running",))
        assert task.worker_name == worker.name
        client = redis_client()
        client.flushall()

        def registered() -> bool:
            rq_key = f"rq:worker:{worker.name}"
            return bool(client.sismember(KNOWN_WORKERS_KEY, worker.name)
                        and client.exists(alive_key(worker.name), rq_key) == 2
                        and client.sismember("rq:workers", rq_key))  # fmt: skip

        wait_for(registered, timeout=5, interval=0.1)  # within a beat or two (one a second)
        time.sleep(max(0.0, 6 - (time.time() - task.started_at.timestamp())))  # WORKER_GRACE
        report = reconcile()
        assert task_id not in report.lost and task_id not in report.rerun, worker.output()
        assert Task.objects.get(pk=task_id).status == "running"  # still, 12 s task
        assert wait_for_status(task_id, ("succeeded",), timeout=30).run == 1
        assert worker.process.poll() is None
    finally:
        stack.close()
        redis_client.cache_clear()


@pytest.mark.parametrize("victim", ["web", "redis"])
def test_an_event_stream_resumes_over_a_killed_web_process_or_redis(make_run, victim):
    """`make run` as users run it: a client follows a task's stream, the web process (or the
    embedded Redis, which keeps its append-only file) is killed under it, make run restarts it,
    and the client's resume with Last-Event-ID gets every event it missed, none twice."""
    import httpx
    from httpx_sse import connect_sse

    run = make_run()
    client = Client(run, None, runner="sleep")
    (task_id,) = client.submit(1, inputs={"seconds": 8})
    url = f"{run.base_url}/api/tasks/{task_id}/events"
    received: list[tuple[str, str, dict]] = []

    def follow(last_id: str | None) -> None:
        headers = client.headers | ({"Last-Event-ID": last_id} if last_id else {})
        with (
            httpx.Client(headers=headers, timeout=30) as http,
            connect_sse(http, "GET", url) as source,
        ):
            for sse in source.iter_sse():
                if sse.data:
                    received.append((sse.id, sse.event, json.loads(sse.data)))
                if sse.event == "task.finished" or (
                    last_id is None and sse.event == "task.progress" and len(received) >= 5
                ):
                    return

    follow(None)  # until the second progress event (queued, started, log, 10 %, 20 %)
    before = run.children()[victim]
    os.kill(before.pid, signal.SIGKILL)
    wait_for(lambda: restarted(run, victim, before), timeout=20, interval=0.1)
    run.wait_ready(timeout=30)

    def resumed() -> bool:
        try:
            follow(received[-1][0])
        except (httpx.HTTPError, AssertionError):
            return False
        return received[-1][1] == "task.finished"

    wait_for(resumed, timeout=60, interval=0.5)
    ids = [tuple(map(int, event_id.split("-"))) for event_id, _, _ in received]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "nothing repeated"
    progress = [data["progress"] for _, name, data in received if name == "task.progress"]
    assert progress == list(range(10, 101, 10)), "nothing lost"
    assert received[-1][2]["status"] == "succeeded"
