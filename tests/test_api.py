"""The client API (README: API): error matrix, async and blocking submits, poll, cancel."""

from __future__ import annotations

import io
import json
import uuid

import pytest

from tasks.models import Task, TaskLog
from tests.conftest import Client, wait_for, wait_for_status

pytestmark = pytest.mark.django_db


def submit(
    client: Client,
    app_id,
    key: str | None,
    body,
    *,
    content_type="application/json",
    headers: dict | None = None,
    method: str = "post",
):
    extra = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    for name, value in (headers or {}).items():
        extra["HTTP_" + name.upper().replace("-", "_")] = value
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.generic(
        method.upper(), f"/api/applications/{app_id}/generate", data, content_type, **extra
    )


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["field"] == field
    return body


@pytest.fixture
def app(make_app):
    return make_app("echo")


VALID = {"inputs": {"q": "hi"}, "response_mode": "async"}


class TestErrorMatrix:
    """Each bad request gets its status and code, and creates no task."""

    def test_missing_key(self, client, app):
        assert_error(submit(client, app.application.id, None, VALID), 401, "unauthorized")

    def test_wrong_key(self, client, app):
        assert_error(submit(client, app.application.id, "thk_nope", VALID), 401, "unauthorized")

    def test_non_bearer_scheme(self, client, app):
        response = client.post(
            f"/api/applications/{app.application.id}/generate",
            data=json.dumps(VALID),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Basic {app.api_key}",
        )
        assert_error(response, 401, "unauthorized")

    def test_unknown_application(self, client, app):
        assert_error(submit(client, uuid.uuid4(), app.api_key, VALID), 404, "not_found")

    def test_malformed_application_id(self, client, app):
        assert_error(submit(client, "not-a-uuid", app.api_key, VALID), 404, "not_found")

    def test_key_of_another_application(self, client, app, make_app):
        other = make_app("echo")
        assert_error(submit(client, other.application.id, app.api_key, VALID), 404, "not_found")

    def test_invalid_json(self, client, app):
        assert_error(
            submit(client, app.application.id, app.api_key, "{nope"), 400, "invalid_request"
        )

    def test_body_not_an_object(self, client, app):
        assert_error(
            submit(client, app.application.id, app.api_key, [1, 2]), 400, "invalid_request"
        )

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"response_mode": "async"}, "inputs"),
            ({"inputs": "text", "response_mode": "async"}, "inputs"),
            ({"inputs": [1], "response_mode": "async"}, "inputs"),
            ({"inputs": {}, "response_mode": "streaming"}, "response_mode"),
            ({"inputs": {}, "response_mode": 1}, "response_mode"),
            ({"inputs": {}, "user": 7}, "user"),
            ({"inputs": {}, "user": "u" * 256}, "user"),
            ({"inputs": {}, "callback_url": "ftp://example.com/hook"}, "callback_url"),
            ({"inputs": {}, "callback_url": "/relative/hook"}, "callback_url"),
            ({"inputs": {}, "callback_url": 42}, "callback_url"),
            ({"inputs": {}, "callback_url": "http://"}, "callback_url"),
        ],
    )
    def test_validation(self, client, app, body, field):
        assert_error(
            submit(client, app.application.id, app.api_key, body), 400, "invalid_request", field
        )

    def test_oversized_body(self, client, app, settings):
        settings.MAX_BODY_BYTES = 1000
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
        body = {"inputs": {"blob": "x" * 2000}, "response_mode": "async"}
        assert_error(
            submit(client, app.application.id, app.api_key, body), 413, "payload_too_large"
        )

    def test_wrong_method(self, client, app):
        response = submit(client, app.application.id, app.api_key, VALID, method="get")
        assert_error(response, 405, "method_not_allowed")
        assert response["Allow"] == "POST"

    def test_wrong_content_type(self, client, app):
        response = submit(
            client,
            app.application.id,
            app.api_key,
            "inputs=1",
            content_type="application/x-www-form-urlencoded",
        )
        assert_error(response, 415, "unsupported_media_type")

    def test_idempotency_key_too_long(self, client, app):
        response = submit(
            client, app.application.id, app.api_key, VALID, headers={"Idempotency-Key": "k" * 256}
        )
        assert_error(response, 400, "invalid_request", "Idempotency-Key")

    def test_unknown_api_path_is_json(self, client):
        assert_error(client.get("/api/does/not/exist"), 404, "not_found")

    @pytest.fixture(autouse=True)
    def _no_task_created(self):
        yield
        assert Task.objects.count() == 0


class TestPollAndCancelErrors:
    def test_poll_unknown_task(self, client, app):
        response = client.get(
            f"/api/tasks/{uuid.uuid4()}", HTTP_AUTHORIZATION=f"Bearer {app.api_key}"
        )
        assert_error(response, 404, "not_found")

    def test_poll_needs_key(self, client, app):
        assert_error(client.get(f"/api/tasks/{uuid.uuid4()}"), 401, "unauthorized")

    def test_poll_with_other_apps_key(
        self, client, app, make_app, django_capture_on_commit_callbacks
    ):
        other = make_app("echo")
        response = submit(client, app.application.id, app.api_key, VALID)
        task_id = response.json()["task_id"]
        response = client.get(f"/api/tasks/{task_id}", HTTP_AUTHORIZATION=f"Bearer {other.api_key}")
        assert_error(response, 404, "not_found")

    def test_cancel_wrong_method(self, client, app):
        response = client.get(
            f"/api/tasks/{uuid.uuid4()}/cancel", HTTP_AUTHORIZATION=f"Bearer {app.api_key}"
        )
        assert_error(response, 405, "method_not_allowed")


def test_async_submit_answers_at_once_with_the_contract_body(client, app):
    response = submit(
        client,
        app.application.id,
        app.api_key,
        {"inputs": {"query": "如何申请退款?"}, "response_mode": "async", "user": "customer_007"},
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"task_id", "status", "poll_url", "stream_url", "created_at"}
    assert body["status"] == "pending"
    assert body["poll_url"] == f"http://testserver/api/tasks/{body['task_id']}"
    assert body["stream_url"].startswith(f"{body['poll_url']}/events?token=")
    assert body["created_at"].endswith("Z")
    task = Task.objects.get(pk=body["task_id"])
    assert task.inputs == {"query": "如何申请退款?"} and task.user == "customer_007"


def test_poll_of_pending_task_has_retry_after(client, app):
    body = submit(client, app.application.id, app.api_key, VALID).json()
    response = client.get(
        f"/api/tasks/{body['task_id']}", HTTP_AUTHORIZATION=f"Bearer {app.api_key}"
    )
    assert response.status_code == 200
    assert response["Retry-After"] == "1"
    poll = response.json()
    assert set(poll) == {
        "task_id",
        "app_id",
        "status",
        "run",
        "progress",
        "output",
        "error",
        "user",
        "created_at",
        "started_at",
        "finished_at",
        "error_code",
        "elapsed_ms",
        "priority",
        "queue",
        "callback",
        "batch_id",
    }
    assert poll["priority"] == "normal" and poll["queue"]["position"] == 0
    assert set(poll["callback"]) == {
        "url",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "events",
    }
    assert poll["status"] == "pending" and poll["callback"]["status"] == "none"


def test_cancel_pending_then_409(client, app):
    # Inside the test transaction the enqueue (on commit) never happens: the task stays pending.
    body = submit(client, app.application.id, app.api_key, VALID).json()
    response = client.post(
        f"/api/tasks/{body['task_id']}/cancel", HTTP_AUTHORIZATION=f"Bearer {app.api_key}"
    )
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = client.post(
        f"/api/tasks/{body['task_id']}/cancel", HTTP_AUTHORIZATION=f"Bearer {app.api_key}"
    )
    assert_error(again, 409, "task_finished")
    assert Task.objects.get(pk=body["task_id"]).status == "cancelled"


def test_idempotency_key_returns_first_task(client, app):
    headers = {"Idempotency-Key": "order-42"}
    first = submit(client, app.application.id, app.api_key, VALID, headers=headers)
    second = submit(client, app.application.id, app.api_key, VALID, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json()["task_id"] == second.json()["task_id"]
    assert Task.objects.count() == 1
    conflict = submit(
        client,
        app.application.id,
        app.api_key,
        {"inputs": {"q": "other"}, "response_mode": "async"},
        headers=headers,
    )
    assert_error(conflict, 409, "idempotency_conflict", "Idempotency-Key")
    assert Task.objects.count() == 1


def test_idempotency_key_is_per_application_and_expires(client, app, make_app):
    other = make_app("echo")
    headers = {"Idempotency-Key": "shared"}
    a = submit(client, app.application.id, app.api_key, VALID, headers=headers).json()
    b = submit(client, other.application.id, other.api_key, VALID, headers=headers).json()
    assert a["task_id"] != b["task_id"]
    # Past the 24 h window the key is free again.
    from datetime import timedelta

    from django.utils import timezone

    Task.objects.filter(pk=a["task_id"]).update(created_at=timezone.now() - timedelta(hours=25))
    c = submit(client, app.application.id, app.api_key, VALID, headers=headers).json()
    assert c["task_id"] != a["task_id"]
    assert Task.objects.get(pk=a["task_id"]).idempotency_key is None


@pytest.mark.django_db(transaction=True)
class TestWithWorker:
    def test_async_runs_to_succeeded(self, client, live_worker, make_app):
        app = make_app("sleep")
        body = submit(
            client,
            app.application.id,
            app.api_key,
            {"inputs": {"seconds": 1.0}, "response_mode": "async"},
        ).json()
        task_id = body["task_id"]
        running = wait_for_status(task_id, ("running",))
        assert running.worker_name == live_worker.name
        wait_for(lambda: Task.objects.get(pk=task_id).progress >= 30)
        task = wait_for_status(task_id, ("succeeded",))
        assert task.output == {"slept": 1.0} and task.progress == 100
        assert TaskLog.objects.filter(task_id=task_id, message__contains="sleeping").exists()
        poll = client.get(f"/api/tasks/{task_id}", HTTP_AUTHORIZATION=f"Bearer {app.api_key}")
        assert "Retry-After" not in poll
        data = poll.json()
        assert data["status"] == "succeeded" and data["elapsed_ms"] >= 900
        assert data["started_at"] and data["finished_at"]

    def test_fail_runner_stores_real_traceback(self, client, live_worker, make_app):
        app = make_app("fail")
        body = submit(
            client,
            app.application.id,
            app.api_key,
            {"inputs": {"message": "model overloaded"}, "response_mode": "async"},
        ).json()
        task = wait_for_status(body["task_id"], ("failed",))
        assert task.error == "model overloaded"
        assert "Traceback (most recent call last)" in task.traceback
        assert 'raise RunnerError(str(inputs.get("message")' in task.traceback
        assert "tasks/execution/runners.py" in task.traceback

    def test_blocking_success_answers_like_a_poll(self, client, live_worker, app):
        response = submit(client, app.application.id, app.api_key, {"inputs": {"a": 1}})
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "succeeded" and body["output"] == {"a": 1}
        assert "callback" in body and "Retry-After" not in response

    def test_blocking_timeout_answers_202(self, client, live_worker, make_app):
        app = make_app("sleep", blocking_timeout_seconds=0.5)
        response = submit(
            client,
            app.application.id,
            app.api_key,
            {"inputs": {"seconds": 3}, "response_mode": "blocking"},
        )
        assert response.status_code == 202
        body = response.json()
        assert body["status"] in ("pending", "running")
        assert body["poll_url"].endswith(f"/api/tasks/{body['task_id']}")
        assert response["Retry-After"] == "1"
        wait_for_status(body["task_id"], ("succeeded",))  # the task goes on

    def test_cancel_running_task_stops_it(self, client, live_worker, make_app):
        app = make_app("sleep")
        body = submit(
            client,
            app.application.id,
            app.api_key,
            {"inputs": {"seconds": 5}, "response_mode": "async"},
        ).json()
        wait_for_status(body["task_id"], ("running",))
        response = client.post(
            f"/api/tasks/{body['task_id']}/cancel", HTTP_AUTHORIZATION=f"Bearer {app.api_key}"
        )
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        # The runner notices at its next progress report and stops; the status stays cancelled.
        wait_for(lambda: "task stopped: cancelled" in live_worker.output(), timeout=5)
        task = Task.objects.get(pk=body["task_id"])
        assert task.status == "cancelled" and task.output is None


def test_rate_limit_answers_429_with_retry_after(client, make_app):
    app = make_app("echo", rate_limit_per_second=0.2, rate_limit_burst=3)
    statuses = [
        submit(client, app.application.id, app.api_key, VALID).status_code for _ in range(5)
    ]
    assert statuses == [200, 200, 200, 429, 429]
    response = submit(client, app.application.id, app.api_key, VALID)
    assert_error(response, 429, "rate_limited")
    assert 1 <= int(response["Retry-After"]) <= 5
    assert Task.objects.count() == 3


def test_rotated_api_key_keeps_working_for_its_grace_period(client, app):
    from datetime import timedelta

    from django.utils import timezone

    from tasks.applications import rotate_api_key
    from tasks.models import ApiKey

    new_key = rotate_api_key(application_id=app.application.id, grace_hours=1)
    for key in (app.api_key, new_key):  # both work during the grace period
        assert submit(client, app.application.id, key, VALID).status_code == 200
    ApiKey.objects.filter(expires_at__isnull=False).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    from tasks import credentials

    credentials._auth_cache.clear()  # as after AUTH_CACHE_SECONDS; expiry itself is never cached
    assert_error(submit(client, app.application.id, app.api_key, VALID), 401, "unauthorized")
    assert submit(client, app.application.id, new_key, VALID).status_code == 200


def wsgi_call(
    method: str, path: str, body: bytes = b"", content_type: str = "application/json", **headers
):
    """One request through dashboard.runtime.wsgi.application, the callable gunicorn serves."""
    from wsgiref.util import setup_testing_defaults

    from dashboard.runtime.wsgi import application

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": content_type, "wsgi.input": io.BytesIO(body)}  # fmt: skip
    environ.update({"HTTP_" + name.upper(): value for name, value in headers.items()})
    setup_testing_defaults(environ)
    started = {}
    content = b"".join(application(environ, lambda status, items: started.update(
        status=int(status.split()[0]), headers=items)))  # fmt: skip
    return started["status"], {name.lower(): value for name, value in started["headers"]}, content


@pytest.mark.django_db(transaction=True)  # the real handler closes the connection after a request
def test_api_is_served_without_the_browser_middleware_and_the_dashboard_with_it(app):
    status, headers, content = wsgi_call(
        "POST", f"/api/applications/{app.application.id}/generate", json.dumps(VALID).encode(),
        authorization=f"Bearer {app.api_key}",
    )  # fmt: skip
    assert status == 200, content
    assert Task.objects.filter(pk=json.loads(content)["task_id"]).exists()
    assert headers["x-content-type-options"] == "nosniff"  # SecurityMiddleware runs for the API
    assert "set-cookie" not in headers and "content-security-policy" not in headers
    assert "x-frame-options" not in headers

    status, headers, _ = wsgi_call("GET", "/accounts/login/")
    assert status == 200
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert "csrftoken=" in headers["set-cookie"]
    # CSRF is still enforced on the dashboard side: a form POST without the token is refused.
    status, _, _ = wsgi_call("POST", "/accounts/login/", b"username=a&password=b",
                             content_type="application/x-www-form-urlencoded")  # fmt: skip
    assert status == 403
