"""A batch under the real `make run` (tests.makerun) while its children are killed: the task
worker running its items is killed with SIGKILL, then the callback worker about to deliver its
`batch.finished`; make run restarts them, the reconciler fails (or re-runs) the lost item, and
exactly one `batch.finished` arrives with every item counted."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import requests

from tests.conftest import wait_for
from tests.makerun import MakeRun
from tests.test_supervisor import RUN_ENV, restarted

pytestmark = [pytest.mark.processes, pytest.mark.timeout(170)]


@pytest.fixture
def make_run(tmp_path):
    run = MakeRun(tmp_path, RUN_ENV | {"WORKER_ALIVE_TTL": "3"})
    run.start()
    run.wait_ready()
    yield run
    run.stop()


def batch_finished(receiver) -> list[dict]:
    return [r.json() for r in receiver.received if r.json().get("event") == "batch.finished"]


def test_killed_workers_under_make_run_still_end_in_one_batch_finished(make_run, receiver):
    run = make_run
    created = run.manage("createapplication", "sleeper", "--runner", "sleep", "--json")
    assert created.returncode == 0, created.stderr
    app = json.loads(created.stdout)
    headers = {"Authorization": f"Bearer {app['api_key']}"}
    items = [{"inputs": {"seconds": 1.5}} for _ in range(6)]
    response = requests.post(
        f"{run.base_url}/api/applications/{app['app_id']}/batches",
        json={"items": items, "callback_url": receiver.url}, headers=headers, timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    poll_url = response.json()["poll_url"]

    def counts() -> dict:
        return requests.get(poll_url, headers=headers, timeout=5).json()["counts"]

    wait_for(lambda: counts()["running"] >= 1, timeout=30, interval=0.1)
    worker = run.children()["task-worker-1"]
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: restarted(run, "task-worker-1", worker), timeout=20, interval=0.1)
    # The callback worker goes too, as the last items end: its replacement delivers.
    wait_for(lambda: counts()["pending"] == 0, timeout=60, interval=0.2)
    callback_worker = run.children()["callback-worker-1"]
    os.kill(callback_worker.pid, signal.SIGKILL)
    wait_for(lambda: batch_finished(receiver), timeout=90, interval=0.2)
    time.sleep(3)  # room for a duplicate to show: at least once, and here exactly once
    (body,) = batch_finished(receiver)
    assert body["counts"]["total"] == 6
    assert body["counts"]["pending"] == body["counts"]["running"] == 0
    assert body["counts"]["succeeded"] + body["counts"]["failed"] == 6
    assert body["counts"]["succeeded"] >= 4  # only an item the killed worker held may fail
    detail = requests.get(poll_url, headers=headers, timeout=5).json()
    assert detail["status"] == "finished" and detail["progress"] == 100
    # No per-item callbacks: the batch asked for none.
    assert {r.json()["event"] for r in receiver.received} == {"batch.finished"}
