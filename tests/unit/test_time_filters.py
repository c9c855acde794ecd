"""Times as people read them, and absolute times that say their zone."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from dashboard.templatetags.taskhook import ago, clock, hours, human_seconds, when


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 ms"), (0.85, "850 ms"), (9.9, "9.9 s"), (59, "59 s"), (60, "1 min"), (72, "1 min 12 s"),
    (3600, "1 h"), (3660, "1 h 1 min"), (90000, "1 d 1 h"), (86400, "1 d"), (-5, "0 ms"),
])  # fmt: skip
def test_human_seconds(seconds, text):
    assert human_seconds(seconds) == text


def test_ago_and_in():
    now = timezone.now()
    assert ago(now - timedelta(seconds=3)).endswith("s ago")
    assert ago(now + timedelta(seconds=40)).startswith("in ")
    assert ago(now) == "just now" and ago(None) == ""


def test_when_says_the_zone_and_follows_the_active_one():
    moment = datetime(2026, 7, 1, 12, 0, 5, 123456, tzinfo=UTC)
    assert when(moment) == "2026-07-01 12:00:05 UTC"
    assert when(moment, "ms") == "2026-07-01 12:00:05.123 UTC"
    assert when(moment, "m") == "2026-07-01 12:00 UTC"
    with timezone.override(zoneinfo.ZoneInfo("Europe/Paris")):
        assert when(moment) == "2026-07-01 14:00:05 CEST"
        assert clock(moment) == "14:00:05.123 CEST"
    assert hours(36) == "1 d 12 h" and hours(24) == "1 d"
