"""tasks.presenters: the wire bodies, from unsaved model instances (no database)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.test import RequestFactory

from tasks import presenters
from tasks.events import tokens
from tasks.models import Application, IdempotencyRecord, Task

T0 = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
TASK_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
APP_ID = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
RESULT_KEYS = ["output", "error", "error_code", "user", "created_at", "started_at", "finished_at"]


def make_task(**fields) -> Task:
    application = Application(id=APP_ID, name="demo", runner="echo")
    defaults = {"id": TASK_ID, "application": application, "created_at": T0}
    return Task(**{**defaults, **fields})


def finished_task(**fields) -> Task:
    return make_task(
        status="succeeded", run=2, progress=100, output={"text": "é"},
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=3, microseconds=250_000),
        user="u-1", callback_url="https://hooks.example/x", callback_status="delivered",
        callback_attempts=2, callback_last_status_code=200,
        callback_next_attempt_at=T0 + timedelta(minutes=5), **fields,
    )  # fmt: skip


@pytest.fixture
def request_(settings):
    settings.ALLOWED_HOSTS = ["api.example.com"]
    return RequestFactory().get("/api/whatever", HTTP_HOST="api.example.com", secure=True)


def test_iso():
    assert presenters.iso(None) is None
    assert presenters.iso(T0) == "2025-03-04T05:06:07.890123Z"
    assert presenters.iso(T0.replace(microsecond=0)) == "2025-03-04T05:06:07Z"
    plus_two = timezone(timedelta(hours=2))
    assert presenters.iso(datetime(2025, 3, 4, 7, 6, 7, tzinfo=plus_two)) == "2025-03-04T05:06:07Z"


def test_task_body_fields_and_order():
    body = presenters.task_body(finished_task())
    assert list(body) == ["task_id", "app_id", "status", "run", "progress", *RESULT_KEYS,
                          "elapsed_ms", "priority", "queue", "callback", "batch_id"]  # fmt: skip
    assert body == {
        "task_id": str(TASK_ID),
        "app_id": str(APP_ID),
        "status": "succeeded",
        "run": 2,
        "progress": 100,
        "output": {"text": "é"},
        "error": None,
        "error_code": None,
        "user": "u-1",
        "created_at": "2025-03-04T05:06:07.890123Z",
        "started_at": "2025-03-04T05:06:08.890123Z",
        "finished_at": "2025-03-04T05:06:11.140123Z",
        "elapsed_ms": 2250,
        "priority": "normal",
        "queue": None,
        "callback": {
            "url": "https://hooks.example/x",
            "status": "delivered",
            "attempts": 2,
            "last_status_code": 200,
            "next_attempt_at": "2025-03-04T05:11:07.890123Z",
            "events": ["finished"],
        },
        "batch_id": None,
    }
    assert list(body["callback"]) == ["url", "status", "attempts", "last_status_code",
                                      "next_attempt_at", "events"]  # fmt: skip


def test_task_body_of_a_fresh_task_uses_nulls_not_empty_strings():
    body = presenters.task_body(make_task())
    assert body["status"] == "pending" and body["run"] == 1 and body["progress"] == 0
    assert body["output"] is None and body["error"] is None and body["user"] is None
    assert body["started_at"] is None and body["finished_at"] is None
    assert body["elapsed_ms"] == 0
    assert body["callback"] == {"url": None, "status": "none", "attempts": 0,
                                "last_status_code": None, "next_attempt_at": None,
                                "events": []}  # fmt: skip


def test_callback_body_fields_and_order():
    body = presenters.callback_body(finished_task(error="boom"))
    assert list(body) == ["event", "task_id", "run", "app_id", "status", *RESULT_KEYS, "queue",
                          "batch_id"]  # fmt: skip
    assert body["queue"] is None and body["batch_id"] is None
    assert body["event"] == "task.finished"
    assert body["task_id"] == str(TASK_ID) and body["app_id"] == str(APP_ID)
    assert body["run"] == 2 and body["status"] == "succeeded" and body["error"] == "boom"
    assert body["finished_at"] == "2025-03-04T05:06:11.140123Z"
    assert "callback" not in body and "elapsed_ms" not in body


def test_error_code_follows_error_in_both_bodies():
    task = make_task(status="failed", error="deadline exceeded: …", error_code="deadline_exceeded")
    for body in (presenters.task_body(task), presenters.callback_body(task)):
        keys = list(body)
        assert keys[keys.index("error") + 1] == "error_code"
        assert body["error_code"] == "deadline_exceeded"
    assert presenters.task_body(make_task())["error_code"] is None


def test_accepted_body(request_):
    body = presenters.accepted_body(request_, make_task())
    assert list(body) == ["task_id", "status", "poll_url", "stream_url", "created_at"]
    token = body.pop("stream_url").removeprefix(
        f"https://api.example.com/api/tasks/{TASK_ID}/events?token="
    )
    assert tokens.is_valid(TASK_ID, token) and not tokens.is_valid(APP_ID, token)
    assert body == {
        "task_id": str(TASK_ID),
        "status": "pending",
        "poll_url": f"https://api.example.com/api/tasks/{TASK_ID}",
        "created_at": "2025-03-04T05:06:07.890123Z",
    }


def test_poll_url_matches_reverse(request_):
    from django.urls import reverse

    assert presenters.poll_url(request_, make_task()) == request_.build_absolute_uri(
        reverse("api:task", args=[TASK_ID])
    )


def test_removed_task_body(request_):
    record = IdempotencyRecord(application_id=APP_ID, key="k", request_hash="h",
                               task_id=TASK_ID, status="failed", created_at=T0)  # fmt: skip
    body = presenters.removed_task_body(request_, record)
    assert list(body) == ["task_id", "status", "poll_url", "created_at"]
    assert body == {
        "task_id": str(TASK_ID),
        "status": "failed",
        "poll_url": f"https://api.example.com/api/tasks/{TASK_ID}",
        "created_at": "2025-03-04T05:06:07.890123Z",
    }


def test_elapsed_ms():
    task = make_task(started_at=T0)
    assert presenters.elapsed_ms(make_task()) == 0  # not started
    assert presenters.elapsed_ms(task, now=T0 + timedelta(milliseconds=1500)) == 1500
    assert presenters.elapsed_ms(task, now=T0 - timedelta(seconds=5)) == 0  # never negative
    task.finished_at = T0 + timedelta(milliseconds=42)
    assert presenters.elapsed_ms(task, now=T0 + timedelta(hours=1)) == 42  # finish wins over now


@pytest.mark.parametrize(
    ("age", "seconds"),
    [(0, 1), (1.99, 1), (2, 2), (4.99, 2), (5, 3), (14.99, 3), (15, 4), (59.99, 4), (60, 5),
     (86400, 5), (-10, 1)],
)  # fmt: skip
def test_retry_after_seconds_grows_with_age(age, seconds):
    task = make_task()
    assert presenters.retry_after_seconds(task, now=T0 + timedelta(seconds=age)) == seconds
