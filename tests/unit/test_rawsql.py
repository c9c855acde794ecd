"""The hand-written statements (tasks.sql, and tasks.plumbing.rawsql's builders) give exactly
what the ORM statements they replace give, on whichever backend the suite runs on."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.forms.models import model_to_dict
from django.utils import timezone

from tasks import sql, state
from tasks.delivery import callbacks
from tasks.models import (
    Application,
    AttemptTrigger,
    CallbackAttempt,
    CallbackStatus,
    Task,
    TaskStatus,
)
from tasks.plumbing import rawsql

pytestmark = pytest.mark.django_db

INPUTS = {"query": "héllo ☃ 🎉", "n": [1, 2.5, None, True], "deep": {"a": {"b": -0.0}}}
URL = "https://hooks.example/x?y=1"


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="raw", runner="echo", webhook_secret="whsec_x")


CREATED = timezone.now() - timedelta(minutes=1)  # one for all, so that two rows compare equal


def task(application, **fields) -> Task:
    defaults = {"inputs": INPUTS, "callback_url": URL, "response_mode": "async",
                "created_at": CREATED}  # fmt: skip
    return Task.objects.create(application=application, **{**defaults, **fields})


def row(pk) -> dict:
    values = Task.objects.filter(pk=pk).values().get()
    values.pop("id")
    return values


def without(values: dict, *names: str) -> dict:
    return {k: v for k, v in values.items() if k not in names}


def test_start_returning_is_the_orm_update_and_read(application):
    raw, orm = task(application), task(application)
    started = state.start_returning(task_id=raw.id, run=1, worker_name="w-1")
    now = timezone.now()
    assert (
        Task.objects.filter(pk=orm.pk, status="pending", run=1).update(
            status="running", started_at=now, worker_name="w-1", progress=0
        )
        == 1
    )
    read = Task.objects.values_list("inputs", "callback_url", "application_id",
                                    "response_mode", "callback_events",
                                    "deadline_at", "batch_id").get(pk=orm.pk)  # fmt: skip
    assert tuple(started) == read
    assert started == state.StartedRun(INPUTS, URL, application.id, "async", "", None, None)
    assert isinstance(started.application_id, uuid.UUID) and isinstance(started.inputs, dict)
    assert without(row(raw.pk), "started_at") == without(row(orm.pk), "started_at")
    assert abs(row(raw.pk)["started_at"] - now) < timedelta(seconds=5)
    # Losing: not pending any more, or another run.
    assert state.start_returning(task_id=raw.id, run=1) is None
    assert state.start_returning(task_id=task(application, run=2).id, run=1) is None


def test_start_returning_accepts_a_string_id_and_truncates_the_worker_name(application):
    raw = task(application)
    assert state.start_returning(task_id=str(raw.id), run=1, worker_name="w" * 300) is not None
    assert Task.objects.get(pk=raw.pk).worker_name == "w" * 255


@pytest.mark.parametrize("callback_url", [URL, ""])
def test_succeed_raw_path_is_the_orm_path(application, callback_url):
    raw = task(application, status="running", callback_url=callback_url)
    orm = task(application, status="running", callback_url=callback_url)
    output = {"text": "ok ☃", "items": [1, 2, {"x": None}]}
    assert state.succeed(task_id=raw.id, run=1, output=output, has_callback=bool(callback_url))
    assert state.succeed(task_id=orm.id, run=1, output=output, has_callback=None)
    assert without(row(raw.pk), "finished_at") == without(row(orm.pk), "finished_at")
    stored = row(raw.pk)
    assert stored["output"] == output and stored["progress"] == 100
    assert stored["status"] == TaskStatus.SUCCEEDED and stored["finished_at"] is not None
    expected = CallbackStatus.PENDING if callback_url else CallbackStatus.NONE
    assert stored["callback_status"] == expected
    # Both lose the same way.
    assert not state.succeed(task_id=raw.id, run=1, output=1, has_callback=True)
    assert not state.succeed(task_id=orm.id, run=1, output=1, has_callback=None)


@pytest.mark.parametrize("output", [None, [], "text", 0, {"nested": {"list": [1.5]}}])
def test_succeed_stores_every_json_output_alike(application, output):
    raw = task(application, status="running")
    orm = task(application, status="running")
    state.succeed(task_id=raw.id, run=1, output=output, has_callback=True)
    state.succeed(task_id=orm.id, run=1, output=output)
    assert Task.objects.get(pk=raw.pk).output == Task.objects.get(pk=orm.pk).output == output


def test_insert_stores_the_same_row_as_create(application):
    created_at = timezone.now() - timedelta(minutes=3)
    fields = {
        "application": application, "inputs": INPUTS, "callback_url": URL, "user": "u-1",
        "idempotency_key": None, "request_hash": "ab" * 32, "response_mode": "blocking",
        "created_at": created_at,
    }  # fmt: skip
    raw = Task(**fields)
    rawsql.insert(raw)
    assert raw._state.adding is False and raw._state.db == connection.alias
    orm = Task.objects.create(**fields)
    assert row(raw.pk) == row(orm.pk)
    loaded = Task.objects.get(pk=raw.pk)
    assert model_to_dict(loaded, exclude=["id"]) == model_to_dict(raw, exclude=["id"])
    assert loaded.created_at == created_at and loaded.idempotency_key is None


def test_insert_with_an_idempotency_key_and_an_attempt_row(application):
    raw = Task(application=application, inputs={}, idempotency_key="key-1")
    rawsql.insert(raw)
    assert Task.objects.get(idempotency_key="key-1").pk == raw.pk
    attempt = CallbackAttempt(task=raw, run=1, number=1, trigger="auto",
                              started_at=timezone.now(), url=URL, status_code=503)  # fmt: skip
    rawsql.insert(attempt)  # an AutoField primary key: left to the database
    stored = CallbackAttempt.objects.get(task=raw)
    assert (stored.number, stored.status_code, stored.delivered) == (1, 503, False)


def test_update_statement_is_the_orm_update(application):
    raw, orm = task(application), task(application)
    values = {"callback_status": "failed", "callback_last_status_code": 502,
              "callback_next_attempt_at": None}  # fmt: skip
    assert rawsql.execute(rawsql.update_statement(Task, where={"id": raw.id, "run": 1},
                                                  values=values)) == 1  # fmt: skip
    assert Task.objects.filter(id=orm.id, run=1).update(**values) == 1
    assert row(raw.pk) == row(orm.pk)
    assert rawsql.execute(rawsql.update_statement(Task, where={"id": raw.id, "run": 9},
                                                  values=values)) == 0  # fmt: skip


def finished(application, **fields) -> Task:
    defaults = {"status": "succeeded", "output": {"text": "é"}, "user": "u",
                "started_at": timezone.now() - timedelta(seconds=2), "finished_at": timezone.now(),
                "callback_status": CallbackStatus.PENDING}  # fmt: skip
    return task(application, **{**defaults, **fields})


def test_claim_attempt_returns_what_its_docstring_says(application):
    claimable = finished(
        application,
        callback_attempts=2,
        callback_next_attempt_at=timezone.now() + timedelta(minutes=1),
    )
    claimed = callbacks._claim_attempt(claimable.id, 1, AttemptTrigger.AUTO)
    stored = Task.objects.get(pk=claimable.pk)
    # The next attempt number is reserved (and returned), the callback is delivering, and an
    # automatic attempt clears its due time.
    assert claimed.callback_attempts == stored.callback_attempts == 3
    assert stored.callback_status == CallbackStatus.DELIVERING
    assert stored.callback_next_attempt_at is None
    # What the delivery needs, loaded as the ORM loads it; everything else deferred.
    for name in sql.CLAIMED_FIELDS:
        attname = Task._meta.get_field(name).attname
        assert getattr(claimed, attname) == getattr(stored, attname), name
    assert claimed.get_deferred_fields() >= {"inputs", "traceback", "callback_status"}
    assert not claimed.get_deferred_fields() & {"output", "callback_url", "created_at"}
    # The application, current as of its updated_at.
    assert claimed.application == application
    assert claimed.application.updated_at == Application.objects.get(pk=application.pk).updated_at


def test_claim_attempt_numbers_are_never_shared(application):
    claimable = finished(application, callback_status=CallbackStatus.DELIVERED)
    numbers = [callbacks._claim_attempt(claimable.id, 1, AttemptTrigger.MANUAL).callback_attempts
               for _ in range(3)]  # fmt: skip
    assert numbers == [1, 2, 3]


def test_claim_attempt_sees_a_rotated_secret_at_once(application):
    claimable = finished(application)
    callbacks._claim_attempt(claimable.id, 1, AttemptTrigger.MANUAL)  # caches the application
    Application.objects.filter(pk=application.pk).update(
        webhook_secret="whsec_rotated", updated_at=timezone.now() + timedelta(seconds=1)
    )
    again = callbacks._claim_attempt(claimable.id, 1, AttemptTrigger.MANUAL)
    assert again.application.webhook_secret == "whsec_rotated"


@pytest.mark.parametrize(
    ("fields", "run", "trigger"),
    [
        ({"callback_url": ""}, 1, AttemptTrigger.AUTO),  # no callback
        ({"callback_url": ""}, 1, AttemptTrigger.MANUAL),
        ({}, 2, AttemptTrigger.AUTO),  # another run
        ({"status": "running", "finished_at": None}, 1, AttemptTrigger.MANUAL),  # not finished
        ({"status": "cancelled"}, 1, AttemptTrigger.MANUAL),
        ({"callback_status": CallbackStatus.DELIVERED}, 1, AttemptTrigger.AUTO),  # settled
        ({"callback_status": CallbackStatus.FAILED}, 1, AttemptTrigger.AUTO),
    ],
)
def test_claim_attempt_is_none_when_there_is_nothing_to_deliver(application, fields, run,
                                                                 trigger):  # fmt: skip
    unclaimable = finished(application, **fields)
    before = row(unclaimable.pk)
    assert callbacks._claim_attempt(unclaimable.id, run, trigger) is None
    assert row(unclaimable.pk) == before  # nothing reserved


def test_claim_attempt_of_a_failed_task_and_a_manual_after_settling(application):
    failed = finished(application, status="failed", error="boom", output=None)
    claimed = callbacks._claim_attempt(str(failed.id), 1, AttemptTrigger.AUTO)
    assert (claimed.status, claimed.error, claimed.output) == ("failed", "boom", None)
    Task.objects.filter(pk=failed.pk).update(callback_status=CallbackStatus.FAILED)
    assert callbacks._claim_attempt(failed.id, 1, AttemptTrigger.AUTO) is None
    manual = callbacks._claim_attempt(failed.id, 1, AttemptTrigger.MANUAL)
    assert manual.callback_attempts == 2


# --- every statement of tasks.sql against its ORM twin --------------------------------------


def test_start_run_and_its_orm_twin_agree(application):
    raw, orm = task(application), task(application)
    now = timezone.now()
    common = {"run": 1, "worker_name": "w", "now": now, "to": "running", "expected": "pending"}
    assert sql.start_run(task_id=raw.id, **common) == sql.start_run_orm(task_id=orm.id, **common)
    assert row(raw.pk) == row(orm.pk)
    # Both lose alike (no longer pending).
    assert sql.start_run(task_id=raw.id, **common) is sql.start_run_orm(task_id=orm.id, **common)


@pytest.mark.parametrize(
    ("bound", "seconds", "starts"),
    [("start_by", 1, True), ("start_by", 0, False), ("start_by", -1, False),
     ("deadline_at", 1, True), ("deadline_at", 0, False), ("deadline_at", -1, False)],
)  # fmt: skip
def test_start_run_and_its_orm_twin_refuse_a_run_past_a_bound(application, bound, seconds, starts):
    now = timezone.now()
    at = now + timedelta(seconds=seconds)
    raw, orm = task(application, **{bound: at}), task(application, **{bound: at})
    common = {"run": 1, "worker_name": "w", "now": now, "to": "running", "expected": "pending"}
    started = sql.start_run(task_id=raw.id, **common)
    assert started == sql.start_run_orm(task_id=orm.id, **common)
    assert (started is not None) is starts and row(raw.pk) == row(orm.pk)
    if starts and bound == "deadline_at":
        assert started.deadline_at == at  # the worker knows the run's deadline from the start


@pytest.mark.parametrize("callback", list(CallbackStatus))
@pytest.mark.parametrize("automatic", [True, False])
def test_claim_attempt_and_its_orm_twin_agree(application, callback, automatic):
    now = timezone.now()
    same = {"callback_status": callback, "callback_attempts": 1, "callback_next_attempt_at": now,
            "started_at": now - timedelta(seconds=2), "finished_at": now}  # fmt: skip
    raw, orm = finished(application, **same), finished(application, **same)
    expected = ("pending", "delivering") if automatic else ("pending", "delivering", "failed")
    common = {"run": 1, "to": "delivering", "expected": expected,
              "task_statuses": ("succeeded", "failed"),
              "clear_next_attempt": automatic}  # fmt: skip
    got_raw = sql.claim_attempt(task_id=raw.id, **common)
    got_orm = sql.claim_attempt_orm(task_id=orm.id, **common)
    assert (got_raw is None) == (got_orm is None) == (callback not in expected)
    assert row(raw.pk) == row(orm.pk)
    if got_raw is not None:
        for name in sql.CLAIMED_FIELDS:
            if name != "id":
                attname = Task._meta.get_field(name).attname
                assert getattr(got_raw.task, attname) == getattr(got_orm.task, attname), name
        assert got_raw.application_updated_at == got_orm.application_updated_at


def test_poll_and_its_orm_twin_agree(application):
    stored = finished(application, callback_last_status_code=500)
    raw = sql.poll(task_id=stored.id, application_id=application.id)
    orm = sql.poll_orm(task_id=stored.id, application_id=application.id)
    for name in sql.POLL_FIELDS:
        attname = Task._meta.get_field(name).attname
        assert getattr(raw, attname) == getattr(orm, attname), name
    assert raw.get_deferred_fields() == orm.get_deferred_fields()
    other = Application.objects.create(name="other", runner="echo", webhook_secret="whsec_y")
    assert sql.poll(task_id=stored.id, application_id=other.id) is None
    assert sql.poll_orm(task_id=stored.id, application_id=other.id) is None


def test_stuck_counts_and_their_orm_twin_agree(application):
    now = timezone.now()
    strict = Application.objects.create(
        name="strict", runner="echo", webhook_secret="whsec_s",
        queue_threshold_seconds=10, run_threshold_seconds=10,
    )  # fmt: skip
    for app in (application, strict):
        for minutes in (0, 1, 30, 60 * 24):
            task(app, created_at=now - timedelta(minutes=minutes))
            task(app, status="running", created_at=now - timedelta(minutes=minutes),
                 started_at=now - timedelta(minutes=minutes))  # fmt: skip
        task(app, status="succeeded", created_at=now - timedelta(days=2))
    apps = [application, strict]
    for cap in (1, 2, 100):
        raw = sql.stuck_counts(apps, now=now, cap=cap, per_statement=1)
        assert raw == sql.stuck_counts_orm(apps, now=now, cap=cap)
        assert raw[str(strict.pk), "stuck_pending"] == min(cap, 3)
