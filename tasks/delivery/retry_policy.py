"""Callback retry policy: when the next automatic attempt is due, if at all (README: Callbacks).

The schedule lists the delays between attempts: `[10, 60, 300]` means the first attempt at once,
then retries 10 s, 60 s and 300 s after each failure (4 attempts in all). A little jitter (up to
+10 %) spreads retries of many tasks that failed together; it never makes a retry early.
`Retry-After` on 429/503 pushes the next attempt out to at least that, capped at the step + 2 h.
`410 Gone` stops retrying at once.
"""

from __future__ import annotations

import random
from datetime import UTC
from email.utils import parsedate_to_datetime

from django.utils import timezone

MAX_RETRIES = 20
MAX_STEP_SECONDS = 7 * 24 * 3600
RETRY_AFTER_CAP_EXTRA = 2 * 3600
JITTER = 0.10
DEFAULT_SCHEDULE = (10, 60, 300)


class InvalidSchedule(ValueError):
    pass


def parse_schedule(value: str | list | tuple) -> list[int]:
    """'10,60,300' or [10, 60, 300] -> [10, 60, 300]; raises InvalidSchedule with a reason."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise InvalidSchedule("the retry schedule must be a list of seconds")
    try:
        steps = [int(part) for part in parts]
    except (TypeError, ValueError) as exc:
        raise InvalidSchedule("every step of the retry schedule must be whole seconds") from exc
    if len(steps) > MAX_RETRIES:
        raise InvalidSchedule(f"at most {MAX_RETRIES} retries")
    if any(step < 1 or step > MAX_STEP_SECONDS for step in steps):
        raise InvalidSchedule(f"each step must be between 1 and {MAX_STEP_SECONDS} seconds")
    return steps


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (RFC 9110: delay-seconds or an HTTP-date), or None for
    anything else: a receiver's odd header never breaks the policy."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), MAX_STEP_SECONDS))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000" and obsolete forms parse naive; HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - timezone.now()).total_seconds())


def next_delay(
    *,
    schedule: list[int],
    auto_attempt: int,
    status_code: int | None,
    retry_after: float | None = None,
) -> float | None:
    """Seconds until automatic attempt `auto_attempt + 1`, or None when retries are over."""
    if auto_attempt < 1:
        raise ValueError("auto_attempt counts from 1")
    if status_code == 410:
        return None
    if auto_attempt > len(schedule):
        return None
    step = float(schedule[auto_attempt - 1])
    delay = step * (1 + random.uniform(0, JITTER))
    if status_code in (429, 503) and retry_after is not None:
        delay = max(delay, min(retry_after, step + RETRY_AFTER_CAP_EXTRA))
    return delay
