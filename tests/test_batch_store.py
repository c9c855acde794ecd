"""Storing a batch's items (tasks.batches.store): COPY on PostgreSQL, INSERTs elsewhere; a row
stored either way reads back as bulk_create's, field by field (values the items share
included); in the caller's transaction (rolled back, nothing left; a unique key's violation
is Django's IntegrityError)."""

from __future__ import annotations

import copy
import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from tasks.batches import store
from tasks.models import Batch, Task
from tasks.plumbing import rawsql

# Values COPY's text format must escape (tab, newline, backslash, "\N"), and non-ASCII.
AWKWARD = 'tab\there\nnew line \\N back\\slash "quoted" ü 😀 \x7f'
FIELDS = tuple(field.attname for field in Task._meta.concrete_fields)


class Rollback(Exception):
    pass


def full_items(app, count: int = 3) -> list[Task]:
    """Unsaved items with every field away from its default, as varied as the columns allow."""
    now = timezone.now().replace(microsecond=123456)
    batch = Batch(application=app.application, total=count, created_at=now)
    rawsql.insert(batch)
    return [
        Task(
            application=app.application, batch=batch, batch_index=index, status="running",
            run=index + 2, inputs={"text": AWKWARD, "n": [1, 2.5, None, True], "nested": {}},
            output=[AWKWARD, {"k": index}] if index else None, error=AWKWARD,
            traceback="", progress=50 + index, user=f"user {AWKWARD}", response_mode="async",
            idempotency_key=f"key-{index}" if index else None, request_hash="ab" * 32,
            created_at=now, started_at=now + timedelta(seconds=1), finished_at=None,
            worker_name="w-1", cancel_requested=bool(index % 2),
            callback_url="https://example.com/hook?a=1&b=\\N", callback_status="pending",
            callback_attempts=index, callback_last_status_code=502 if index else None,
            callback_next_attempt_at=now + timedelta(hours=1), callback_events="task.started",
            streamed_output=AWKWARD * 3, priority="high", concurrency_key=f"batch:{batch.id}",
            queued_at=now, deadline_at=now + timedelta(days=1), start_by=None,
            error_code="deadline_exceeded" if index else None, auto_retry=False,
            auto_retries=index, error_fingerprint="f" * 16, callback_error_fingerprint="",
        )
        for index in range(count)
    ]  # fmt: skip


def stored(ids: list[uuid.UUID]) -> list[tuple]:
    return list(Task.objects.filter(pk__in=ids).order_by("batch_index").values_list(*FIELDS))


@pytest.fixture
def path_taken(monkeypatch) -> list[str]:
    """Which way insert_items stored the rows: psycopg's COPY, or bulk_create (never: its
    rows are the reference here, not the way)."""
    taken: list[str] = []
    original = Task.objects.bulk_create

    def bulk_create(*args, **kwargs):
        taken.append("bulk_create")
        return original(*args, **kwargs)

    monkeypatch.setattr(Task.objects, "bulk_create", bulk_create)
    if connection.vendor == "postgresql":
        import psycopg

        copy = psycopg.Cursor.copy

        def recorded(self, statement, *args, **kwargs):
            taken.append(str(statement).split(" ", 1)[0])
            return copy(self, statement, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "copy", recorded)
    return taken


def test_a_stored_item_reads_back_as_bulk_creates_field_by_field(make_app, path_taken):
    items = full_items(make_app())
    ids = [item.pk for item in items]
    with pytest.raises(Rollback), transaction.atomic():
        store.insert_items(copy.deepcopy(items))
        through_store = stored(ids)
        raise Rollback
    assert not Task.objects.filter(pk__in=ids).exists()  # the caller's transaction, rolled back
    assert path_taken == (["COPY"] if connection.vendor == "postgresql" else [])
    path_taken.clear()

    Task.objects.bulk_create(copy.deepcopy(items))
    through_bulk_create = stored(ids)
    assert len(through_store) == len(items)
    for ours, theirs in zip(through_store, through_bulk_create, strict=True):
        assert dict(zip(FIELDS, ours, strict=True)) == dict(zip(FIELDS, theirs, strict=True))
    # And as the objects held them (JSON, text and times intact through COPY's escaping).
    loaded = Task.objects.get(pk=items[1].pk)
    assert loaded.inputs == items[1].inputs
    assert loaded.output == [AWKWARD, {"k": 1}]
    assert loaded.streamed_output == AWKWARD * 3
    assert loaded.created_at == items[1].created_at
    assert Task.objects.get(pk=items[0].pk).output is None  # SQL NULL, not JSON null


def test_items_are_saved_instances_after_insert(make_app):
    items = full_items(make_app(), count=2)
    store.insert_items(items)
    assert all(not item._state.adding and item._state.db == "default" for item in items)
    items[0].progress = 99
    items[0].save(update_fields=["progress"])  # an UPDATE of the stored row, not an INSERT
    assert Task.objects.get(pk=items[0].pk).progress == 99


def test_a_taken_idempotency_key_raises_djangos_integrity_error(make_app):
    app = make_app()
    Task.objects.create(application=app.application, inputs={}, idempotency_key="key-1")
    items = full_items(app)  # its item 1 names key-1 again
    with pytest.raises(IntegrityError), transaction.atomic():
        store.insert_items(items)
    assert not Task.objects.filter(pk__in=[item.pk for item in items]).exists()


def test_many_items_in_one_call(make_app):
    app = make_app()
    batch = Batch(application=app.application, total=1200, created_at=timezone.now())
    rawsql.insert(batch)
    items = [Task(application=app.application, batch=batch, batch_index=index,
                  inputs={"n": index}) for index in range(1200)]  # fmt: skip
    store.insert_items(items)
    assert list(
        Task.objects.filter(batch=batch).order_by("batch_index").values_list("inputs", flat=True)
    ) == [{"n": index} for index in range(1200)]


def test_no_items_store_nothing(make_app, path_taken):
    store.insert_items([])
    assert path_taken == []
