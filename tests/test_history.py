"""History: rollups from the database into minutes and hours, and the page's charts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.models import CallbackAttempt, StatsRollup, Task
from tasks.selectors import history as selector
from tasks.telemetry import rollups

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 12, 2, 12, 30, 20, tzinfo=UTC)


def finished(app, status: str, at: datetime, *, attempts: tuple[bool, ...] = ()) -> Task:
    task = Task.objects.create(application=app.application, inputs={}, status=status,
                               created_at=at - timedelta(seconds=1), finished_at=at)  # fmt: skip
    for number, delivered in enumerate(attempts, 1):
        CallbackAttempt.objects.create(task=task, run=1, number=number, trigger="auto",
                                       started_at=at, url="http://x/",
                                       delivered=delivered)  # fmt: skip
    return task


def rows(resolution: str, app) -> dict[datetime, StatsRollup]:
    return {row.bucket: row for row in StatsRollup.objects.filter(
        resolution=resolution, application=app.application)}  # fmt: skip


def test_finished_tasks_and_attempts_roll_into_minutes_and_hours(make_app):
    app, other = make_app("echo"), make_app("sleep")
    minute = NOW.replace(second=0) - timedelta(minutes=3)
    finished(app, "succeeded", minute + timedelta(seconds=5), attempts=(False, True))
    finished(app, "succeeded", minute + timedelta(seconds=59))
    finished(app, "failed", minute + timedelta(seconds=30), attempts=(False,))
    finished(app, "cancelled", minute + timedelta(minutes=1))
    finished(other, "failed", minute)
    Task.objects.create(application=app.application, inputs={}, status="pending")
    rollups.roll_up(now=NOW)
    by_minute = rows("minute", app)
    first = by_minute[minute]
    assert (first.succeeded, first.failed, first.cancelled) == (2, 1, 0)
    assert (first.callbacks_delivered, first.callbacks_failed) == (1, 2)
    assert by_minute[minute + timedelta(minutes=1)].cancelled == 1
    assert by_minute[NOW.replace(second=0)].queued_max == 1  # the depth sample of this minute
    hour = rows("hour", app)[NOW.replace(minute=0, second=0)]
    assert (hour.succeeded, hour.failed, hour.cancelled, hour.queued_max) == (2, 1, 1, 1)
    assert rows("minute", other)[minute].failed == 1  # per application


def test_a_pass_is_idempotent_and_catches_up_after_downtime(make_app):
    app = make_app("echo")
    early = NOW - timedelta(hours=3)
    finished(app, "succeeded", early)
    rollups.roll_up(now=early + timedelta(minutes=2))
    assert rows("minute", app)[early.replace(second=0)].succeeded == 1
    # Three hours without a pass, then one: the minutes in between are rolled too.
    later = NOW - timedelta(minutes=10)
    finished(app, "failed", later)
    rollups.roll_up(now=NOW)
    rollups.roll_up(now=NOW)  # again: the same counts, not double
    by_minute = rows("minute", app)
    assert by_minute[later.replace(second=0)].failed == 1
    assert by_minute[early.replace(second=0)].succeeded == 1
    assert sum(row.failed for row in by_minute.values()) == 1
    # A result committed late, into a minute already rolled, counts at the next pass.
    finished(app, "succeeded", NOW - timedelta(minutes=2))
    rollups.roll_up(now=NOW + timedelta(seconds=30))
    assert rows("minute", app)[(NOW - timedelta(minutes=2)).replace(second=0)].succeeded == 1
    # Retention removing a rolled minute's tasks does not lower its count.
    Task.objects.filter(finished_at=later).delete()
    rollups.roll_up(now=NOW + timedelta(seconds=40))
    assert rows("minute", app)[later.replace(second=0)].failed == 1


def test_old_rows_are_pruned_to_the_bounds(make_app, settings):
    app = make_app("echo")
    for resolution, age in (
        ("minute", timedelta(hours=49)),
        ("minute", timedelta(hours=47)),
        ("hour", timedelta(days=36)),
        ("hour", timedelta(days=34)),
    ):
        StatsRollup.objects.create(resolution=resolution, bucket=NOW - age,
                                   application=app.application, succeeded=1)  # fmt: skip
    report = rollups.roll_up(now=NOW)
    assert report.pruned == 2
    ages = sorted((r.resolution, NOW - r.bucket) for r in StatsRollup.objects.filter(succeeded=1))
    assert ages == [("hour", timedelta(days=34)), ("minute", timedelta(hours=47))]


def test_history_sums_applications_and_fills_empty_buckets(make_app):
    app, other = make_app("echo"), make_app("sleep")
    minute = NOW.replace(second=0) - timedelta(minutes=5)
    finished(app, "succeeded", minute, attempts=(True, False, False, True))
    finished(other, "succeeded", minute)
    rollups.roll_up(now=NOW)
    data = selector.history(range_key="1h", now=NOW)
    assert len(data.buckets) == 60 and data.buckets[-1] == NOW.replace(second=0)
    index = data.buckets.index(minute)
    assert data.series["succeeded"][index] == 2 and sum(data.series["succeeded"]) == 2
    assert data.callback_success[index] == 50.0 and data.callback_success[0] is None
    one = selector.history(range_key="1h", application_id=str(other.application.pk), now=NOW)
    assert one.totals["succeeded"] == 1
    assert len(selector.history(range_key="7d", now=NOW).buckets) == 168


def test_the_page_draws_charts_with_axes_units_and_hover_values(viewer, make_app):
    app = make_app("echo")
    finished(app, "succeeded", datetime.now(UTC) - timedelta(minutes=2))
    rollups.roll_up()
    for range_key in ("1h", "24h", "7d"):
        html = viewer.get(f"/history/?range={range_key}").content.decode()
        assert html.count("<svg") == 4, range_key
        per = "min" if range_key == "1h" else "h"
        assert f"tasks/{per}" in html and "% of attempts" in html and "tasks waiting" in html
        assert 'class="tick x"' in html and 'class="tick y"' in html
        assert "<title>" in html and "succeeded: 1 tasks/" in html
    partial = viewer.get(f"/history/?range=24h&application={app.application.pk}",
                         HTTP_HX_REQUEST="true").content.decode()  # fmt: skip
    assert "<html" not in partial and partial.lstrip().startswith('<section id="history"')
    assert f'data-application="{app.application.name}" aria-current="true"' in partial
    assert viewer.get("/history/?range=bogus&application=nope").status_code == 200  # defaults
