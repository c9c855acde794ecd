"""The SVG charts: round axis ticks, whole numbers for counts, gaps for missing values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dashboard.ui.charts import nice_ceiling, time_chart

BUCKETS = [datetime(2026, 12, 2, 12, tzinfo=UTC) + timedelta(minutes=n) for n in range(6)]


def labels(chart) -> list[str]:
    return [label for _, label in chart.y_ticks]


def test_counts_get_whole_round_ticks():
    chart = time_chart(title="t", unit="tasks/min", buckets=BUCKETS,
                       series=[("done", "s-ok", [0, 3, 1, 0, 2, 0])])  # fmt: skip
    assert labels(chart) == ["0", "1", "2", "3", "4"]
    chart = time_chart(title="t", unit="tasks/min", buckets=BUCKETS,
                       series=[("done", "s-ok", [0, 130, 1, 0, 2, 0])])  # fmt: skip
    assert labels(chart) == ["0", "50", "100", "150", "200"]
    assert nice_ceiling(0.3) == 0.5 and nice_ceiling(7) == 10 and nice_ceiling(0) == 1


def test_a_percent_axis_is_fixed_and_missing_values_leave_gaps():
    chart = time_chart(title="t", unit="%", buckets=BUCKETS, fixed_top=100,
                       series=[("ok", "s-ok", [None, 50.0, None, 100.0, 75.5, None])])  # fmt: skip
    assert labels(chart) == ["0", "25", "50", "75", "100"]
    (series,) = chart.series
    assert len(series.points) == 3
    assert series.path.count("M") == 2 and series.path.count("L") == 1  # 50 | 100 - 75.5
    assert "2026-12-02 12:01 UTC · ok: 50 %" in series.markers
    assert not chart.empty
    empty = time_chart(title="t", unit="%", buckets=BUCKETS, series=[("ok", "s-ok", [None] * 6)])
    assert empty.empty
