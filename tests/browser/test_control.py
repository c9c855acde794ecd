"""Queues & workers in a real browser: pause the task queue (confirmed in the page's dialog), a
task waits, resume, it runs; stop a worker warmly and see it leave the list."""

from __future__ import annotations

import time

import pytest
from django.conf import settings

from tasks.execution import pausing
from tasks.models import PausedQueue, Task, TaskStatus
from tasks.plumbing.queueing import redis_client
from tests.browser.conftest import screenshot, submit
from tests.conftest import WorkerProcess, wait_for, wait_for_status

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def resumed_after():
    yield
    PausedQueue.objects.all().delete()
    redis_client().delete(pausing.PAUSED_KEY)


def test_pause_a_queue_submit_resume_and_stop_a_worker(page, make_app, resumed_after):
    app = make_app("echo")
    queue = settings.TASK_QUEUE
    page.goto("/workers/")
    row = f"#queues tr[data-queue='{queue}']"
    page.click(f"{row} button[data-action='pause']")
    page.click("#confirm-ok")
    page.wait_for_selector(f"{row} .badge.paused")
    assert f"Queue {queue} paused" in page.locator("#messages").inner_text()

    task_id = submit(app, {"n": 1})
    page.wait_for_selector(f"{row} td[data-queued]:text-is('1')", timeout=10_000)  # the poll
    time.sleep(1)
    assert Task.objects.get(pk=task_id).status == TaskStatus.PENDING
    screenshot(page, "workers")

    page.click(f"{row} button[data-action='resume']")
    page.wait_for_selector(f"{row} td[data-state]:text-is('running')")
    wait_for_status(task_id, (TaskStatus.SUCCEEDED,), timeout=10)

    extra = WorkerProcess((settings.MAINTENANCE_QUEUE,), name="browser-extra")
    try:
        worker_row = f"#workers tr[data-worker='{extra.name}']"
        page.wait_for_selector(worker_row, timeout=30_000)  # registered, shown by the poll
        host = page.locator(f"{worker_row} td").nth(1).inner_text()
        assert str(extra.process.pid) in host
        page.click(f"{worker_row} button[data-action='stop-warm']")
        page.click("#confirm-ok")
        page.wait_for_selector("#messages li:has-text('stops after its current job')")
        wait_for(lambda: extra.process.poll() is not None, timeout=20)
        page.wait_for_selector(worker_row, state="detached", timeout=10_000)
    finally:
        extra.stop()
