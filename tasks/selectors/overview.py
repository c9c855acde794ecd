"""The overview page's numbers and the per-application health: last hour, bounded."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from django.db import connection
from django.db.models import Count, Q, Value
from django.db.models.functions import Coalesce, NullIf
from django.utils import timezone

from tasks.execution import pausing
from tasks.models import Application, CallbackAttempt, Task, TaskStatus
from tasks.plumbing import rawsql
from tasks.selectors.queues import QueueStats, WorkerInfo, queue_stats, workers

# --- overview ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySlots:
    """An end user (the `concurrency_key`, else the `user`) and how many runs it has running."""

    application_id: str
    application_name: str
    key: str
    running: int


@dataclass
class Overview:
    status_counts: dict[str, int]
    callback_attempts: int
    callback_delivered: int
    queues: list[QueueStats]
    workers: list[WorkerInfo]
    busiest_keys: list[KeySlots] = field(default_factory=list)
    redis_error: str = ""

    @property
    def callback_success_rate(self) -> float | None:
        if not self.callback_attempts:
            return None
        return 100.0 * self.callback_delivered / self.callback_attempts


def overview(now: datetime | None = None) -> Overview:
    now = now or timezone.now()
    hour_ago = now - timedelta(hours=1)
    counts = status_counts(since=hour_ago)
    attempts = {"total": counts.pop(_ATTEMPTS), "delivered": counts.pop(_DELIVERED)}
    result = Overview(
        status_counts={status: counts.get(status, 0) for status in TaskStatus.values},
        callback_attempts=attempts["total"],
        callback_delivered=attempts["delivered"],
        queues=[],
        workers=[],
        busiest_keys=busiest_keys(),
    )
    try:
        paused = pausing.paused_queues()  # one read of the table for both
        result.queues = queue_stats(paused)
        result.workers = workers(set(paused))
    except redis.RedisError as exc:
        result.redis_error = f"{type(exc).__name__}: {exc}"
    return result


_ATTEMPTS, _DELIVERED = "attempts", "delivered"  # status_counts' two rows of attempts


def status_counts(*, since: datetime) -> dict[str, int]:
    """Tasks created since `since`, per status: one range of task_status_idx (status,
    created_at) per status, read from the index alone, rather than the creation-time range
    with each row's status fetched from the table (17 ms against 6 for the last hour's 14,000
    tasks of 10,000,000). In the same statement, the callback attempts started since then
    and how many delivered (keys "attempts" and "delivered"): a query less to plan."""
    table = rawsql.quote(Task._meta.db_table)
    created = Task._meta.get_field("created_at")
    at = created.get_db_prep_value(since, connection)
    parts = [
        f"SELECT %s, (SELECT COUNT(*) FROM {table} WHERE status = %s AND "  # noqa: S608
        f"{rawsql.quote_column(created)} >= %s)"
        for _ in TaskStatus.values
    ]
    params = [p for status in TaskStatus.values for p in (status, status, at)]
    attempts = rawsql.quote(CallbackAttempt._meta.db_table)
    started = CallbackAttempt._meta.get_field("started_at")
    delivered = rawsql.quote_column(rawsql.get_field(CallbackAttempt, "delivered"))
    for name, only_delivered in ((_ATTEMPTS, False), (_DELIVERED, True)):
        parts.append(
            f"SELECT %s, (SELECT COUNT(*) FROM {attempts} WHERE "  # noqa: S608
            f"{rawsql.quote_column(started)} >= %s{f' AND {delivered}' if only_delivered else ''})"
        )
        params += [name, started.get_db_prep_value(since, connection)]
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(parts), params)
        return {status: int(n) for status, n in cursor.fetchall()}


def busiest_keys(limit: int = 5) -> list[KeySlots]:
    """The end users holding the most running slots (running rows only: as many as workers)."""
    rows = (
        Task.objects.filter(status=TaskStatus.RUNNING)
        .exclude(concurrency_key="", user="")
        .annotate(key=Coalesce(NullIf("concurrency_key", Value("")), "user"))
        .values("application_id", "application__name", "key")
        .annotate(n=Count("id"))
        .order_by("-n", "key")[:limit]
    )
    return [
        KeySlots(str(row["application_id"]), row["application__name"], row["key"], row["n"])
        for row in rows
    ]


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
