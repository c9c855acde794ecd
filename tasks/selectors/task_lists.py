"""The dashboard's task lists and filters: keyset pagination on (created_at, id), never OFFSET,
never COUNT(*) over the table; counts that could be large are capped (`bounded_count`). The
Batches pages' lists too: batches newest first, a batch's items by index."""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, Q, QuerySet
from django.utils.dateparse import parse_datetime

from tasks.models import Batch, Task
from tasks.statuses import CallbackStatus, TaskStatus

COUNT_CAP = 10_000
HEX_PREFIX = re.compile(r"^[0-9a-f-]{4,36}$")


def bounded_count(queryset: QuerySet, cap: int = COUNT_CAP) -> int:
    """Count at most `cap` rows (a LIMITed subquery), so a count never scans a huge table."""
    return queryset.order_by().values("pk")[:cap].count()


@dataclass
class TaskFilters:
    application: str = ""
    status: str = ""
    callback_status: str = ""
    priority: str = ""
    created_from: datetime | None = None
    created_to: datetime | None = None
    q: str = ""
    # One error group of the Failures page (tasks.triage), through its partial index.
    error_fingerprint: str = ""
    callback_error_fingerprint: str = ""
    # The items of one batch (the batch page's actions), walked by their index.
    batch: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("created_from", "created_to"):
            data[name] = data[name].isoformat() if data[name] else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskFilters:
        values = dict(data)
        for name in ("created_from", "created_to"):
            values[name] = parse_datetime(values[name]) if values.get(name) else None
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})

    @property
    def active(self) -> bool:
        return any(asdict(self).values())


def uuid_prefix_range(prefix: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """'e62289ec' -> (e62289ec-0000-…, e62289ec-ffff-…): a PK index range, not a LIKE scan."""
    digits = prefix.replace("-", "").lower()
    if not digits or len(digits) > 32 or not all(c in "0123456789abcdef" for c in digits):
        return None
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def filtered_tasks(filters: TaskFilters) -> QuerySet[Task]:
    tasks = Task.objects.all()
    if filters.batch:
        tasks = tasks.filter(batch_id=filters.batch)
    if filters.application:
        tasks = tasks.filter(application_id=filters.application)
    if filters.status:
        tasks = tasks.filter(status=filters.status)
    if filters.callback_status:
        tasks = tasks.filter(callback_status=filters.callback_status)
    if filters.priority:
        tasks = tasks.filter(priority=filters.priority)
    if filters.error_fingerprint:
        tasks = tasks.filter(status=TaskStatus.FAILED, error_fingerprint=filters.error_fingerprint)
    if filters.callback_error_fingerprint:
        tasks = tasks.filter(
            callback_status=CallbackStatus.FAILED,
            callback_error_fingerprint=filters.callback_error_fingerprint,
        )
    if filters.created_from:
        tasks = tasks.filter(created_at__gte=filters.created_from)
    if filters.created_to:
        tasks = tasks.filter(created_at__lt=filters.created_to)
    query = filters.q.strip()
    if query:
        condition = Q(user=query)
        id_range = uuid_prefix_range(query) if HEX_PREFIX.match(query.lower()) else None
        if id_range:
            condition |= Q(id__gte=id_range[0], id__lte=id_range[1])
        tasks = tasks.filter(condition)
    return tasks


LIST_FIELDS = (
    "id", "status", "run", "user", "progress", "created_at", "started_at", "finished_at",
    "callback_status", "callback_attempts", "callback_last_status_code", "error",
    "application__name", "application_id", "priority",
)  # fmt: skip


def encode_cursor(row: Task | Batch) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID] | None:
    try:
        created, task_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        when = parse_datetime(created)
        return (when, uuid.UUID(task_id)) if when else None
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass
class TaskPage:
    rows: list[Task]
    next_cursor: str | None
    size: int


def task_page(*, filters: TaskFilters, cursor: str = "", size: int = 50) -> TaskPage:
    """One page of tasks, newest first, after `cursor` (keyset on created_at, id)."""
    tasks = filtered_tasks(filters).select_related("application").only(*LIST_FIELDS)
    after = decode_cursor(cursor) if cursor else None
    if after:
        created, task_id = after
        tasks = tasks.filter(Q(created_at__lt=created) | Q(created_at=created, id__lt=task_id))
    rows = list(tasks.order_by("-created_at", "-id")[: size + 1])
    next_cursor = encode_cursor(rows[size - 1]) if len(rows) > size else None
    return TaskPage(rows=rows[:size], next_cursor=next_cursor, size=size)


def iter_matching_ids(filters: TaskFilters, *, batch: int = 200):
    """Every matching task id, newest first, in keyset batches (for bulk operations); a
    batch's items in index order instead, on its partial index (task_batch_part_idx)."""
    if filters.batch:
        yield from _iter_item_ids(filters, size=batch)
        return
    cursor = ""
    while True:
        page = task_page(filters=filters, cursor=cursor, size=batch)
        if page.rows:
            yield [row.id for row in page.rows]
        if not page.next_cursor:
            return
        cursor = page.next_cursor


def _iter_item_ids(filters: TaskFilters, *, size: int):
    after = -1
    while True:
        rows = list(
            filtered_tasks(filters)
            .filter(batch_index__gt=after)
            .order_by("batch_index")
            .values_list("pk", "batch_index")[:size]
        )
        if rows:
            yield [pk for pk, _ in rows]
        if len(rows) < size:
            return
        after = rows[-1][1] or 0  # never None: items have an index


# --- batches ------------------------------------------------------------------------------------


@dataclass
class BatchFilters:
    application: str = ""
    status: str = ""


@dataclass
class BatchPage:
    rows: list[Batch]
    # Items per status for each batch of the page: {batch id: {status: count}}.
    counts: dict[uuid.UUID, dict[str, int]]
    next_cursor: str | None
    size: int


def batch_page(*, filters: BatchFilters, cursor: str = "", size: int = 50) -> BatchPage:
    """One page of batches, newest first, after `cursor` (keyset on created_at, id), with the
    counts of all its batches' items from one grouped query (never one per row)."""
    batches = Batch.objects.select_related("application").defer("request_hash")
    if filters.application:
        batches = batches.filter(application_id=filters.application)
    if filters.status:
        batches = batches.filter(status=filters.status)
    after = decode_cursor(cursor) if cursor else None
    if after:
        created, batch_id = after
        batches = batches.filter(Q(created_at__lt=created) | Q(created_at=created, id__lt=batch_id))
    rows = list(batches.order_by("-created_at", "-id")[: size + 1])
    next_cursor = encode_cursor(rows[size - 1]) if len(rows) > size else None
    rows = rows[:size]
    return BatchPage(rows=rows, counts=item_counts([row.id for row in rows]),
                     next_cursor=next_cursor, size=size)  # fmt: skip


def item_counts(batch_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    """{batch id: {status: items}} for many batches in one grouped query."""
    counts: dict[uuid.UUID, dict[str, int]] = {batch_id: {} for batch_id in batch_ids}
    if not batch_ids:
        return counts
    grouped = (
        Task.objects.filter(batch_id__in=batch_ids)
        .values("batch_id", "status")
        .annotate(n=Count("pk"))
        .values_list("batch_id", "status", "n")
        .order_by()
    )
    for batch_id, status, n in grouped:
        counts[batch_id][status] = n
    return counts


ITEM_FIELDS = (
    "id", "batch_index", "status", "run", "user", "created_at", "started_at", "finished_at",
    "callback_status", "error", "error_code",
)  # fmt: skip


@dataclass
class ItemPage:
    rows: list[Task]
    next_after: int | None  # the index the next page starts after
    size: int


def item_page(*, batch: Batch, status: str = "", after: int = -1, size: int = 100) -> ItemPage:
    """One page of a batch's items in index order, after index `after` (keyset on the partial
    index task_batch_part_idx)."""
    items = Task.objects.filter(batch=batch, batch_index__gt=after).only(*ITEM_FIELDS)
    if status:
        items = items.filter(status=status)
    rows = list(items.order_by("batch_index")[: size + 1])
    next_after = rows[size - 1].batch_index if len(rows) > size else None
    return ItemPage(rows=rows[:size], next_after=next_after, size=size)
