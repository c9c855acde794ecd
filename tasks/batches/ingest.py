"""Ingesting a batch: every item is validated before anything is stored; the batch and its
items are inserted in one transaction (bulk INSERTs), then enqueued a pipeline per few
hundred (submission.enqueue_fresh_tasks). Items wait as one end user: their `concurrency_key` is
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

from django.db import IntegrityError, transaction
from django.utils import timezone

from tasks import idempotency
from tasks.idempotency import IdempotencyConflict
from tasks.models import Application, Batch, IdempotencyRecord, Task
from tasks.plumbing import rawsql
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
# Set on the batch for all its items; an item naming one is refused rather than ignored.
BATCH_LEVEL_FIELDS = ("response_mode", "priority", "callback_url", "callback_events")


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
