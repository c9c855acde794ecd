"""History for the charts: per-application counts per minute and per hour (`StatsRollup`).

Derived from the database by the cron process, not counted on the hot path: each pass groups
the finished tasks (index task_retention_part_idx, one range per application) and the callback
attempts (index attempt_started_idx) of the recent buckets by minute and by hour, and upserts
them. The last few buckets are recomputed every pass, so a result committed late still counts
and a pass that was missed is caught up from the table's newest bucket; a recomputed count
never lowers a stored one (tasks removed by retention, or run again, still finished then).
Queue depth is sampled each pass (a bounded count of pending tasks per application) and kept as
the bucket's highest.

Counts are exact as long as a bucket is rolled before retention removes its tasks: the pass
runs every ROLLUP_INTERVAL seconds and retention keeps tasks at least an hour. Minute rows are
kept ROLLUP_MINUTE_HOURS (48 h), hour rows ROLLUP_HOUR_DAYS (35 days): at most
(2,880 + 840) rows per application.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max
from django.db.models.functions import TruncHour, TruncMinute
from django.utils import timezone

from tasks.models import Application, CallbackAttempt, StatsRollup, Task, TaskStatus
from tasks.selectors.task_lists import bounded_count

R = StatsRollup.Resolution
COUNT_FIELDS = ("succeeded", "failed", "cancelled", "callbacks_delivered", "callbacks_failed")
STEP: dict[str, timedelta] = {R.MINUTE: timedelta(minutes=1), R.HOUR: timedelta(hours=1)}
# Truncated in UTC, whatever TIME_ZONE says.
TRUNC: dict[str, type[TruncMinute] | type[TruncHour]] = {R.MINUTE: TruncMinute, R.HOUR: TruncHour}
# Recomputed every pass: results committed after their minute ended still count.
REROLL: dict[str, timedelta] = {R.MINUTE: timedelta(minutes=5), R.HOUR: timedelta(hours=2)}
QUEUE_SAMPLE_CAP = 100_000


@dataclass
class RollupReport:
    minutes: int = 0
    hours: int = 0
    pruned: int = 0


def floor(moment: datetime, resolution: str) -> datetime:
    moment = moment.astimezone(UTC).replace(second=0, microsecond=0)
    return moment.replace(minute=0) if resolution == R.HOUR else moment


def keep_for(resolution: str) -> timedelta:
    if resolution == R.MINUTE:
        return timedelta(hours=settings.ROLLUP_MINUTE_HOURS)
    return timedelta(days=settings.ROLLUP_HOUR_DAYS)


def _start(resolution: str, now: datetime) -> datetime:
    """From the newest bucket (less the re-roll window), never further back than is kept."""
    oldest = floor(now - keep_for(resolution), resolution)
    newest = StatsRollup.objects.filter(resolution=resolution).aggregate(at=Max("bucket"))["at"]
    if newest is None:
        return oldest
    return max(oldest, floor(newest - REROLL[resolution], resolution))


def counts(*, resolution: str, start: datetime, end: datetime) -> dict[tuple, dict[str, int]]:
    """{(bucket, application_id): {field: n}} for [start, end), from the tasks and attempts."""
    trunc = TRUNC[resolution]
    rows: dict[tuple, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_FIELDS, 0))
    status_field: dict[str, str] = {TaskStatus.SUCCEEDED: "succeeded", TaskStatus.FAILED: "failed",
                    TaskStatus.CANCELLED: "cancelled"}  # fmt: skip
    for app_id in Application.objects.values_list("pk", flat=True):
        finished = (
            Task.objects.filter(application_id=app_id, finished_at__gte=start, finished_at__lt=end)
            .annotate(bucket=trunc("finished_at", tzinfo=UTC))
            .values("bucket", "status")
            .annotate(n=Count("pk"))
            .order_by()
        )
        for row in finished:
            if field := status_field.get(row["status"]):
                rows[row["bucket"], app_id][field] += row["n"]
    attempts = (
        CallbackAttempt.objects.filter(started_at__gte=start, started_at__lt=end)
        .annotate(bucket=trunc("started_at", tzinfo=UTC))
        .values("bucket", "task__application_id", "delivered")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for attempt in attempts:
        field = "callbacks_delivered" if attempt["delivered"] else "callbacks_failed"
        rows[attempt["bucket"], attempt["task__application_id"]][field] += attempt["n"]
    return rows


@transaction.atomic
def _upsert(resolution: str, found: dict[tuple, dict[str, int]], start: datetime) -> int:
    """Write the recomputed buckets, never lowering a count already stored: a bucket's tasks
    may since have been removed by retention or started again by a retry, and what finished
    then still finished then."""
    stored = StatsRollup.objects.filter(resolution=resolution, bucket__gte=start)
    for row in stored.values("bucket", "application_id", *COUNT_FIELDS):
        key = (row["bucket"], row["application_id"])
        if key in found:
            found[key] = {name: max(found[key][name], row[name]) for name in COUNT_FIELDS}
    rows = [
        StatsRollup(resolution=resolution, bucket=bucket, application_id=app_id, **values)
        for (bucket, app_id), values in found.items()
    ]
    StatsRollup.objects.bulk_create(
        rows,
        batch_size=500,
        update_conflicts=True,
        unique_fields=["resolution", "bucket", "application"],
        update_fields=list(COUNT_FIELDS),
    )
    return len(rows)


def sample_queue_depth(now: datetime) -> None:
    """Each application's pending tasks now, kept as its bucket's highest sample."""
    for app_id in Application.objects.values_list("pk", flat=True):
        waiting = bounded_count(
            Task.objects.filter(application_id=app_id, status=TaskStatus.PENDING),
            cap=QUEUE_SAMPLE_CAP,
        )
        for resolution in (R.MINUTE, R.HOUR):
            row, _ = StatsRollup.objects.get_or_create(
                resolution=resolution, bucket=floor(now, resolution), application_id=app_id
            )
            if waiting > row.queued_max:
                StatsRollup.objects.filter(pk=row.pk).update(queued_max=waiting)


def prune(now: datetime) -> int:
    removed = 0
    for resolution in (R.MINUTE, R.HOUR):
        removed += StatsRollup.objects.filter(
            resolution=resolution, bucket__lt=now - keep_for(resolution)
        ).delete()[0]
    return removed


def roll_up(*, now: datetime | None = None) -> RollupReport:
    """One pass: recent minutes and hours recomputed, depth sampled, old rows pruned."""
    now = now or timezone.now()
    report = RollupReport()
    for resolution in (R.MINUTE, R.HOUR):
        start = _start(resolution, now)
        written = _upsert(resolution, counts(resolution=resolution, start=start, end=now), start)
        if resolution == R.MINUTE:
            report.minutes = written
        else:
            report.hours = written
    sample_queue_depth(now)
    report.pruned = prune(now)
    return report
