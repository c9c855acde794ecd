"""Storing a batch a chunk at a time (tasks.batches.ingest.submit_batch): each chunk its own
transaction and enqueued once committed, the batch never settled before its last item is
stored, and a failure part way — the database refusing a chunk, an item's key taken
meanwhile, the request dying — leaves nothing behind; a repeat of its Idempotency-Key while it
is stored is told to wait."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rq.queue import Queue

from tasks.batches import completion, ingest, store
from tasks.models import Batch, Task
from tasks.plumbing.queueing import redis_client
from tasks.scheduling import lanes
from tasks.upkeep.reconciler import reconcile
from tests.conftest import clean_redis
from tests.test_batches import post_batch, submit_batch


@pytest.fixture
def _clean(private_queues, transactional_db):
    clean_redis()
    yield
    clean_redis()


def lane(priority: str = "normal") -> list[str]:
    return Queue(lanes.queue_name(priority), connection=redis_client()).get_job_ids()


def request(n: int, **fields) -> ingest.BatchRequest:
    return ingest.parse_batch_body({"items": [{"inputs": {"n": i}} for i in range(n)], **fields})


def transactions_of(monkeypatch, size: int) -> None:
    """`size` items a transaction (each one chunk) on either backend."""
    monkeypatch.setattr(ingest, "SQLITE_STORE_CHUNK", size)
    monkeypatch.setattr(ingest, "TRANSACTION_ITEMS", size)
    monkeypatch.setattr(ingest, "STORE_CHUNK", size)


def on_each_write(monkeypatch, before_write) -> None:
    """Call `before_write(prepared)` as each chunk is written, in its transaction."""
    real = store.rows_writer

    @contextlib.contextmanager
    def rows_writer():
        with real() as write:

            def write_seen(prepared):
                before_write(prepared)
                write(prepared)

            yield write_seen

    monkeypatch.setattr(store, "rows_writer", rows_writer)


@pytest.mark.usefixtures("_clean")
def test_chunks_are_stored_and_enqueued_in_turn_and_the_batch_settles_only_at_the_end(
    make_app, monkeypatch
):
    app = make_app("echo").application
    transactions_of(monkeypatch, 3)
    seen: list[tuple[int, int, bool]] = []
    real_enqueue = ingest.enqueue_fresh_tasks

    def enqueue(*, tasks, application):
        batch_id = tasks[0].batch_id
        # Every item stored so far has ended: the batch must not settle while it is stored.
        Task.objects.filter(batch_id=batch_id).update(status="succeeded")
        seen.append((len(tasks), len(lane()), completion.settle(batch_id=batch_id)))
        real_enqueue(tasks=tasks, application=application)

    monkeypatch.setattr(ingest, "enqueue_fresh_tasks", enqueue)
    before = len(lane())
    batch, created = ingest.submit_batch(application=app, request=request(8))
    assert created and [size for size, _, _ in seen] == [3, 3, 2]
    # Each chunk enqueued once stored (and the one before it: of the first 8 items,
    # BATCH_CONCURRENCY, enter the lane).
    assert [queued - before for _, queued, _ in seen] == [0, 3, 6], seen
    assert not any(settled for _, _, settled in seen)
    batch.refresh_from_db()
    assert batch.ingesting is False and Task.objects.filter(batch=batch).count() == 8


@pytest.mark.skipif("connection.vendor != 'postgresql'")
@pytest.mark.usefixtures("_clean")
def test_on_postgresql_a_transactions_chunks_stream_through_one_copy_then_are_enqueued(
    make_app, monkeypatch
):
    import psycopg

    app = make_app("echo").application
    monkeypatch.setattr(ingest, "TRANSACTION_ITEMS", 6)
    monkeypatch.setattr(ingest, "STORE_CHUNK", 2)
    statements: list[str] = []
    copy = psycopg.Cursor.copy

    def recorded(self, statement, *args, **kwargs):
        statements.append(str(statement).split(" ", 1)[0])
        return copy(self, statement, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "copy", recorded)
    writes: list[tuple[int, int]] = []
    on_each_write(monkeypatch, lambda prepared: writes.append((len(prepared.rows), len(lane()))))
    before = len(lane())
    batch, _ = ingest.submit_batch(application=app, request=request(9))
    # Two transactions (6 items, then 3), one COPY each; enqueued once each has committed.
    assert statements == ["COPY", "COPY"]
    assert writes == [(2, before), (2, before), (2, before), (2, before + 6), (1, before + 6)]
    assert list(Task.objects.filter(batch=batch).order_by("batch_index")
                .values_list("batch_index", flat=True)) == list(range(9))  # fmt: skip


@pytest.mark.skipif("connection.vendor != 'sqlite'")
@pytest.mark.usefixtures("_clean")
def test_on_sqlite_each_chunk_commits_alone_then_pauses_and_the_committed_are_enqueued_together(
    make_app, monkeypatch
):
    import sqlite3
    import types

    app = make_app("echo").application
    monkeypatch.setattr(ingest, "SQLITE_STORE_CHUNK", 2)
    monkeypatch.setattr(ingest, "STORE_CHUNK", 6)
    other = sqlite3.connect(connection.settings_dict["NAME"])  # sees committed rows only
    table = Task._meta.db_table
    seen: list[tuple] = []

    def written(prepared):
        query = f"SELECT count(*) FROM {table} WHERE batch_id IS NOT NULL"
        seen.append((len(prepared.rows), other.execute(query).fetchone()[0], len(lane())))

    on_each_write(monkeypatch, written)
    monkeypatch.setattr(ingest, "time", types.SimpleNamespace(sleep=lambda s: seen.append(s)))
    before = len(lane())
    batch, _ = ingest.submit_batch(application=app, request=request(9))
    other.close()
    # Each chunk its own transaction, then a pause with SQLite's lock free; enqueued 6 at a time.
    pause = ingest.SQLITE_CHUNK_PAUSE_SECONDS
    assert seen == [(2, 0, before), pause, (2, 2, before), pause, (2, 4, before), pause,
                    (2, 6, before + 6), pause, (1, 8, before + 6), pause], seen  # fmt: skip
    assert Task.objects.filter(batch=batch).count() == 9


@pytest.mark.usefixtures("_clean")
def test_a_batch_whose_items_all_ended_while_it_was_stored_settles_at_the_end(
    make_app, monkeypatch
):
    app = make_app("echo").application
    transactions_of(monkeypatch, 2)
    real_enqueue = ingest.enqueue_fresh_tasks

    def enqueue_and_finish(*, tasks, application):
        real_enqueue(tasks=tasks, application=application)
        Task.objects.filter(pk__in=[task.pk for task in tasks]).update(status="succeeded")

    monkeypatch.setattr(ingest, "enqueue_fresh_tasks", enqueue_and_finish)
    batch, _ = ingest.submit_batch(application=app, request=request(4))
    batch.refresh_from_db()
    assert (batch.status, batch.completions, batch.ingesting) == ("finished", 1, False)


@pytest.mark.usefixtures("_clean")
def test_a_chunk_refused_part_way_leaves_nothing(make_app, monkeypatch):
    app = make_app("echo").application
    transactions_of(monkeypatch, 3)
    calls = []

    def before_write(prepared):
        calls.append(len(prepared.rows))
        if len(calls) == 3:
            raise RuntimeError("the database refused the chunk")

    on_each_write(monkeypatch, before_write)
    with pytest.raises(RuntimeError):
        ingest.submit_batch(application=app, request=request(9))
    assert calls == [3, 3, 3]
    assert not Batch.objects.exists() and not Task.objects.exists()
    # The jobs of the chunks enqueued before name tasks that are gone: a worker skips them.
    assert len(lane()) == 6


@pytest.mark.usefixtures("_clean")
def test_an_item_key_taken_while_the_batch_is_stored_refuses_it_whole(
    make_app, client, monkeypatch
):
    app = make_app("echo")
    transactions_of(monkeypatch, 2)
    real_enqueue = ingest.enqueue_fresh_tasks

    def enqueue(*, tasks, application):
        real_enqueue(tasks=tasks, application=application)
        if tasks[0].batch_index == 0:  # between two chunks, another client takes item 3's key
            Task.objects.create(application=app.application, inputs={}, idempotency_key="k3")

    monkeypatch.setattr(ingest, "enqueue_fresh_tasks", enqueue)
    items = [{"inputs": {"n": n}, "idempotency_key": f"k{n}"} for n in range(4)]
    response = post_batch(client, app, {"items": items})
    assert response.status_code == 409
    assert response.json()["error"]["field"] == "items[3].idempotency_key"
    assert not Batch.objects.exists()
    assert list(Task.objects.values_list("idempotency_key", flat=True)) == ["k3"]


@pytest.mark.usefixtures("_clean")
def test_a_repeat_while_the_batch_is_stored_waits_and_one_whose_request_died_starts_over(
    make_app, client
):
    app = make_app("echo")
    body = {"items": [{"inputs": {"n": 1}}]}
    parsed = ingest.parse_batch_body(body)
    storing = Batch.objects.create(
        application=app.application, total=5, idempotency_key="nightly",
        request_hash=parsed.request_hash, ingesting=True,
    )  # fmt: skip
    response = post_batch(client, app, body, **{"Idempotency-Key": "nightly"})
    assert response.status_code == 409 and response["Retry-After"] == "2"
    assert response.json()["error"]["field"] == "Idempotency-Key"
    assert Batch.objects.get().pk == storing.pk
    # Its request died long ago: abandoned, and this repeat stores the batch anew.
    Batch.objects.filter(pk=storing.pk).update(created_at=timezone.now() - timedelta(hours=1))
    again = submit_batch(client, app, body["items"])
    assert Batch.objects.filter(pk=again["batch_id"]).exists()
    response = post_batch(client, app, body, **{"Idempotency-Key": "nightly"})
    assert response.status_code == 200 and response.json()["batch_id"] != str(storing.pk)
    assert not Batch.objects.filter(pk=storing.pk).exists()


@pytest.mark.usefixtures("_clean")
def test_the_reconciler_abandons_a_batch_whose_request_died_while_storing_it(make_app):
    app = make_app("echo").application
    batch, _ = ingest.submit_batch(application=app, request=request(4))
    Batch.objects.filter(pk=batch.pk).update(
        ingesting=True,
        created_at=timezone.now() - timedelta(seconds=ingest.INGEST_STALE_SECONDS + 5),
    )
    fresh, _ = ingest.submit_batch(application=app, request=request(2))
    Batch.objects.filter(pk=fresh.pk).update(ingesting=True)  # still being stored: left
    report = reconcile()
    assert report.batches_abandoned == 1
    assert not Batch.objects.filter(pk=batch.pk).exists()
    assert not Task.objects.filter(batch_id=batch.pk).exists()
    assert Batch.objects.filter(pk=fresh.pk).exists()


def test_rows_copied_from_a_first_one_store_as_each_built_alone(make_app):
    """submission.new_tasks shares the first row's values with the others (and store.prepare
    prepares a shared value once, a row's own ones, ITEM_OWN_FIELDS, each): what each row holds
    of its own (inputs, user, key, deadline, retry, index, default key) is stored, the rest as
    the first's."""
    from tasks.submission import ITEM_OWN_FIELDS, SubmitRequest, new_task, new_tasks

    app = make_app("echo").application
    batch = Batch.objects.create(application=app, total=3)
    requests = [
        SubmitRequest(inputs={"n": n}, response_mode="async", user=f"u{n}", callback_url="",
                      concurrency_key="k" if n else "", retry=n != 1,
                      deadline_seconds=None if n else 30.0)
        for n in range(3)
    ]  # fmt: skip
    keys = [None, "key-1", None]
    now = timezone.now()
    shared = new_tasks(application=app, requests=requests, keys=keys, now=now, batch=batch,
                       first_index=0, default_key="batch-own")  # fmt: skip
    alone = [new_task(application=app, request=request, idempotency_key=key, now=now,
                      batch=batch)
             for request, key in zip(requests, keys, strict=True)]  # fmt: skip
    for index, (one, other) in enumerate(zip(shared, alone, strict=True)):
        assert one.batch_index == index
        other.batch_index = index
        other.concurrency_key = other.concurrency_key or "batch-own"
        other.idempotency_key = f"alone-{index}" if other.idempotency_key else None
        one.idempotency_key = f"shared-{index}" if one.idempotency_key else None
    store.insert_items(store.prepare(shared, own=ITEM_OWN_FIELDS))
    store.insert_items(alone)  # every row's values looked at
    fields = [f.attname for f in Task._meta.concrete_fields if f.attname not in ("id",)]

    def read(rows):
        return [Task.objects.filter(pk=row.pk).values(*fields).get() for row in rows]

    ours, theirs = read(shared), read(alone)
    for mine, other in zip(ours, theirs, strict=True):
        assert mine.pop("idempotency_key", None) != "x"  # set apart above (unique per app)
        other.pop("idempotency_key", None)
        assert mine == other
    assert [row["inputs"] for row in ours] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [row["auto_retry"] for row in ours] == [True, False, True]
    assert ours[0]["deadline_at"] is not None and ours[1]["deadline_at"] is None
    assert [row["concurrency_key"] for row in ours] == ["batch-own", "k", "k"]
    assert len({row.pk for row in shared}) == 3
