"""The dashboard's task lists and filters: keyset pagination on (created_at, id), never OFFSET,
never COUNT(*) over the table; counts that could be large are capped (`bounded_count`)."""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet
from django.utils.dateparse import parse_datetime

from tasks.models import Task
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


def encode_cursor(task: Task) -> str:
    raw = f"{task.created_at.isoformat()}|{task.id}"
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
    """Every matching task id, newest first, in keyset batches (for bulk operations)."""
    cursor = ""
    while True:
        page = task_page(filters=filters, cursor=cursor, size=batch)
        if page.rows:
            yield [row.id for row in page.rows]
        if not page.next_cursor:
            return
        cursor = page.next_cursor
