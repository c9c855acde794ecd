"""The alert policy: stuck tasks per application, backlog, no live worker, Redis down."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from tasks.models import Application, Task, TaskStatus
from tasks.plumbing import rawsql
from tasks.selectors.overview import Overview, overview

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
