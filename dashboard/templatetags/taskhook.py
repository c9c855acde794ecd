"""Template filters for the dashboard: JSON, and times as people read them.

Every absolute time says its zone (`when`); ages and durations read "3 s ago", "1 min 12 s"
(`ago`, `duration`, `seconds`). The zone is the operator's choice (dashboard.ui.zones) or UTC.
"""

from __future__ import annotations

import json
from datetime import datetime

from django import template
from django.utils import timezone

register = template.Library()


@register.filter
def pretty_json(value) -> str:
    """Indented JSON (not Python's repr); autoescaping still applies where it is shown."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def human_seconds(seconds: float) -> str:
    """850 ms, 12.4 s, 1 min 12 s, 3 h 5 min, 2 d 4 h: two units at most."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@register.filter
def seconds(value: float | int | None) -> str:
    """A number of seconds as people read it: `{{ 72|seconds }}` -> '1 min 12 s'."""
    if value is None or value == "":
        return ""
    return human_seconds(float(value))


@register.filter
def hours(value: float | int | None) -> str:
    """A number of hours as people read it: 24 -> '1 d', 36 -> '1 d 12 h'."""
    if value is None or value == "":
        return ""
    return human_seconds(float(value) * 3600)


@register.filter
def duration(start: datetime | None, end: datetime | None) -> str:
    """'850 ms', '12.4 s', '3 min 5 s' between two datetimes; '' when either is missing."""
    if not start or not end:
        return ""
    return human_seconds((end - start).total_seconds())


@register.filter
def ago(value: datetime | None) -> str:
    """'3 s ago', '1 min 12 s ago'; 'in 40 s' for a time to come; '' for none."""
    if not value:
        return ""
    delta = (timezone.now() - value).total_seconds()
    if -1 < delta < 1:
        return "just now"
    return f"{human_seconds(delta)} ago" if delta > 0 else f"in {human_seconds(-delta)}"


@register.filter
def when(value: datetime | None, precision: str = "s") -> str:
    """An absolute time in the operator's zone, to the second, with the zone:
    '2026-12-02 21:04:20 UTC'. `{{ t|when:"ms" }}` adds milliseconds, `{{ t|when:"m" }}`
    stops at minutes."""
    if not value:
        return ""
    local = timezone.localtime(value) if timezone.is_aware(value) else value
    text = local.strftime("%Y-%m-%d %H:%M" if precision == "m" else "%Y-%m-%d %H:%M:%S")
    if precision == "ms":
        text += f".{local.microsecond // 1000:03d}"
    return f"{text} {local.tzname() or 'UTC'}"


@register.filter
def clock(value: datetime | None) -> str:
    """Only the time of day with milliseconds and zone, for timelines within one day."""
    if not value:
        return ""
    local = timezone.localtime(value) if timezone.is_aware(value) else value
    return f"{local:%H:%M:%S}.{local.microsecond // 1000:03d} {local.tzname() or 'UTC'}"


# --- the long tables' rows, built in Python (dashboard.ui.rows says why) -----------------------


@register.simple_tag
def task_rows(tasks, is_operator=False):
    from dashboard.ui import rows

    return rows.task_rows(tasks, is_operator=bool(is_operator))


@register.simple_tag
def batch_item_rows(items):
    from dashboard.ui import rows

    return rows.batch_item_rows(items)


@register.simple_tag
def attempt_rows(attempts):
    from dashboard.ui import rows

    return rows.attempt_rows(attempts)


@register.simple_tag
def application_links(applications):
    from dashboard.ui import rows

    return rows.application_links(applications)
