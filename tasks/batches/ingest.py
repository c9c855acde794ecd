"""Ingesting a batch: every item is validated before anything is stored; the batch and its
items are inserted in one transaction (COPY on PostgreSQL, bulk INSERTs elsewhere:
tasks.batches.store), then enqueued (submission.enqueue_fresh_tasks). Items wait as one end
user: their `concurrency_key` is `batch:<batch id>` unless the item names its own, whose line
(tasks.scheduling.fairness) holds all but BATCH_CONCURRENCY (or the application's
`max_concurrency_per_key`) of them, so a batch never stands in front of another user's task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from tasks import idempotency, jsonsafety
from tasks.batches import completion, store
from tasks.idempotency import IdempotencyConflict
from tasks.models import Application, Batch, IdempotencyRecord, Task
from tasks.plumbing import rawsql
from tasks.submission import (
    ITEM_OWN_FIELDS,
    SubmitRequest,
    ValidationFailed,
    enqueue_fresh_tasks,
    new_tasks,
    parse_submit_body,
    validate_idempotency_key,
)

logger = logging.getLogger(__name__)

MAX_ITEMS = 10_000
MAX_NDJSON_ITEMS = 100_000  # the NDJSON form's bound: read a line at a time, never whole
INSERT_CHUNK = 500  # rows per INSERT (SQLite's bound on a statement's parameters)
STORE_CHUNK = 2000  # items built and written at a time
TRANSACTION_ITEMS = 10_000  # on PostgreSQL: items per transaction (one COPY), then enqueued
# SQLite has one writer: a chunk holds every other write back until it commits, so its chunks
# are small enough that another client's submit waits a few milliseconds, not a chunk's worth.
SQLITE_STORE_CHUNK = 250
# ... and after each chunk's commit the batch pauses this long, so that another client's submit
# finds the write lock free (and, in the same web process, the GIL) rather than racing the next
# chunk for it (docs/benchmarks.md, "Batches").
SQLITE_CHUNK_PAUSE_SECONDS = 0.002
INGEST_STALE_SECONDS = 600  # a batch still being stored after this: its request died
# Set on the batch for all its items; an item naming one is refused rather than ignored.
BATCH_LEVEL_FIELDS = ("response_mode", "priority", "callback_url", "callback_events")
# What an NDJSON batch may give as query parameters or in its first line's `{"batch": {...}}`.
NDJSON_BATCH_FIELDS = ("callback_url", "callback_events", "priority", "metadata")


@dataclass(frozen=True)
class BatchRequest:
    items: list[SubmitRequest]
    item_keys: list[str | None]  # each item's own Idempotency-Key (its task's)
    callback_url: str  # the batch's: batch.finished, and the items' callbacks when asked for
    callback_events: str  # the items' callback events (stored kinds), "" for none
    priority: str | None
    metadata: dict[str, Any]
    # Of the whole decoded body: what a repeated Idempotency-Key must repeat ("" without one).
    request_hash: str


@dataclass(frozen=True)
class BatchHead:
    """The batch-level fields, validated: `request` carries what each item takes from them
    (with a single submit's rules), `callback_url` the batch's own."""

    request: SubmitRequest
    metadata: dict[str, Any]
    callback_url: str


def parse_head(fields: dict[str, Any]) -> BatchHead:
    """Validate the batch-level fields (callback_url, callback_events, priority, metadata)."""
    metadata = fields.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValidationFailed("metadata", "metadata must be a JSON object.")
    # The batch-level fields with the single submit's rules (an item with empty inputs).
    shared = {name: fields[name] for name in BATCH_LEVEL_FIELDS[1:] if name in fields}
    request = parse_submit_body({"inputs": {}, "metadata": metadata, **shared})
    callback_url = request.callback_url
    if "callback_events" not in fields:  # the batch's callback_url gets batch.finished alone
        request = dataclasses.replace(request, callback_url="", callback_events="")
    return BatchHead(request, metadata, callback_url)


def parse_item(
    index: int, item: Any, head: SubmitRequest, seen: set[str]
) -> tuple[SubmitRequest, str | None]:
    """One item with the single submit's rules and the batch's own fields; returns it and its
    idempotency_key (added to `seen`, the keys of the items before it). Raises ValidationFailed
    naming the item (`items[3].inputs`)."""
    where = f"items[{index}]"
    if not isinstance(item, dict):
        raise ValidationFailed(where, f"{where} must be a JSON object.")
    for name in BATCH_LEVEL_FIELDS:
        if name in item:
            raise ValidationFailed(f"{where}.{name}", f"{name} is set on the batch only.")
    raw_key = item.get("idempotency_key")
    fields = item
    if "idempotency_key" in item:
        fields = {name: value for name, value in item.items() if name != "idempotency_key"}
    try:
        # The batch's own fields, checked once in parse_head (the callback URL's SSRF check
        # included).
        request = parse_submit_body(fields, batch_head=head)
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
    return request, key


def parse_batch_body(body: Any, *, hashed: bool = True) -> BatchRequest:
    """Validate a decoded batch body, every item with the single submit's rules
    (submission.parse_submit_body); raises ValidationFailed naming the item (`items[3].inputs`).
    `hashed`: the request hash is wanted (an Idempotency-Key came), else it is ""."""
    if not isinstance(body, dict):
        raise ValidationFailed(None, "The request body must be a JSON object.")
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise ValidationFailed("items", "items must be a non-empty list of objects.")
    if len(items) > MAX_ITEMS:
        raise ValidationFailed("items", f"A batch holds at most {MAX_ITEMS} items.")
    head = parse_head(body)
    parsed: list[SubmitRequest] = []
    keys: list[str | None] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        request, key = parse_item(index, item, head.request, seen)
        parsed.append(request)
        keys.append(key)
    if not hashed:
        return _batch_request(head, parsed, keys, "")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return _batch_request(head, parsed, keys, hashlib.sha256(canonical.encode()).hexdigest())


def parse_ndjson_batch(
    lines: Iterable[bytes], *, query: Mapping[str, list[str]], hashed: bool = True
) -> BatchRequest:
    """Validate an NDJSON batch as it is read: one item object per line (blank lines skipped),
    the batch-level fields as query parameters or as a first line `{"batch": {...}}`, not both.
    The request hash (when `hashed`) grows line by line, so no line is kept past its item.
    Raises ValidationFailed naming the item by its index (`items[3].inputs`) and saying its
    line."""
    given = _query_fields(query)
    digest = hashlib.sha256()
    head: BatchHead | None = None
    parsed: list[SubmitRequest] = []
    keys: list[str | None] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        index = len(parsed)
        where = f"items[{index}]"
        value = _line_value(raw, number=number, where=where)
        is_batch_line = isinstance(value, dict) and "batch" in value
        if head is None:
            if is_batch_line:
                given = _first_line_fields(value, given)
            head = parse_head(given)
            if hashed:
                digest.update(_canonical({"batch": given}))
            if is_batch_line:
                continue
        elif is_batch_line:
            raise ValidationFailed(
                f"{where}.batch", f"line {number}: only the first line may be the batch's fields."
            )
        if index >= MAX_NDJSON_ITEMS:
            raise ValidationFailed("items", f"A batch holds at most {MAX_NDJSON_ITEMS} items.")
        try:
            request, key = parse_item(index, value, head.request, seen)
        except ValidationFailed as exc:
            raise ValidationFailed(exc.field, f"line {number}: {exc.message}") from None
        parsed.append(request)
        keys.append(key)
        if hashed:
            digest.update(_canonical(value))
    if head is None or not parsed:
        raise ValidationFailed("items", "The body holds no items: send one JSON object per line.")
    return _batch_request(head, parsed, keys, digest.hexdigest() if hashed else "")


def _query_fields(query: Mapping[str, list[str]]) -> dict[str, Any]:
    """The batch-level fields given as query parameters, decoded as their JSON twins:
    callback_events comma-separated (OpenAPI's form style, not exploded), metadata a JSON
    object."""
    fields: dict[str, Any] = {}
    for name, values in query.items():
        if name not in NDJSON_BATCH_FIELDS:
            raise ValidationFailed(
                name, f"Only {', '.join(NDJSON_BATCH_FIELDS)} are accepted as query parameters."
            )
        if len(values) != 1:
            raise ValidationFailed(name, f"{name} is given more than once.")
        value = values[0]
        if name == "callback_events":  # strictly split: a blank or spaced name is refused
            if not value:
                raise ValidationFailed(name, "callback_events names no event.")
            fields[name] = value.split(",")
        elif name == "metadata":
            try:
                fields[name] = jsonsafety.loads(value.encode())
            except ValueError as exc:
                raise ValidationFailed(name, f"metadata must be a JSON object: {exc}") from None
            if not isinstance(fields[name], dict):
                raise ValidationFailed(name, "metadata must be a JSON object.")
        else:
            fields[name] = value
    return fields


def _first_line_fields(line: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The batch-level fields of a first line `{"batch": {...}}`, refused beside query ones."""
    extra = next((name for name in line if name != "batch"), None)
    if extra is not None:
        raise ValidationFailed(
            "batch",
            f'The first line {{"batch": {{...}}}} holds nothing else ({extra} is there too).',
        )
    fields = line["batch"]
    if not isinstance(fields, dict):
        raise ValidationFailed("batch", "The first line's batch must be a JSON object.")
    unknown = next((name for name in fields if name not in NDJSON_BATCH_FIELDS), None)
    if unknown is not None:
        raise ValidationFailed(
            f"batch.{unknown}",
            f"{unknown} is not a batch field; use {', '.join(NDJSON_BATCH_FIELDS)}.",
        )
    if fields and given:
        both = [name for name in NDJSON_BATCH_FIELDS if name in fields and name in given]
        name = both[0] if both else next(iter(fields))
        raise ValidationFailed(
            name,
            f"{name}: give the batch's fields as query parameters or in the first line, not both.",
        )
    return fields


def _line_value(raw: bytes, *, number: int, where: str) -> Any:
    try:
        return jsonsafety.loads(raw)
    except jsonsafety.UnstorableJson as exc:
        raise ValidationFailed(where, f"line {number}: {where} is refused: {exc.reason}.") from None
    except ValueError as exc:
        raise ValidationFailed(where, f"line {number}: {where} is not valid JSON: {exc}") from None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _batch_request(
    head: BatchHead, items: list[SubmitRequest], keys: list[str | None], request_hash: str
) -> BatchRequest:
    return BatchRequest(
        items=items,
        item_keys=keys,
        callback_url=head.callback_url,
        callback_events=head.request.callback_events,  # the items' own, "" when none
        priority=head.request.priority,
        metadata=head.metadata,
        request_hash=request_hash,
    )


class ItemKeyTaken(Exception):
    """An item's idempotency_key already names a task of the application (in its window)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class BatchInProgress(Exception):
    """The batch's Idempotency-Key names a batch another request is still storing."""


def submit_batch(
    *,
    application: Application,
    request: BatchRequest,
    idempotency_key: str | None = None,
    base_url: str = "",
) -> tuple[Batch, bool]:
    """Store the batch, then its items TRANSACTION_ITEMS a transaction (SQLITE_STORE_CHUNK on
    SQLite), enqueued once committed (so a long batch never holds SQLite's write lock for
    more than a chunk, and its first items start while the rest is stored); the batch is
    settled only once every item is stored (`ingesting`). Returns (batch, created); a repeated
    Idempotency-Key returns the first batch. Raises IdempotencyConflict (the key with another
    body), BatchInProgress (that batch is still being stored) or ItemKeyTaken; after a failure
    part way nothing is left."""
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
        base_url=base_url, ingesting=True,
    )  # fmt: skip
    try:
        with transaction.atomic():
            _check_item_keys(application, request.item_keys)
            rawsql.insert(batch)
    except IntegrityError:
        if idempotency_key:  # a concurrent request with the same key won: its batch
            existing = _existing_batch(application, idempotency_key, request.request_hash)
            if existing is not None:
                return existing, False
        raise
    # PostgreSQL: TRANSACTION_ITEMS a transaction, one COPY each, whose chunks are built while
    # the server stores the chunk before. SQLite: a chunk a transaction, built before it, so
    # its write lock is held only while the rows are written. Either way the stored items are
    # enqueued STORE_CHUNK at a time once committed (a Redis round trip per 2,000, not per
    # SQLite chunk), so the first ones start while the rest is stored.
    streamed = connection.vendor == "postgresql"
    chunk, per_transaction, per_enqueue = (
        (STORE_CHUNK, TRANSACTION_ITEMS, TRANSACTION_ITEMS)
        if streamed
        else (SQLITE_STORE_CHUNK, SQLITE_STORE_CHUNK, STORE_CHUNK)
    )
    total = len(request.items)

    def build(start: int, stop: int) -> store.Prepared:
        items = _new_items(application, batch, request, start, stop, now)
        return store.prepare(items, own=ITEM_OWN_FIELDS)

    try:
        for group in range(0, total, per_enqueue):
            stored: list[Task] = []
            for first in range(group, min(group + per_enqueue, total), per_transaction):
                last = min(first + per_transaction, group + per_enqueue, total)
                spans = [(start, min(start + chunk, last)) for start in range(first, last, chunk)]
                early = None if streamed else build(*spans[0])
                with transaction.atomic(), store.rows_writer() as write:
                    for span in spans:
                        rows = early or build(*span)
                        write(rows)
                        stored += rows.tasks
                if not streamed:
                    time.sleep(SQLITE_CHUNK_PAUSE_SECONDS)
            for start in range(0, len(stored), STORE_CHUNK):  # committed: the workers may see them
                enqueue_fresh_tasks(
                    tasks=stored[start : start + STORE_CHUNK], application=application
                )
    except BaseException as exc:
        abandon(batch=batch)
        if isinstance(exc, IntegrityError):
            _check_item_keys(application, request.item_keys)  # an item key's race: name it
        raise
    Batch.objects.filter(pk=batch.pk).update(ingesting=False)
    batch.ingesting = False
    completion.settle(batch_id=batch.pk)  # its items may all have ended already
    return batch, True


def _new_items(
    application: Application,
    batch: Batch,
    request: BatchRequest,
    start: int,
    stop: int,
    now: datetime,
) -> list[Task]:
    # Their priority is the batch's: each item's request carries it (parse_item).
    return new_tasks(application=application, requests=request.items[start:stop], now=now,
                     keys=request.item_keys[start:stop], batch=batch, first_index=start,
                     default_key=f"batch:{batch.id}")  # fmt: skip


def abandon(*, batch: Batch) -> None:
    """Remove a batch whose storing failed part way (or whose request died: the reconciler,
    after INGEST_STALE_SECONDS): its stored items are cancelled where they wait or run, then
    deleted with it, STORE_CHUNK at a time. Its client got no answer, so nothing refers to it."""
    from tasks.batches import control  # control imports the services, which import submission

    control.cancel_batch(batch=batch)
    while ids := list(Task.objects.filter(batch=batch).values_list("pk", flat=True)[:1000]):
        Task.objects.filter(pk__in=ids).delete()
    Batch.objects.filter(pk=batch.pk).delete()
    logger.warning("batch abandoned part way through storing", extra={"batch_id": str(batch.pk)})


def abandon_stale(*, now: datetime | None = None) -> int:
    """Reconciler: abandon batches still `ingesting` INGEST_STALE_SECONDS after they were
    created (their web process died while storing them). Returns how many."""
    cutoff = (now or timezone.now()) - timedelta(seconds=INGEST_STALE_SECONDS)
    stale = list(Batch.objects.filter(ingesting=True, created_at__lt=cutoff)[:10])
    for batch in stale:
        abandon(batch=batch)
    return len(stale)


def _existing_batch(application: Application, key: str, request_hash: str) -> Batch | None:
    """idempotency.existing_for_key's rules for a batch's key: its window, then same body or
    IdempotencyConflict; a batch still being stored is BatchInProgress, or abandoned when its
    request died (INGEST_STALE_SECONDS)."""
    found = Batch.objects.filter(application=application, idempotency_key=key).first()
    if found is None:
        return None
    if found.created_at < idempotency.window_start():
        Batch.objects.filter(pk=found.pk, idempotency_key=key).update(idempotency_key=None)
        return None
    if found.request_hash != request_hash:
        raise IdempotencyConflict
    if found.ingesting:
        if found.created_at > timezone.now() - timedelta(seconds=INGEST_STALE_SECONDS):
            raise BatchInProgress
        abandon(batch=found)
        return None
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
