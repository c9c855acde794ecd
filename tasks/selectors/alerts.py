"""The alert policy: stuck tasks per application, disabled endpoints and destinations, backlog, a
long pause, no live worker, Redis down."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import connection
from django.utils import timezone

from tasks import sql
from tasks.delivery import health
from tasks.models import Application, Destination, Endpoint
from tasks.plumbing import rawsql
from tasks.selectors.overview import Overview, overview
from tasks.statuses import STUCK_RULES

# --- alerts ------------------------------------------------------------------------------------


@dataclass
class Alert:
    # stuck_pending | stuck_running | endpoint_disabled | destination_disabled | backlog |
    # queue_paused | no_worker | redis_down
    kind: str
    message: str
    count: int = 0  # capped at ALERT_COUNT_CAP: the page says "100+"
    application: Application | None = None
    filters: dict[str, str] = field(default_factory=dict)
    endpoint_id: int | None = None  # an endpoint_disabled alert's endpoint (its page re-enables)
    destination_id: int | None = None  # a destination_disabled alert's destination


ALERT_COUNT_CAP = 100
STUCK_PARTS_PER_STATEMENT = 200  # (application, status) scans in one stuck-count statement


def _at_least(count: int) -> str:
    return f"{count}+" if count >= ALERT_COUNT_CAP else str(count)


def alerts(overview_data: Overview | None = None, now: datetime | None = None) -> list[Alert]:
    now = now or timezone.now()
    found: list[Alert] = []
    apps = list(
        Application.objects.only("id", "name", "queue_threshold_seconds", "run_threshold_seconds")
    )
    stuck = sql.stuck_counts(
        apps, now=now, cap=ALERT_COUNT_CAP, per_statement=STUCK_PARTS_PER_STATEMENT
    )
    for app in apps:
        for kind, rule in STUCK_RULES.items():
            if count := stuck[str(app.pk), kind]:
                found.append(
                    Alert(kind,
                          f"{_at_least(count)} task(s) of {app.name} {rule.status} for over "
                          f"{getattr(app, rule.threshold)} s", count, app,
                          {"application": str(app.id), "status": rule.status})
                )  # fmt: skip
    any_endpoint, any_destination = _any_disabled()
    for endpoint in health.disabled_endpoints() if any_endpoint else []:
        found.append(
            Alert("endpoint_disabled",
                  f"Endpoint {endpoint.origin} of {endpoint.application.name} is disabled: it "
                  f"failed for over {endpoint.application.disable_after_hours} h without a "
                  "success, and its callbacks are given up until it is re-enabled.",
                  endpoint_id=endpoint.pk)
        )  # fmt: skip
    for destination in health.disabled_destinations() if any_destination else []:
        found.append(
            Alert("destination_disabled",
                  f"Destination {destination.masked_url} of {destination.application.name} is "
                  f"disabled: it failed for over {destination.application.disable_after_hours} h "
                  "without a success, and nothing is published to it until it is re-enabled.",
                  destination_id=destination.pk)
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
    for queue in data.queues:
        if queue.lane and queue.name != settings.TASK_QUEUE:
            continue  # paused with the task queue: one alert for the three lanes
        if queue.paused_at is not None:
            paused_for = (now - queue.paused_at).total_seconds()
            if paused_for > settings.QUEUE_PAUSE_ALERT_SECONDS:
                found.append(
                    Alert("queue_paused",
                          f"Queue {queue.name} has been paused for {int(paused_for // 60)} min "
                          f"(by {queue.paused_by}): its jobs wait until it is resumed on the "
                          "Workers page.", queue.queued)
                )  # fmt: skip
    if not any(worker.alive for worker in data.workers):
        found.append(Alert("no_worker", "No live RQ worker: nothing will run."))
    return found


def _any_disabled() -> tuple[bool, bool]:
    """Whether an endpoint, and a destination, is disabled: one statement of two index-less
    EXISTS over small tables, so the Overview loads the disabled rows only when there are some
    (two queries less to plan on every refresh otherwise)."""
    parts = [
        f"SELECT EXISTS (SELECT 1 FROM {rawsql.quote(model._meta.db_table)} WHERE "  # noqa: S608
        f"{rawsql.quote_column(rawsql.get_field(model, 'disabled_at'))} IS NOT NULL)"
        for model in (Endpoint, Destination)
    ]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT ({parts[0]}), ({parts[1]})")
        endpoint, destination = cursor.fetchone()
    return bool(endpoint), bool(destination)


def stuck_task_ids(*, application_id: str, kind: str, limit: int = 500) -> list[uuid.UUID]:
    """The oldest stuck tasks of one application under one rule (an alert's actions)."""
    application = Application.objects.get(pk=application_id)
    tasks = sql.stuck_tasks(application, STUCK_RULES[kind], now=timezone.now())
    return list(tasks.order_by("created_at").values_list("id", flat=True)[:limit])
