"""Signed callbacks (README: Callbacks) against real HTTP receivers and real RQ workers."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from datetime import timedelta

import pytest
from django.utils import timezone
from rq.worker import BaseWorker
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tasks.applications import rotate_webhook_secret
from tasks.delivery import callbacks, ssrf
from tasks.models import Application, CallbackAttempt, Task
from tasks.plumbing.queueing import redis_client
from tests.conftest import Client, WorkerProcess, api_submit, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def submit(app, callback_url: str, inputs=None) -> str:
    body = {"inputs": inputs or {"q": 1}, "response_mode": "async", "callback_url": callback_url}
    return api_submit(app, body)


def callback_done(task_id, statuses=("delivered", "failed"), timeout=30) -> Task:
    return wait_for(
        lambda: Task.objects.filter(pk=task_id, callback_status__in=statuses).first(),
        timeout=timeout,
    )


def attempts(task_id) -> list[CallbackAttempt]:
    return list(CallbackAttempt.objects.filter(task_id=task_id).order_by("number"))


@pytest.mark.parametrize(("runner", "status"), [("echo", "succeeded"), ("fail", "failed")])
def test_receiver_verifies_both_signatures(make_app, live_worker, receiver, runner, status):
    app = make_app(runner)
    task_id = submit(app, receiver.url, {"message": "boom"})
    callback_done(task_id)
    request = receiver.received[0]
    headers = {k.lower(): v for k, v in request.headers.items()}

    # What existing Dify-style receivers compute, unchanged.
    expected = hmac.new(app.webhook_secret.encode(), request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-dify-signature-v1"], expected)
    # Standard Webhooks, verified by the standardwebhooks library.
    payload = Webhook(app.webhook_secret).verify(request.body, headers)
    assert payload["status"] == status
    assert set(payload) == {
        "event", "task_id", "run", "app_id", "status", "output", "error", "error_code", "user",
        "created_at", "started_at", "finished_at", "queue", "batch_id",
    }  # fmt: skip
    assert payload["error_code"] is None  # a runner's failure has none
    assert payload["event"] == "task.finished" and payload["task_id"] == task_id
    assert payload["run"] == 1 and payload["app_id"] == str(app.application.id)
    # Compact JSON, UTF-8.
    assert b", " not in request.body and b'": ' not in request.body
    assert headers["webhook-id"] == f"msg_{task_id.replace('-', '')}_1"
    assert headers["x-taskhook-attempt"] == "1"
    assert headers["user-agent"].startswith("Taskhook/")
    assert headers["content-type"] == "application/json"
    # A tampered body fails both checks.
    tampered = request.body.replace(b'"run":1', b'"run":2')
    with pytest.raises(WebhookVerificationError):
        Webhook(app.webhook_secret).verify(tampered, headers)
    bad = hmac.new(app.webhook_secret.encode(), tampered, hashlib.sha256).hexdigest()
    assert not hmac.compare_digest(headers["x-dify-signature-v1"], bad)


def test_unicode_output_is_signed_over_utf8_bytes(make_app, live_worker, receiver):
    app = make_app("echo")
    task_id = submit(app, receiver.url, {"query": "如何申请退款?"})
    callback_done(task_id)
    body = receiver.received[0].body
    assert "如何申请退款?".encode() in body
    expected = hmac.new(app.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    assert receiver.received[0].headers["X-Dify-Signature-V1"] == expected


def test_500_500_then_200_is_delivered_on_attempt_3(make_app, live_worker, receiver):
    app = make_app("echo", retry_schedule=[1, 1, 1])
    receiver.respond(500, body=b"down")
    receiver.respond(500, body=b"still down")
    task_id = submit(app, receiver.url)
    wait_for(lambda: Task.objects.get(pk=task_id).callback_attempts >= 1)
    # While a retry is scheduled the poll API says so.
    poll = wait_for(lambda: Task.objects.filter(pk=task_id).exclude(
        callback_next_attempt_at=None).first(), timeout=10)  # fmt: skip
    assert poll.callback_status == "delivering" and poll.callback_last_status_code == 500
    task = callback_done(task_id)
    assert task.callback_status == "delivered" and task.callback_attempts == 3
    rows = attempts(task_id)
    assert [r.status_code for r in rows] == [500, 500, 200]
    assert [r.number for r in rows] == [1, 2, 3]
    assert all(r.trigger == "auto" for r in rows)
    assert rows[0].started_at < rows[1].started_at < rows[2].started_at
    assert (rows[1].started_at - rows[0].started_at).total_seconds() >= 1
    assert rows[0].response_excerpt == "down" and rows[0].error == "receiver answered HTTP 500"
    ids = {r.headers["webhook-id"] for r in receiver.received}
    assert len(ids) == 1  # stable across retries
    assert [r.headers["X-Taskhook-Attempt"] for r in receiver.received] == ["1", "2", "3"]


def test_always_failing_then_manual_redelivery(make_app, live_worker, receiver):
    app = make_app("echo", retry_schedule=[1, 1])
    receiver.default = (503, {}, b"maintenance", 0.0)
    task_id = submit(app, receiver.url)
    task = callback_done(task_id, ("failed",))
    assert task.callback_attempts == 3  # 1 + 2 retries
    assert len(receiver.received) == 3
    # Operator fixes the receiver and redelivers by hand.
    receiver.default = (200, {}, b"ok", 0.0)
    assert callbacks.redeliver(task_ids=[task_id]) == [task.id]
    task = callback_done(task_id, ("delivered",))
    rows = attempts(task_id)
    assert [(r.number, r.trigger, r.status_code) for r in rows][-1] == (4, "manual", 200)
    assert receiver.received[-1].headers["webhook-id"] == receiver.received[0].headers["webhook-id"]


def test_timeout_is_a_failed_attempt(make_app, live_worker, receiver):
    app = make_app("echo", retry_schedule=[], callback_timeout_seconds=0.5)
    receiver.default = (200, {}, b"late", 2.0)
    task_id = submit(app, receiver.url)
    callback_done(task_id, ("failed",))
    (row,) = attempts(task_id)
    assert row.status_code is None and row.error == "timed out after 0.5 s"
    assert 400 <= row.duration_ms < 2000


def test_connection_refused_is_a_failed_attempt(make_app, live_worker):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = make_app("echo", retry_schedule=[])
    task_id = submit(app, f"http://127.0.0.1:{port}/hook")
    callback_done(task_id, ("failed",))
    (row,) = attempts(task_id)
    assert row.status_code is None and row.error.startswith("could not connect: [Errno 111]")


def test_connection_kept_alive_and_long_answer_cut_to_excerpt(make_app, live_worker, receiver):
    app = make_app("echo", retry_schedule=[])
    receiver.respond(204)
    receiver.respond(204)
    receiver.respond(200, body=b"x" * 3000 + b"the end")  # longer than the excerpt
    receiver.respond(204)
    for n in range(4):
        assert callback_done(submit(app, receiver.url)).callback_status == "delivered", n
    ports = [r.client_port for r in receiver.received]
    assert ports[0] == ports[1] == ports[2]  # one connection, kept alive
    # The long answer was not read to its end: that connection was closed, not reused.
    assert ports[3] != ports[2]
    long_answer = CallbackAttempt.objects.get(task_id=receiver.received[2].json()["task_id"])
    assert long_answer.response_excerpt == "x" * 2048 and long_answer.delivered


def test_redirect_is_not_followed(make_app, live_worker, receiver):
    app = make_app("echo", retry_schedule=[])
    receiver.default = (302, {"Location": receiver.url + "/elsewhere"}, b"", 0.0)
    task_id = submit(app, receiver.url)
    callback_done(task_id, ("failed",))
    (row,) = attempts(task_id)
    assert row.status_code == 302 and "redirect not followed" in row.error
    assert [r.path for r in receiver.received] == ["/hook"]


def test_410_gone_stops_retries(make_app, live_worker, receiver):
    app = make_app("echo", retry_schedule=[1, 1, 1])
    receiver.default = (410, {}, b"gone", 0.0)
    task_id = submit(app, receiver.url)
    task = callback_done(task_id, ("failed",))
    assert task.callback_attempts == 1 and task.callback_last_status_code == 410
    assert task.callback_next_attempt_at is None


def test_429_retry_after_pushes_the_next_attempt(make_app, live_worker, receiver):
    app = make_app("echo", retry_schedule=[1])
    receiver.respond(429, {"Retry-After": "3"}, b"slow down")
    task_id = submit(app, receiver.url)
    callback_done(task_id, ("delivered",))
    first, second = attempts(task_id)
    assert first.status_code == 429 and second.status_code == 200
    assert (second.started_at - first.started_at).total_seconds() >= 3


def test_slow_receiver_does_not_hold_up_others(make_app, live_worker, receiver):
    """Two callback workers: a fast receiver is served while a slow one is still in flight."""
    extra = WorkerProcess(("tasks", "callbacks"), name="second")
    try:
        wait_for(lambda: extra.name in {w.name for w in BaseWorker.all(connection=redis_client())})
        slow_app = make_app("echo", retry_schedule=[], callback_timeout_seconds=10)
        receiver.default = (200, {}, b"ok", 0.0)
        receiver.respond(200, {}, b"slow", 4.0)
        slow_id = submit(slow_app, receiver.url + "?slow")
        wait_for(lambda: len(receiver.received) == 1)
        fast_id = submit(slow_app, receiver.url + "?fast")
        fast = callback_done(fast_id, ("delivered",), timeout=3.5)
        assert Task.objects.get(pk=slow_id).callback_status == "delivering"
        slow = callback_done(slow_id, ("delivered",))
        assert attempts(slow_id)[0].duration_ms >= 4000
        assert attempts(fast_id)[0].started_at < attempts(slow_id)[0].started_at + timedelta(
            seconds=4
        )
        assert fast.callback_status == slow.callback_status == "delivered"
    finally:
        extra.stop()


def test_rotation_without_grace_signs_the_very_next_delivery(make_app, live_worker, receiver):
    """Workers cache the application, but check it against its updated_at on every claim: a
    secret rotated because it leaked is never used again, not even within a cache period."""
    app = make_app("echo")
    callback_done(submit(app, receiver.url), ("delivered",))  # the worker caches the app
    Webhook(app.webhook_secret).verify(receiver.received[0].body, receiver.received[0].headers)
    new_secret = rotate_webhook_secret(application_id=app.application.id, grace_hours=0)
    callback_done(submit(app, receiver.url), ("delivered",))
    request = receiver.received[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    Webhook(new_secret).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(app.webhook_secret).verify(request.body, request.headers)


def test_rotation_signs_with_both_secrets_during_grace(make_app, live_worker, receiver):
    app = make_app("echo")
    old_secret = app.webhook_secret
    new_secret = rotate_webhook_secret(application_id=app.application.id, grace_hours=1)
    task_id = submit(app, receiver.url)
    callback_done(task_id, ("delivered",))
    request = receiver.received[0]
    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    Webhook(new_secret).verify(request.body, request.headers)
    Webhook(old_secret).verify(request.body, request.headers)
    expected = hmac.new(new_secret.encode(), request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Dify-Signature-V1"] == expected

    # After the grace period only the new secret signs. (The period is moved into the past;
    # updated_at moves as with any save, which is what tells workers' caches it changed.)
    Application.objects.filter(pk=app.application.id).update(
        previous_secret_expires_at=timezone.now() - timedelta(seconds=1), updated_at=timezone.now()
    )
    task_id = submit(app, receiver.url)
    callback_done(task_id, ("delivered",))
    request = receiver.received[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    Webhook(new_secret).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old_secret).verify(request.body, request.headers)


def test_poll_reflects_delivery(make_app, live_worker, receiver):
    app = make_app("echo")
    task_id = submit(app, receiver.url)
    callback_done(task_id, ("delivered",))
    body = Client().get(f"/api/tasks/{task_id}", HTTP_AUTHORIZATION=f"Bearer {app.api_key}").json()
    assert body["callback"] == {
        "url": receiver.url,
        "status": "delivered",
        "attempts": 1,
        "last_status_code": 200,
        "next_attempt_at": None,
        "events": ["finished"],
    }


# --- SSRF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://127.8.0.1:8080/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.5/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/hook",
        "http://[::1]/hook",
        "http://[fc00::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://224.0.0.1/hook",
        "http://240.0.0.1/hook",
        "http://100.64.0.1/hook",
    ],
)
def test_ssrf_refuses_non_public_addresses(url):
    with pytest.raises(ssrf.UnsafeCallbackUrl):
        ssrf.check_callback_url(url, allow_private=False)
    ssrf.check_callback_url(url, allow_private=True)  # the local-development switch


def test_ssrf_allows_public_addresses():
    ssrf.check_callback_url("https://93.184.216.34/hook", allow_private=False)
    ssrf.check_callback_url("http://[2606:4700::1111]:8443/hook", allow_private=False)


def test_ssrf_refuses_a_name_that_resolves_to_a_private_address(monkeypatch):
    # No DNS server answers here, so the resolver's answer for an external name is simulated.
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == "hooks.customer.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 443))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(ssrf.UnsafeCallbackUrl, match="private"):
        ssrf.check_callback_url("https://hooks.customer.example/x", allow_private=False)


@pytest.mark.parametrize("url", ["ftp://x.example/", "http://", "http://u:p@93.184.216.34/"])
def test_ssrf_refuses_bad_urls_even_when_private_allowed(url):
    with pytest.raises(ssrf.UnsafeCallbackUrl):
        ssrf.check_callback_url(url, allow_private=True)


def test_ssrf_at_submit_is_a_400_on_callback_url(make_app, settings):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    app = make_app("echo")
    response = Client().post(
        f"/api/applications/{app.application.id}/generate",
        data=json.dumps({"inputs": {}, "response_mode": "async",
                         "callback_url": "http://169.254.169.254/latest"}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )  # fmt: skip
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == "callback_url"
    assert "link-local" in error["message"]
    assert Task.objects.count() == 0


def test_ssrf_at_delivery_is_a_failed_attempt(make_app, settings, receiver):
    """Allowed at submit, refused at delivery (as when DNS changed in between)."""
    app = make_app("echo", retry_schedule=[])
    task = Task.objects.create(
        application=app.application,
        inputs={},
        callback_url=receiver.url,
        status="succeeded",
        output={},
        finished_at=timezone.now(),
        callback_status="pending",
    )
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    assert callbacks.deliver(task_id=task.id, run=1, trigger="auto", auto_attempt=1) == "failed"
    (row,) = attempts(task.id)
    assert row.error.startswith("refused by the SSRF guard") and row.status_code is None
    assert receiver.received == []
    assert Task.objects.get(pk=task.id).callback_status == "failed"
