"""Template filters for the dashboard."""

from __future__ import annotations

import json
from datetime import datetime

from django import template

register = template.Library()


@register.filter
def pretty_json(value) -> str:
    """Indented JSON (not Python's repr); autoescaping still applies where it is shown."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


@register.filter
def duration(start: datetime | None, end: datetime | None) -> str:
    """'850 ms', '12.4 s', '3 min 5 s' between two datetimes; '' when either is missing."""
    if not start or not end:
        return ""
    seconds = (end - start).total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"
