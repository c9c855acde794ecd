"""Retention (README: Retention): TTL edges, what is kept, batches, lock, RQ TTLs, schedule."""

from __future__ import annotations

import subprocess
import threading
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rq.job import Job

from dashboard.runtime.processes import cron_argv
from tasks.models import (
    AuditEntry,
    CallbackAttempt,
    CleanupRun,
    Destination,
    DestinationAttempt,
    IdempotencyRecord,
    Task,
    TaskLog,
    TaskRunHistory,
)
from tasks.plumbing.queueing import redis_client, task_job_id
from tasks.submission import enqueue_pending_task
from tasks.upkeep import retention
from tests.conftest import Client, subprocess_env, wait_for

pytestmark = pytest.mark.django_db


def finished(app, *, hours_ago: float, status: str = "succeeded", **fields) -> Task:
    when = timezone.now() - timedelta(hours=hours_ago)
    return Task.objects.create(application=app.application, inputs={}, status=status,
                               created_at=when, finished_at=when, **fields)  # fmt: skip


def test_ttl_edges_and_per_app_retention(make_app):
    day = make_app("echo")  # 24 h
    hour = make_app("echo", retention_hours=1)
    kept = finished(day, hours_ago=23.9)
    gone = finished(day, hours_ago=24.1)
    hour_kept = finished(hour, hours_ago=0.9)
    hour_gone = finished(hour, hours_ago=1.1, status="cancelled")
    failed_gone = finished(day, hours_ago=30, status="failed")
    run = retention.run_cleanup(trigger="command")
    assert run.total_removed == 3
    left = set(Task.objects.values_list("id", flat=True))
    assert left == {kept.id, hour_kept.id}
    assert {gone.id, hour_gone.id, failed_gone.id}.isdisjoint(left)
    assert run.removed[str(hour.application.id)]["tasks"] == 1


def test_unfinished_and_still_delivering_tasks_are_kept(make_app):
    app = make_app("echo")
    old = timezone.now() - timedelta(days=30)
    pending = Task.objects.create(application=app.application, inputs={}, created_at=old)
    running = Task.objects.create(application=app.application, inputs={}, status="running",
                                  created_at=old, started_at=old)  # fmt: skip
    delivering = finished(app, hours_ago=48, callback_url="http://x.example/h",
                          callback_status="delivering")  # fmt: skip
    pending_cb = finished(app, hours_ago=48, callback_url="http://x.example/h",
                          callback_status="pending")  # fmt: skip
    retention.run_cleanup(trigger="command")
    assert set(Task.objects.values_list("id", flat=True)) == {
        pending.id, running.id, delivering.id, pending_cb.id,
    }  # fmt: skip
    # Once delivery ends, the task goes at the next cleanup.
    Task.objects.filter(pk=delivering.id).update(callback_status="failed")
    retention.run_cleanup(trigger="command")
    assert not Task.objects.filter(pk=delivering.id).exists()


def test_attempts_logs_and_history_go_with_the_task(make_app):
    app = make_app("echo")
    task = finished(
        app, hours_ago=25, callback_url="http://x.example/h", callback_status="delivered"
    )
    CallbackAttempt.objects.create(task=task, run=1, number=1, trigger="auto",
                                   started_at=timezone.now(), url="http://x.example/h")  # fmt: skip
    TaskLog.objects.create(task=task, message="hello")
    TaskRunHistory.objects.create(task=task, run=1, status="failed")
    destination = Destination.objects.create(application=app.application, kind="redis",
                                             url="redis://127.0.0.1:6379/0?stream=s")  # fmt: skip
    DestinationAttempt.objects.create(destination=destination, task=task, run=1, number=1,
                                      trigger="auto", started_at=timezone.now())  # fmt: skip
    retention.run_cleanup(trigger="command")
    assert not CallbackAttempt.objects.exists()
    assert not TaskLog.objects.exists()
    assert not TaskRunHistory.objects.exists()
    assert not DestinationAttempt.objects.exists() and Destination.objects.exists()


def test_a_removed_tasks_key_is_kept_only_inside_its_window(make_app):
    app = make_app("echo", retention_hours=1)
    recent = finished(app, hours_ago=2, idempotency_key="recent", request_hash="h1",
                      status="failed")  # fmt: skip
    finished(app, hours_ago=30, idempotency_key="old", request_hash="h2")  # past the 24 h
    finished(app, hours_ago=2)  # no key
    assert retention.purge_application(app.application) == 3
    assert not Task.objects.exists()
    kept = IdempotencyRecord.objects.values_list(
        "application_id", "key", "request_hash", "task_id", "status", "created_at"
    )
    assert list(kept) == [
        (app.application.pk, "recent", "h1", recent.pk, "failed", recent.created_at)
    ]


def test_cleanup_deletes_in_batches(make_app, monkeypatch):
    app = make_app("echo")
    old = timezone.now() - timedelta(days=3)
    Task.objects.bulk_create(
        Task(application=app.application, inputs={}, status="succeeded", created_at=old,
             finished_at=old) for _ in range(2500)
    )  # fmt: skip
    batches: list[int] = []
    real_delete_batch = retention.delete_batch

    def counting_delete_batch(expired, ids):  # a spy: the real deletion runs
        batches.append(len(ids))
        return real_delete_batch(expired, ids)

    monkeypatch.setattr(retention, "delete_batch", counting_delete_batch)
    with CaptureQueriesContext(connection) as queries:
        run = retention.run_cleanup(trigger="command", batch_size=1000)
    assert run.total_removed == 2500 and Task.objects.count() == 0
    assert batches == [1000, 1000, 500]  # three short transactions, not one long one
    # No task row is loaded whole: only ids are selected.
    selects = [
        q["sql"] for q in queries if q["sql"].startswith("SELECT") and "tasks_task" in q["sql"]
    ]
    assert not any('"tasks_task"."inputs"' in sql for sql in selects)


def test_expired_task_polls_404(make_app, client):
    app = make_app("echo")
    task = finished(app, hours_ago=25)
    url = f"/api/tasks/{task.id}"
    auth = {"HTTP_AUTHORIZATION": f"Bearer {app.api_key}"}
    assert client.get(url, **auth).status_code == 200
    retention.run_cleanup(trigger="command")
    response = client.get(url, **auth)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_cleanups_one_skips(make_app):
    app = make_app("echo")
    for _ in range(3):
        finished(app, hours_ago=30)
    lock = redis_client().lock(retention.LOCK_KEY, timeout=30)
    assert lock.acquire(blocking=False)
    try:
        assert retention.run_cleanup(trigger="scheduled") is None  # held: skipped
        assert Task.objects.count() == 3
    finally:
        lock.release()
    results = []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            results.append(retention.run_cleanup(trigger="scheduled"))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Task.objects.count() == 0
    ran = [r for r in results if r is not None]
    assert len(ran) >= 1 and sum(r.total_removed for r in ran) == 3


def test_rq_job_ttls_follow_retention(make_app):
    app = make_app("echo", retention_hours=72)
    task = Task.objects.create(application=app.application, inputs={})
    enqueue_pending_task(task=task)
    job = Job.fetch(task_job_id(task.id, 1), connection=redis_client())
    # Success: kept a minute (the result is in the database); failure: kept for the retention.
    assert job.result_ttl == 60 and job.failure_ttl == 72 * 3600
    job.delete()


def test_cleanup_command_prints_per_application(make_app):
    app = make_app("echo")
    other = make_app("echo")
    finished(app, hours_ago=30)
    finished(app, hours_ago=31)
    finished(other, hours_ago=30)
    out = StringIO()
    call_command("cleanup_tasks", "--dry-run", stdout=out)
    assert f"app-echo ({app.application.id}): would remove 2 task(s)" in out.getvalue()
    assert Task.objects.count() == 3
    out = StringIO()
    call_command("cleanup_tasks", "--app", str(other.application.id), stdout=out)
    assert "removed 1 task(s)" in out.getvalue() and Task.objects.count() == 2
    assert CleanupRun.objects.filter(trigger="command", dry_run=False).count() == 1


def test_dashboard_preview_and_run_cleanup_now(make_app):
    app = make_app("echo")
    finished(app, hours_ago=30)
    finished(app, hours_ago=1)
    user = User.objects.create_superuser("root", "root@example.com", "root-password-123")
    client = Client()
    client.force_login(user)
    page = client.get(f"/applications/{app.application.id}/").content.decode()
    assert "1 task(s) would be removed now" in page and "Run cleanup now" in page
    response = client.post(f"/applications/{app.application.id}/cleanup")
    assert response.status_code == 302 and Task.objects.count() == 1
    assert AuditEntry.objects.get().action == "retention.cleanup"
    page = client.get(f"/applications/{app.application.id}/").content.decode()
    assert "Nothing has expired." in page and "manual" in page


@pytest.mark.django_db(transaction=True)
def test_scheduled_cleanup_runs_under_rq_cron(make_app, live_worker):
    """The real cron process enqueues cleanup every CLEANUP_INTERVAL; the real worker runs it."""
    app = make_app("echo")
    expired = finished(app, hours_ago=30)
    cron = subprocess.Popen(
        cron_argv(),
        env=subprocess_env(CLEANUP_INTERVAL="1", RECONCILE_INTERVAL="3600"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: CleanupRun.objects.filter(trigger="scheduled").exists(), timeout=30)
        wait_for(lambda: not Task.objects.filter(pk=expired.id).exists(), timeout=10)
    finally:
        cron.terminate()
        cron.wait(10)
