"""`Prefer: wait=N` on a submit (RFC 7240): through the test client (no worker, so tasks stay
pending and each wait runs out), and once with a real worker that finishes within the wait."""

from __future__ import annotations

import json

import pytest

from tasks.models import Task
from tests.conftest import Client

pytestmark = pytest.mark.django_db


def post(app, body: dict | None = None, **headers):
    return Client().post(
        f"/api/applications/{app.application.id}/generate",
        data=json.dumps({"inputs": {"q": 1}, **(body or {})}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
        **headers,
    )


@pytest.fixture
def app(make_app):
    return make_app("echo", blocking_timeout_seconds=1)  # each wait below runs out within 1 s


@pytest.mark.parametrize("mode", ["async", "blocking", None])
def test_prefer_wait_answers_as_a_blocking_submit_whatever_the_mode(app, mode):
    body = {} if mode is None else {"response_mode": mode}
    response = post(app, body, HTTP_PREFER="wait=1")
    assert response.status_code == 202
    assert response["Preference-Applied"] == "wait=1"
    assert int(response["Retry-After"]) >= 1
    answer = response.json()
    assert answer["status"] == "pending" and answer["poll_url"].endswith(answer["task_id"])
    # Stored as blocking, so the worker wakes this waiter when the task finishes.
    assert Task.objects.get(pk=answer["task_id"]).response_mode == "blocking"


def test_wait_0_answers_at_once(app):
    response = post(app, {"response_mode": "async"}, HTTP_PREFER="wait=0")
    assert response.status_code == 202 and response["Preference-Applied"] == "wait=0"


@pytest.mark.parametrize(("header", "applied"),
                         [("wait=3600", "wait=1"), ("wait", "wait=1"),
                          ("respond-async, WAIT = 1 ; x=y", "wait=1")])  # fmt: skip
def test_the_wait_is_capped_at_the_blocking_timeout(app, header, applied):
    response = post(app, HTTP_PREFER=header)
    assert response.status_code == 202 and response["Preference-Applied"] == applied


@pytest.mark.parametrize(
    "header", ["wait=soon", "wait=-1", "wait=1.5", 'wait="1', "return=minimal", "", "respond-async"]
)
def test_a_prefer_without_a_usable_wait_is_ignored(app, header):
    response = post(app, {"response_mode": "async"}, HTTP_PREFER=header)
    assert response.status_code == 200  # async, as the body says
    assert "Preference-Applied" not in response
    assert set(response.json()) == {"task_id", "status", "poll_url", "stream_url", "created_at"}


def test_past_the_blocking_caps_the_wait_applied_is_0(app, settings):
    settings.BLOCKING_MAX_WAITS = 0
    response = post(app, HTTP_PREFER="wait=1")
    assert response.status_code == 202 and response["Preference-Applied"] == "wait=0"


def test_an_invalid_body_with_prefer_is_still_refused(app):
    response = post(app, {"inputs": []}, HTTP_PREFER="wait=1")
    assert response.status_code == 400 and response.json()["error"]["field"] == "inputs"
    assert "Preference-Applied" not in response and not Task.objects.exists()


def test_prefer_wait_makes_an_async_request_the_blocking_one_for_idempotency(app):
    first = post(app, {"response_mode": "async"}, HTTP_PREFER="wait=0", HTTP_IDEMPOTENCY_KEY="k")
    same = post(app, {"response_mode": "blocking"}, HTTP_PREFER="wait=0", HTTP_IDEMPOTENCY_KEY="k")
    assert same.status_code == 202 and same.json()["task_id"] == first.json()["task_id"]
    other = post(app, {"response_mode": "async"}, HTTP_IDEMPOTENCY_KEY="k")
    assert other.status_code == 409 and Task.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_prefer_wait_answers_the_result_when_the_task_finishes_in_time(make_app, live_worker):
    app = make_app("sleep", blocking_timeout_seconds=60)
    response = post(app, {"inputs": {"seconds": 0.5}, "response_mode": "async"},
                    HTTP_PREFER="respond-async, wait=30")  # fmt: skip
    assert response.status_code == 200, response.content
    assert response["Preference-Applied"] == "wait=30"
    body = response.json()
    assert body["status"] == "succeeded" and body["output"] == {"slept": 0.5}
    assert "Retry-After" not in response and "poll_url" not in body
