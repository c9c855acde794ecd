"""Batches: many tasks in one request (README: Batches). Each item is an ordinary task, linked
to its batch by `Task.batch` / `batch_index`; the batch's counts and status are read from its
items (one aggregate query on the partial index task_batch_part_idx), never kept in step.

Ingestion validates every item before anything is stored, inserts the batch and its items in
one transaction (bulk INSERTs), then enqueues the items a pipeline per few hundred
(submission.enqueue_fresh_tasks). Items wait as one end user: their `concurrency_key` is
`batch:<batch id>` unless the item names its own, so a batch takes at most the application's
`max_concurrency_per_key` workers and never stands in front of another user's task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from django.db import IntegrityError, transaction
from django.db.models import Count, Max
from django.utils import timezone

from tasks import idempotency, state
from tasks.events import catalog
from tasks.events import stream as event_stream
from tasks.idempotency import IdempotencyConflict
from tasks.models import Application, Batch, IdempotencyRecord, Task
from tasks.plumbing import rawsql
from tasks.plumbing.queueing import publish_finished, redis_client, task_job_id
from tasks.scheduling import dispatch, fairness
from tasks.statuses import FINISHED, UNFINISHED, TaskStatus
from tasks.submission import (
    SubmitRequest,
    ValidationFailed,
    enqueue_fresh_tasks,
    new_task,
    parse_submit_body,
    validate_idempotency_key,
)

logger = logging.getLogger(__name__)

MAX_ITEMS = 10_000
INSERT_CHUNK = 500  # rows per INSERT (SQLite's bound on a statement's parameters)
CANCEL_CHUNK = 500  # items per UPDATE of a cancel
RESULTS_LIMIT = 1000
RESULTS_MAX_LIMIT = 10_000
# Set on the batch for all its items; an item naming one is refused rather than ignored.
BATCH_LEVEL_FIELDS = ("response_mode", "priority", "callback_url", "callback_events")
COUNTED = ("pending", "running", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class BatchRequest:
    items: list[SubmitRequest]
    item_keys: list[str | None]  # each item's own Idempotency-Key (its task's)
    callback_url: str
    callback_events: str
    priority: str | None
    metadata: dict[str, Any]
    request_hash: str  # of the whole decoded body: what a repeated Idempotency-Key must repeat


def parse_batch_body(body: Any) -> BatchRequest:
    """Validate a decoded batch body, every item with the single submit's rules
    (submission.parse_submit_body); raises ValidationFailed naming the item (`items[3].inputs`)."""
    if not isinstance(body, dict):
        raise ValidationFailed(None, "The request body must be a JSON object.")
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise ValidationFailed("items", "items must be a non-empty list of objects.")
    if len(items) > MAX_ITEMS:
        raise ValidationFailed("items", f"A batch holds at most {MAX_ITEMS} items.")
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValidationFailed("metadata", "metadata must be a JSON object.")
    # The batch-level fields with the single submit's rules (an item with empty inputs).
    shared = {name: body[name] for name in BATCH_LEVEL_FIELDS[1:] if name in body}
    head = parse_submit_body({"inputs": {}, "metadata": metadata, **shared})
    parsed: list[SubmitRequest] = []
    keys: list[str | None] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        where = f"items[{index}]"
        if not isinstance(item, dict):
            raise ValidationFailed(where, f"{where} must be a JSON object.")
        for name in BATCH_LEVEL_FIELDS:
            if name in item:
                raise ValidationFailed(f"{where}.{name}", f"{name} is set on the batch only.")
        raw_key = item.get("idempotency_key")
        fields = {name: value for name, value in item.items() if name != "idempotency_key"}
        try:
            request = parse_submit_body({**fields, "response_mode": "async"})
            if raw_key is not None and not isinstance(raw_key, str):
                raise ValidationFailed("idempotency_key", "idempotency_key must be a string.")
            key = validate_idempotency_key(raw_key)
        except ValidationFailed as exc:
            field = f"{where}.{exc.field}" if exc.field else where
            if exc.field == "Idempotency-Key":
                field = f"{where}.idempotency_key"
            raise ValidationFailed(field, f"{where}: {exc.message}") from None
        if key is not None:
            if key in seen:
                raise ValidationFailed(
                    f"{where}.idempotency_key", f"{where}: idempotency_key repeats an earlier item."
                )
            seen.add(key)
        # The batch's own fields, checked once above (the callback URL's SSRF check included).
        parsed.append(dataclasses.replace(
            request, callback_url=head.callback_url, callback_events=head.callback_events,
            priority=head.priority,
        ))  # fmt: skip
        keys.append(key)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return BatchRequest(
        items=parsed,
        item_keys=keys,
        callback_url=head.callback_url,
        callback_events=head.callback_events,
        priority=head.priority,
        metadata=metadata,
        request_hash=hashlib.sha256(canonical.encode()).hexdigest(),
    )


class ItemKeyTaken(Exception):
    """An item's idempotency_key already names a task of the application (in its window)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def submit_batch(
    *, application: Application, request: BatchRequest, idempotency_key: str | None = None
) -> tuple[Batch, bool]:
    """Store the batch and its items in one transaction, then enqueue the items. Returns
    (batch, created); a repeated Idempotency-Key returns the first batch. Raises
    IdempotencyConflict (the key with another body) or ItemKeyTaken."""
    if idempotency_key:
        existing = _existing_batch(application, idempotency_key, request.request_hash)
        if existing is not None:
            return existing, False
    now = timezone.now()
    batch = Batch(
        application=application, total=len(request.items), callback_url=request.callback_url,
        callback_events=request.callback_events,
        priority=request.priority or application.default_priority, metadata=request.metadata,
        idempotency_key=idempotency_key,
        request_hash=request.request_hash if idempotency_key else "", created_at=now,
    )  # fmt: skip
    items = [
        new_task(
            application=application, now=now, batch=batch, batch_index=index,
            request=dataclasses.replace(
                item, priority=batch.priority,
                concurrency_key=item.concurrency_key or f"batch:{batch.id}",
            ),
            idempotency_key=key,
        )
        for index, (item, key) in enumerate(zip(request.items, request.item_keys, strict=True))
    ]  # fmt: skip
    try:
        with transaction.atomic():
            _check_item_keys(application, request.item_keys)
            rawsql.insert(batch)
            Task.objects.bulk_create(items, batch_size=INSERT_CHUNK)
    except IntegrityError:
        if idempotency_key:  # a concurrent request with the same key won: its batch
            existing = _existing_batch(application, idempotency_key, request.request_hash)
            if existing is not None:
                return existing, False
        _check_item_keys(application, request.item_keys)  # an item key's race: name it
        raise
    enqueue_fresh_tasks(tasks=items, application=application)
    return batch, True


def _existing_batch(application: Application, key: str, request_hash: str) -> Batch | None:
    """idempotency.existing_for_key's rules for a batch's key: its window, then same body or
    IdempotencyConflict."""
    found = Batch.objects.filter(application=application, idempotency_key=key).first()
    if found is None:
        return None
    if found.created_at < idempotency.window_start():
        Batch.objects.filter(pk=found.pk, idempotency_key=key).update(idempotency_key=None)
        return None
    if found.request_hash != request_hash:
        raise IdempotencyConflict
    return found


def _check_item_keys(application: Application, keys: list[str | None]) -> None:
    """Refuse the batch when an item's key names a task (or the record of one) in its window;
    a key past its window is freed, as for a single submit."""
    wanted = {key: index for index, key in enumerate(keys) if key is not None}
    if not wanted:
        return
    start = idempotency.window_start()
    stale: list[uuid.UUID] = []
    for names in _chunks(list(wanted), INSERT_CHUNK):
        for pk, key, created_at in Task.objects.filter(
            application=application, idempotency_key__in=names
        ).values_list("pk", "idempotency_key", "created_at"):
            if created_at >= start:
                raise ItemKeyTaken(wanted[str(key)])
            stale.append(pk)
        record = (
            IdempotencyRecord.objects.filter(
                application=application, key__in=names, created_at__gte=start
            )
            .values_list("key", flat=True)
            .first()
        )
        if record is not None:
            raise ItemKeyTaken(wanted[record])
    if stale:
        Task.objects.filter(pk__in=stale).update(idempotency_key=None)
    IdempotencyRecord.objects.filter(
        application=application, key__in=list(wanted), created_at__lt=start
    ).delete()


def _chunks[T](values: list[T], size: int) -> list[list[T]]:
    return [values[start : start + size] for start in range(0, len(values), size)]


# --- following a batch ------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    counts: dict[str, int]  # total, then per status (COUNTED)
    percent: int  # finished items of the total, 0-100


def progress(batch: Batch) -> Progress:
    """The counts per status (one aggregate query on the partial index), and the batch's
    status brought up to date: `running` while an item has not finished, then `finished`
    (`cancelled` when a cancel was requested); an item retried later makes it running again."""
    counts = dict.fromkeys(COUNTED, 0)
    last_finished = None
    for status, count, finished_at in (
        Task.objects.filter(batch=batch)
        .values("status")
        .annotate(count=Count("pk"), last=Max("finished_at"))
        .values_list("status", "count", "last")
    ):
        counts[status] = count
        if finished_at is not None and (last_finished is None or finished_at > last_finished):
            last_finished = finished_at
    unfinished = sum(counts[status] for status in UNFINISHED)
    if unfinished:
        status, finished_at = Batch.Status.RUNNING, None
    else:
        status = Batch.Status.CANCELLED if batch.cancel_requested else Batch.Status.FINISHED
        finished_at = batch.finished_at or last_finished or timezone.now()
    if (status, finished_at) != (batch.status, batch.finished_at):
        Batch.objects.filter(pk=batch.pk).update(status=status, finished_at=finished_at)
        batch.status, batch.finished_at = status, finished_at
    finished = sum(counts[status] for status in FINISHED)
    percent = finished * 100 // batch.total if batch.total else 100
    return Progress({"total": batch.total, **counts}, percent)


@dataclass(frozen=True)
class ResultsPage:
    rows: Any  # an iterator of (task id, index, status, output, error, error_code)
    next_after: int | None  # the cursor of the next page, None when nothing more will follow


def results(*, batch: Batch, after: int = -1, limit: int = RESULTS_LIMIT) -> ResultsPage:
    """The finished items after index `after`, in index order, up to `limit` and never past
    the first unfinished item: so a client resuming at the last index it read misses no item
    that finishes later (a late item holds back the ones after it)."""
    first_unfinished = (
        Task.objects.filter(batch=batch, batch_index__gt=after, status__in=UNFINISHED)
        .order_by("batch_index")
        .values_list("batch_index", flat=True)
        .first()
    )
    end = batch.total if first_unfinished is None else first_unfinished  # exclusive
    page_end = max(after + 1, min(end, after + 1 + limit))
    rows = (
        Task.objects.filter(batch=batch, batch_index__gt=after, batch_index__lt=page_end)
        .order_by("batch_index")
        .values_list("pk", "batch_index", "status", "output", "error", "error_code")
        .iterator(chunk_size=500)
    )
    return ResultsPage(rows, page_end - 1 if page_end < batch.total else None)


# --- cancel -----------------------------------------------------------------------------------


def cancel_batch(*, batch: Batch) -> int:
    """Cancel every unfinished item (services.cancel_task's semantics, CANCEL_CHUNK items a
    statement): a waiting item is cancelled where it waits and its key's slot passes on, a
    running one is cancelled at once and its runner told to stop. Returns items cancelled."""
    from tasks.services import _stop_job as stop_job  # services imports submission too

    Batch.objects.filter(pk=batch.pk).update(cancel_requested=True)
    batch.cancel_requested = True
    application = batch.application
    cancelled = 0
    dropped: dict[fairness.Key, list[str]] = {}
    for status in (TaskStatus.PENDING, TaskStatus.RUNNING):
        after = -1
        while True:
            ids = list(
                Task.objects.filter(batch=batch, status=status, batch_index__gt=after)
                .order_by("batch_index")
                .values_list("pk", "batch_index")[:CANCEL_CHUNK]
            )
            if not ids:
                break
            after = ids[-1][1] or 0  # never None: items have an index
            won = state.cancel_many(task_ids=[pk for pk, _ in ids], expected=status)
            cancelled += len(won)
            _announce_finished(won)
            for task in won:
                if status == TaskStatus.RUNNING:
                    stop_job(task_job_id(task.id, task.run))
                elif (key := fairness.key_of(task, application)) is not None:
                    dropped.setdefault(key, []).append(task_job_id(task.id, task.run))
    for key, job_ids in dropped.items():
        for chunk in _chunks(job_ids, CANCEL_CHUNK):
            dispatch.runs_dropped(key=key, job_ids=chunk)
    return cancelled


def _announce_finished(tasks: list[Task]) -> None:
    """executor.announce_finished for many tasks in one Redis trip; best effort as it is."""
    if not tasks:
        return
    pipeline = redis_client().pipeline(transaction=False)
    for task in tasks:
        event_stream.add(pipeline, task_id=task.id, run=task.run, event=catalog.FINISHED, data={})
        publish_finished(task.id, pipeline=pipeline)
    try:
        pipeline.execute()
    except redis.RedisError as exc:
        logger.warning("could not announce the end of %d cancelled items: %s", len(tasks), exc)
