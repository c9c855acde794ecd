"""Promises that hold against a hostile world: an Idempotency-Key outlives its task, viewers
cannot act through django-rq's pages, and a flood of blocking submits cannot starve a real
gunicorn of threads for health checks and polls."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

import pytest
import requests
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from dashboard.runtime.processes import web_argv
from tasks.models import IdempotencyRecord, Task
from tasks.upkeep.retention import run_cleanup
from tests.conftest import BASE_DIR, Client, subprocess_env, wait_for
from tests.stack import free_port

BODY = {"inputs": {"q": "report"}, "response_mode": "async"}


def submit(app, body=BODY, key="order-7"):
    return Client().post(
        f"/api/applications/{app.application.id}/generate",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
        HTTP_IDEMPOTENCY_KEY=key,
    )


@pytest.mark.django_db
def test_an_idempotency_key_outlives_a_task_that_retention_removed(make_app):
    app = make_app("echo", retention_hours=1)
    first = submit(app).json()
    Task.objects.filter(pk=first["task_id"]).update(
        status="succeeded", finished_at=timezone.now() - timedelta(hours=2)
    )
    assert run_cleanup(trigger="manual").total_removed == 1
    assert not Task.objects.exists()

    again = submit(app)
    assert again.status_code == 200
    # The same answer, less the stream token (the stream of a removed task has nothing left).
    del first["stream_url"]
    assert again.json() == first | {"status": "succeeded"}
    assert not Task.objects.exists()  # nothing ran twice
    assert submit(app, {**BODY, "inputs": {"q": "other"}}).status_code == 409

    # Past the 24 h window the key is free again and its record goes.
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(hours=25))
    fresh = submit(app).json()
    assert fresh["task_id"] != first["task_id"] and fresh["status"] == "pending"
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.django_db
def test_cleanup_forgets_records_past_the_window(make_app):
    app = make_app("echo")
    IdempotencyRecord.objects.create(
        application=app.application, key="old", request_hash="x", task_id=app.application.pk,
        status="succeeded", created_at=timezone.now() - timedelta(hours=30),
    )  # fmt: skip
    run_cleanup(trigger="manual")
    assert not IdempotencyRecord.objects.exists()


RQ_ACTIONS = [
    "/django-rq/queues/0/empty/",
    "/django-rq/queues/0/requeue-all/",
    "/django-rq/queues/0/failed/clear/",
    "/django-rq/queues/0/some-job/delete/",
    "/django-rq/queues/0/some-job/requeue/",
    "/django-rq/queues/0/some-job/enqueue/",
    "/django-rq/queues/0/some-job/stop/",
    "/django-rq/queues/confirm-action/0/",
    "/django-rq/queues/actions/0/",
]


@pytest.mark.django_db
@pytest.mark.parametrize("path", RQ_ACTIONS)
def test_viewers_cannot_act_through_django_rq(path):
    viewer = Client()
    viewer.force_login(User.objects.create_user("viewer", password="pw-1-viewer", is_staff=True))
    assert viewer.get(path).status_code == 403
    assert viewer.post(path, {"job_ids": ["x"], "action": "delete"}).status_code == 403
    assert viewer.get("/django-rq/").status_code == 200  # its read-only pages stay open
    assert viewer.get("/django-rq/queues/0/").status_code == 200


@pytest.mark.django_db
def test_operators_keep_django_rq_actions():
    user = User.objects.create_user("op", password="pw-1-operator", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="operate"))
    operator = Client()
    operator.force_login(user)
    assert operator.get("/django-rq/queues/0/empty/").status_code == 200  # its confirmation


@pytest.mark.django_db(transaction=True)
def test_a_flood_of_blocking_submits_leaves_threads_for_health_and_polls(make_app):
    """One gunicorn process of 8 threads, 40 concurrent blocking submits with a 6 s wait: only
    the capped few wait, the rest answer 202 at once, and /healthz and a poll are answered
    meanwhile. Every task stays pending: this web process's Redis is unreachable (its submits
    are committed and left for the reconciler, its waits poll the database), so no worker of
    the session can finish one."""
    app = make_app("echo", blocking_timeout_seconds=6, rate_limit_burst=1000)
    headers = {"Authorization": f"Bearer {app.api_key}", "Content-Type": "application/json"}
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with gunicorn(GUNICORN_THREADS="8", REDIS_URL=nowhere) as base:
        other = requests.post(f"{base}/api/applications/{app.application.id}/generate",
                              headers=headers, data=json.dumps(BODY), timeout=5).json()  # fmt: skip

        def blocking_submit(_: int) -> tuple[int, float]:
            started = time.monotonic()
            response = requests.post(
                f"{base}/api/applications/{app.application.id}/generate",
                headers=headers, data=json.dumps({"inputs": {}, "response_mode": "blocking"}),
                timeout=30,
            )  # fmt: skip
            return response.status_code, time.monotonic() - started

        with ThreadPoolExecutor(40) as pool:
            flood = [pool.submit(blocking_submit, n) for n in range(40)]
            time.sleep(1)  # the flood is in flight; the capped waiters hold their threads
            health = requests.get(f"{base}/healthz", timeout=3)
            poll = requests.get(f"{base}/api/tasks/{other['task_id']}", headers=headers, timeout=3)
            results = [future.result() for future in flood]
        assert health.status_code == 200 and poll.status_code == 200
        assert all(status == 202 for status, _ in results)
        # BLOCKING_MAX_WAITS_PER_KEY = 8 // 4: two waited their 6 s, the others did not wait.
        waited = [took for _, took in results if took >= 5]
        assert len(waited) == 2, sorted(took for _, took in results)


@contextmanager
def gunicorn(**env: str) -> Iterator[str]:
    """One gunicorn process with the project's config on the test database; yields its URL."""
    port = free_port()
    web = subprocess.Popen(
        web_argv(),
        cwd=BASE_DIR,
        env=subprocess_env(GUNICORN_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY="1", **env),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(f"{base}/healthz"), timeout=30, interval=0.1)
        yield base
    finally:
        web.terminate()
        web.wait(15)


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.django_db(transaction=True)
def test_a_chunked_body_is_read_and_its_size_limit_holds(make_app, settings):
    """Transfer-Encoding: chunked, no Content-Length, through a real gunicorn: Django alone
    would read the body as empty."""
    app = make_app("echo")
    headers = {"Authorization": f"Bearer {app.api_key}", "Content-Type": "application/json"}

    def chunks(body: bytes):
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    with gunicorn(MAX_BODY_BYTES="2000") as base:
        url = f"{base}/api/applications/{app.application.id}/generate"
        small = json.dumps({"inputs": {"q": "chunked"}, "response_mode": "async"}).encode()
        ok = requests.post(url, headers=headers, data=chunks(small), timeout=5)
        assert ok.status_code == 200, ok.text
        assert Task.objects.get(pk=ok.json()["task_id"]).inputs == {"q": "chunked"}
        big = json.dumps({"inputs": {"q": "x" * 3000}}).encode()
        too_large = requests.post(url, headers=headers, data=chunks(big), timeout=5)
        assert too_large.status_code == 413
        assert too_large.json()["error"]["code"] == "payload_too_large"
        assert Task.objects.count() == 1
