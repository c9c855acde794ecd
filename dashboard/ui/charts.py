"""Server-rendered SVG charts with axes, units, a legend and a hover value on every point:
no chart library, no JavaScript (the pages run under a strict CSP). Rendered by
templates/dashboard/_chart.html."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from django.utils import timezone
from django.utils.html import format_html_join
from django.utils.safestring import SafeString

WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 34  # room for the y labels, the x labels and the unit


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    title: str  # the hover text: "21:04 UTC · 12 tasks/min"
    starts_segment: bool = False  # the value before it is missing: the line breaks here


@dataclass
class Series:
    name: str
    css: str  # a class of static/taskhook.css: the colour
    points: list[Point] = field(default_factory=list)

    @property
    def markers(self) -> SafeString:
        """One circle per point with its hover value, built here rather than in a template
        loop: a 7-day chart has 168 points per series."""
        return format_html_join(
            "",
            '<circle cx="{}" cy="{}" r="3"><title>{}</title></circle>',
            ((f"{p.x:.1f}", f"{p.y:.1f}", p.title) for p in self.points),
        )

    @property
    def path(self) -> str:
        """Line segments between known points; a gap where a value is missing."""
        parts = []
        for index, point in enumerate(self.points):
            move = index == 0 or point.starts_segment
            parts.append(f"{'M' if move else 'L'}{point.x:.1f},{point.y:.1f}")
        return " ".join(parts)


@dataclass
class Chart:
    title: str
    unit: str
    series: list[Series]
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    bottom_y: float = HEIGHT - BOTTOM
    right_x: float = WIDTH - RIGHT
    empty: bool = False
    zone: str = "UTC"


def nice_ceiling(value: float) -> float:
    """1, 2, 2.5, 5 or 10 times a power of ten, at or above value (an axis top people read)."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def _number(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def time_chart(
    *,
    title: str,
    unit: str,
    buckets: list[datetime],
    series: list[tuple[str, str, list[float | int | None]]],
    fixed_top: float | None = None,
    label_format: str = "%H:%M",
) -> Chart:
    """A line chart of values per time bucket. `series`: (name, css class, values), one value
    per bucket (None: no value there, drawn as a gap). X labels in the operator's zone."""
    zone = timezone.get_current_timezone()
    zone_name = timezone.get_current_timezone_name()
    known = [v for _, _, values in series for v in values if v is not None]
    # Four steps of a round size; whole numbers for counts (never a tick at 1.2 tasks).
    step = nice_ceiling(max(known, default=0) / 4)
    if all(float(v).is_integer() for v in known):
        step = max(1.0, math.ceil(step))
    top = fixed_top or step * 4
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    count = max(1, len(buckets) - 1)

    def x_at(index: int) -> float:
        return LEFT + plot_w * index / count

    def y_at(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    drawn = []
    for name, css, values in series:
        line = Series(name=name, css=css)
        gap = False
        for index, value in enumerate(values):
            if value is None:
                gap = True
                continue
            local = timezone.localtime(buckets[index], zone)
            line.points.append(Point(x_at(index), y_at(value),
                                     f"{local:%Y-%m-%d %H:%M} {local.tzname()} · {name}: "
                                     f"{_number(value)} {unit}", starts_segment=gap))  # fmt: skip
            gap = False
        drawn.append(line)
    y_ticks = [(y_at(top * n / 4), _number(top * n / 4)) for n in range(5)]
    every = max(1, len(buckets) // 6)
    x_ticks = [(x_at(i), timezone.localtime(buckets[i], zone).strftime(label_format))
               for i in range(0, len(buckets), every)]  # fmt: skip
    return Chart(title=title, unit=unit, series=drawn, x_ticks=x_ticks, y_ticks=y_ticks,
                 empty=not known, zone=zone_name)  # fmt: skip
