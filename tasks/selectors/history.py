"""The History page's series: rollup rows summed per bucket, over 1 h, 24 h or 7 days, for
every application or one. At most 168 buckets x applications rows (index
stats_rollup_range_idx)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Max, Sum
from django.utils import timezone

from tasks.models import StatsRollup
from tasks.telemetry.rollups import COUNT_FIELDS, STEP, R, floor


@dataclass(frozen=True)
class Range:
    key: str
    label: str
    resolution: str
    buckets: int

    @property
    def per(self) -> str:
        return "min" if self.resolution == R.MINUTE else "h"


RANGES = {
    "1h": Range("1h", "1 hour", R.MINUTE, 60),
    "24h": Range("24h", "24 hours", R.HOUR, 24),
    "7d": Range("7d", "7 days", R.HOUR, 168),
}
DEFAULT_RANGE = "1h"


@dataclass
class History:
    range: Range
    buckets: list[datetime]
    series: dict[str, list[int]]  # each count field and queued_max, one value per bucket
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def callback_success(self) -> list[float | None]:
        """Percent of callback attempts delivered per bucket; None where none was made."""
        values: list[float | None] = []
        for ok, bad in zip(self.series["callbacks_delivered"], self.series["callbacks_failed"],
                           strict=True):  # fmt: skip
            values.append(round(100 * ok / (ok + bad), 1) if ok + bad else None)
        return values

    @property
    def success_rate(self) -> float | None:
        done = self.totals["succeeded"] + self.totals["failed"]
        return round(100 * self.totals["succeeded"] / done, 1) if done else None


def history(*, range_key: str = DEFAULT_RANGE, application_id: str = "",
            now: datetime | None = None) -> History:  # fmt: skip
    chosen = RANGES.get(range_key, RANGES[DEFAULT_RANGE])
    step = STEP[chosen.resolution]
    last = floor(now or timezone.now(), chosen.resolution)
    buckets = [last - step * n for n in range(chosen.buckets - 1, -1, -1)]
    rows = StatsRollup.objects.filter(resolution=chosen.resolution, bucket__gte=buckets[0],
                                      bucket__lte=last)  # fmt: skip
    if application_id:
        rows = rows.filter(application_id=application_id)
    aggregates: dict[str, Sum | Max] = {name: Sum(name) for name in COUNT_FIELDS}
    # Depth: the sum over applications of each one's highest sample in the bucket.
    aggregates["queued_max"] = Sum("queued_max") if not application_id else Max("queued_max")
    by_bucket: dict[datetime, dict[str, Any]] = {
        row["bucket"]: dict(row) for row in rows.values("bucket").annotate(**aggregates).order_by()
    }
    names = (*COUNT_FIELDS, "queued_max")
    series = {name: [int((by_bucket.get(b) or {}).get(name) or 0) for b in buckets]
              for name in names}  # fmt: skip
    totals = {name: sum(series[name]) for name in COUNT_FIELDS}
    totals["queued_peak"] = max(series["queued_max"], default=0)
    return History(range=chosen, buckets=buckets, series=series, totals=totals)


def covers(*, now: datetime | None = None) -> timedelta:
    """How far back the kept rows reach (for the page's note)."""
    oldest = StatsRollup.objects.filter(resolution=R.HOUR).order_by("bucket").first()
    return (now or timezone.now()) - oldest.bucket if oldest else timedelta(0)
