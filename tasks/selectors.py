"""Read-side queries for the dashboard: every one indexed and bounded, fast at millions of rows.

Lists use keyset pagination on (created_at, id) — never OFFSET, never COUNT(*) over the table.
Counts that could be large are capped (`bounded_count`).
"""

from __future__ import annotations

import base64
import re
import statistics
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rq import Queue
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.worker import BaseWorker

from . import rawsql
from .models import Application, CallbackAttempt, Task, TaskStatus
from .queueing import redis_client

COUNT_CAP = 10_000
HEX_PREFIX = re.compile(r"^[0-9a-f-]{4,36}$")


def bounded_count(queryset: QuerySet, cap: int = COUNT_CAP) -> int:
    """Count at most `cap` rows (a LIMITed subquery), so a count never scans a huge table."""
    return queryset.order_by().values("pk")[:cap].count()


# --- the client API's poll ----------------------------------------------------------------------

# What the poll shows (presenters.task_body); any other field loads on access.
POLL_FIELDS = (
    "id", "application", "status", "run", "progress", "output", "error", "user", "created_at",
    "started_at", "finished_at", "callback_url", "callback_status", "callback_attempts",
    "callback_last_status_code", "callback_next_attempt_at",
)  # fmt: skip


def task_for_client(*, task_id: uuid.UUID, application_id: uuid.UUID) -> Task | None:
    """The task if it belongs to this application. The poll is the API's hottest read: one
    statement by primary key (prepared on PostgreSQL), without the ORM's per-call compilation
    and without the columns the poll never shows (inputs, traceback)."""
    fields, columns = rawsql.columns(Task, POLL_FIELDS)
    table = rawsql.quote(Task._meta.db_table)
    row = rawsql.fetchone(rawsql.Statement(
        f"SELECT {columns} FROM {table} WHERE id = %s AND application_id = %s",  # noqa: S608
        [Task._meta.pk.get_db_prep_value(task_id, connection),
         Task._meta.get_field("application").target_field.get_db_prep_value(
             application_id, connection)],
    ))  # fmt: skip
    return rawsql.instance(Task, fields, row) if row else None


# --- task lists -------------------------------------------------------------------------------


@dataclass
class TaskFilters:
    application: str = ""
    status: str = ""
    callback_status: str = ""
    created_from: datetime | None = None
    created_to: datetime | None = None
    q: str = ""

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
    "application__name", "application_id",
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


# --- Redis: queues and workers -----------------------------------------------------------------


@dataclass
class QueueStats:
    name: str
    queued: int = 0
    started: int = 0
    scheduled: int = 0
    deferred: int = 0
    failed: int = 0


def queue_stats() -> list[QueueStats]:
    client = redis_client()
    stats = []
    for name in (settings.TASK_QUEUE, settings.CALLBACK_QUEUE, settings.MAINTENANCE_QUEUE):
        queue = Queue(name, connection=client)
        # ZCARD/LLEN only: constant time whatever the registry size.
        stats.append(
            QueueStats(
                name=name,
                queued=client.llen(queue.key),
                started=client.zcard(StartedJobRegistry(queue=queue).key),
                scheduled=client.zcard(ScheduledJobRegistry(queue=queue).key),
                deferred=client.zcard(DeferredJobRegistry(queue=queue).key),
                failed=client.zcard(FailedJobRegistry(queue=queue).key),
            )
        )
    return stats


@dataclass
class WorkerInfo:
    name: str
    state: str
    queues: list[str]
    current_job: str | None
    last_heartbeat: datetime | None
    alive: bool


def workers() -> list[WorkerInfo]:
    now = timezone.now()
    found = []
    for worker in BaseWorker.all(connection=redis_client()):
        heartbeat = worker.last_heartbeat
        if heartbeat is not None and timezone.is_naive(heartbeat):
            heartbeat = timezone.make_aware(heartbeat, timezone.UTC)
        found.append(
            WorkerInfo(
                name=worker.name,
                state=worker.get_state(),
                queues=worker.queue_names(),
                current_job=worker.get_current_job_id(),
                last_heartbeat=heartbeat,
                alive=heartbeat is not None and (now - heartbeat).total_seconds() < 120,
            )
        )
    return sorted(found, key=lambda w: w.name)


# --- overview ----------------------------------------------------------------------------------


@dataclass
class Overview:
    status_counts: dict[str, int]
    callback_attempts: int
    callback_delivered: int
    queues: list[QueueStats]
    workers: list[WorkerInfo]
    redis_error: str = ""

    @property
    def callback_success_rate(self) -> float | None:
        if not self.callback_attempts:
            return None
        return 100.0 * self.callback_delivered / self.callback_attempts


def overview(now: datetime | None = None) -> Overview:
    now = now or timezone.now()
    hour_ago = now - timedelta(hours=1)
    counts = dict(
        Task.objects.filter(created_at__gte=hour_ago)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    attempts = CallbackAttempt.objects.filter(started_at__gte=hour_ago).aggregate(
        total=Count("id"), delivered=Count("id", filter=Q(delivered=True))
    )
    result = Overview(
        status_counts={status: counts.get(status, 0) for status in TaskStatus.values},
        callback_attempts=attempts["total"],
        callback_delivered=attempts["delivered"],
        queues=[],
        workers=[],
    )
    try:
        result.queues = queue_stats()
        result.workers = workers()
    except redis.RedisError as exc:
        result.redis_error = f"{type(exc).__name__}: {exc}"
    return result


# --- alerts ------------------------------------------------------------------------------------


@dataclass
class Alert:
    kind: str  # stuck_pending | stuck_running | backlog | no_worker | redis_down
    message: str
    count: int = 0  # capped at ALERT_COUNT_CAP: the page says "100+"
    application: Application | None = None
    filters: dict[str, str] = field(default_factory=dict)


ALERT_COUNT_CAP = 100
STUCK_PARTS_PER_STATEMENT = 200  # (application, status) scans in one stuck-count statement


def _at_least(count: int) -> str:
    return f"{count}+" if count >= ALERT_COUNT_CAP else str(count)


def _stuck_counts(apps: list[Application], *, now: datetime) -> Counter[tuple[str, str]]:
    """How many tasks of each application are stuck, by (application id, status): pending past
    the application's queue threshold, running past its run threshold, each count capped at
    ALERT_COUNT_CAP. One statement for all applications: per application and status a short
    index range scan (application, status, time) stopped at the cap. Built as text rather than
    with the ORM, whose per-application query building cost the overview ~0.5 ms an application.
    """
    table = rawsql.quote(Task._meta.db_table)
    app_field = Task._meta.get_field("application")
    parts, params = [], []
    for app in apps:
        for status, since, threshold in (
            (TaskStatus.PENDING, "created_at", app.queue_threshold_seconds),
            (TaskStatus.RUNNING, "started_at", app.run_threshold_seconds),
        ):
            field = Task._meta.get_field(since)
            # Identifiers come from the model; every value is a parameter.
            parts.append(
                f"SELECT application_id, status FROM (SELECT {rawsql.quote(app_field.column)} "  # noqa: S608
                f"AS application_id, status FROM {table} WHERE {rawsql.quote(app_field.column)}"
                f" = %s AND status = %s AND {rawsql.quote(field.column)} < %s "
                f"LIMIT {ALERT_COUNT_CAP}) AS stuck_{len(parts)}"
            )
            params += [
                app_field.get_db_prep_value(app.pk, connection),
                status,
                field.get_db_prep_value(now - timedelta(seconds=threshold), connection),
            ]
    counts: Counter[tuple[str, str]] = Counter()
    # SQLite refuses a compound SELECT of more than 500 terms: many applications take several
    # statements (each part has 3 parameters).
    with connection.cursor() as cursor:
        for start in range(0, len(parts), STUCK_PARTS_PER_STATEMENT):
            end = start + STUCK_PARTS_PER_STATEMENT
            cursor.execute(" UNION ALL ".join(parts[start:end]), params[start * 3 : end * 3])
            counts.update((str(uuid.UUID(str(app_id))), status) for app_id, status in cursor)
    return counts


def alerts(overview_data: Overview | None = None, now: datetime | None = None) -> list[Alert]:
    now = now or timezone.now()
    found: list[Alert] = []
    apps = list(
        Application.objects.only("id", "name", "queue_threshold_seconds", "run_threshold_seconds")
    )
    stuck = _stuck_counts(apps, now=now)
    for app in apps:
        pending = stuck[str(app.pk), TaskStatus.PENDING]
        if pending:
            found.append(
                Alert("stuck_pending",
                      f"{_at_least(pending)} task(s) of {app.name} pending for over "
                      f"{app.queue_threshold_seconds} s", pending, app,
                      {"application": str(app.id), "status": "pending"})
            )  # fmt: skip
        running = stuck[str(app.pk), TaskStatus.RUNNING]
        if running:
            found.append(
                Alert("stuck_running",
                      f"{_at_least(running)} task(s) of {app.name} running for over "
                      f"{app.run_threshold_seconds} s", running, app,
                      {"application": str(app.id), "status": "running"})
            )  # fmt: skip
    data = overview_data or overview(now)
    if data.redis_error:
        found.append(Alert("redis_down", f"Redis is unreachable: {data.redis_error}"))
        return found
    for queue in data.queues:
        if queue.queued > settings.QUEUE_BACKLOG_THRESHOLD:
            found.append(
                Alert("backlog",
                      f"{queue.queued} jobs waiting on queue {queue.name} "
                      f"(threshold {settings.QUEUE_BACKLOG_THRESHOLD})", queue.queued)
            )  # fmt: skip
    if not any(worker.alive for worker in data.workers):
        found.append(Alert("no_worker", "No live RQ worker: nothing will run."))
    return found


def stuck_task_ids(*, application_id: str, kind: str, limit: int = 500) -> list[uuid.UUID]:
    app = Application.objects.get(pk=application_id)
    now = timezone.now()
    if kind == "stuck_pending":
        tasks = Task.objects.filter(
            application=app,
            status=TaskStatus.PENDING,
            created_at__lt=now - timedelta(seconds=app.queue_threshold_seconds),
        )
    else:
        tasks = Task.objects.filter(
            application=app,
            status=TaskStatus.RUNNING,
            started_at__lt=now - timedelta(seconds=app.run_threshold_seconds),
        )
    return list(tasks.order_by("created_at").values_list("id", flat=True)[:limit])


# --- per-application health --------------------------------------------------------------------


@dataclass
class AppHealth:
    finished: int
    succeeded: int
    p50_ms: int | None
    p95_ms: int | None
    callback_attempts: int
    callback_failed: int

    @property
    def success_rate(self) -> float | None:
        return 100.0 * self.succeeded / self.finished if self.finished else None

    @property
    def callback_failure_rate(self) -> float | None:
        if not self.callback_attempts:
            return None
        return 100.0 * self.callback_failed / self.callback_attempts


def app_health(application: Application, now: datetime | None = None) -> AppHealth:
    """Last hour: success rate, run-time percentiles (over the newest 5,000), callback failures."""
    hour_ago = (now or timezone.now()) - timedelta(hours=1)
    finished = Task.objects.filter(
        application=application,
        status__in=(TaskStatus.SUCCEEDED, TaskStatus.FAILED),
        created_at__gte=hour_ago,
    )
    rows = list(
        finished.order_by("-created_at").values_list("status", "started_at", "finished_at")[:5000]
    )
    durations = sorted(
        int((end - start).total_seconds() * 1000) for _, start, end in rows if start and end
    )
    attempts = CallbackAttempt.objects.filter(
        task__application=application, started_at__gte=hour_ago
    ).aggregate(total=Count("id"), failed=Count("id", filter=Q(delivered=False)))
    return AppHealth(
        finished=len(rows),
        succeeded=sum(1 for status, _, _ in rows if status == TaskStatus.SUCCEEDED),
        p50_ms=int(statistics.median(durations)) if durations else None,
        p95_ms=durations[min(len(durations) - 1, int(len(durations) * 0.95))]
        if durations
        else None,
        callback_attempts=attempts["total"],
        callback_failed=attempts["failed"],
    )
