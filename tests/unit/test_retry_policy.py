"""tasks.delivery.retry_policy: the schedule, each delay, jitter, Retry-After and 410 (no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from tasks.delivery import retry_policy as rp


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10,60,300", [10, 60, 300]),
        (" 10 , 60 ,, 300 , ", [10, 60, 300]),
        ("", []),
        ([], []),
        ([5], [5]),
        ((1, 2), [1, 2]),
        (["7", 8], [7, 8]),
        ([1] * rp.MAX_RETRIES, [1] * rp.MAX_RETRIES),
        ([rp.MAX_STEP_SECONDS], [rp.MAX_STEP_SECONDS]),
    ],
)
def test_parse_schedule_accepts(value, expected):
    assert rp.parse_schedule(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("10,abc", "whole seconds"),
        ("1.5", "whole seconds"),
        ([10, None], "whole seconds"),
        ([10, 2.5j], "whole seconds"),
        ([0], "between 1 and"),
        ("-1", "between 1 and"),
        ([rp.MAX_STEP_SECONDS + 1], "between 1 and"),
        ([1] * (rp.MAX_RETRIES + 1), f"at most {rp.MAX_RETRIES} retries"),
        (10, "must be a list"),
        (None, "must be a list"),
        ({"a": 1}, "must be a list"),
    ],
)
def test_parse_schedule_refuses_with_a_reason(value, reason):
    with pytest.raises(rp.InvalidSchedule, match=reason):
        rp.parse_schedule(value)


def test_invalid_schedule_is_a_value_error():
    assert issubclass(rp.InvalidSchedule, ValueError)


@pytest.mark.parametrize("jitter", [0.0, rp.JITTER])
def test_next_delay_each_step_at_the_jitter_bounds(monkeypatch, jitter):
    monkeypatch.setattr(random, "uniform", lambda a, b: jitter)
    schedule = [10, 60, 300]
    delays = [rp.next_delay(schedule=schedule, auto_attempt=n, status_code=500) for n in (1, 2, 3)]
    assert delays == pytest.approx([step * (1 + jitter) for step in schedule])


def test_next_delay_jitter_is_never_early_and_at_most_ten_percent():
    random.seed(1234)
    delays = [rp.next_delay(schedule=[100], auto_attempt=1, status_code=None) for _ in range(2000)]
    assert min(delays) >= 100
    assert max(delays) <= 110
    assert max(delays) - min(delays) > 5  # it does spread retries


def test_past_the_schedule_there_is_no_retry():
    assert rp.next_delay(schedule=[10, 60], auto_attempt=3, status_code=500) is None
    assert rp.next_delay(schedule=[], auto_attempt=1, status_code=500) is None
    assert rp.next_delay(schedule=[10, 60], auto_attempt=2, status_code=500) is not None


@pytest.mark.parametrize("auto_attempt", [1, 2, 5])
def test_410_stops_at_once(auto_attempt):
    assert rp.next_delay(schedule=[10, 60], auto_attempt=auto_attempt, status_code=410) is None
    assert rp.next_delay(schedule=[10, 60], auto_attempt=1, status_code=410, retry_after=5) is None


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_pushes_out_and_is_capped(monkeypatch, status):
    monkeypatch.setattr(random, "uniform", lambda a, b: 0.0)
    kwargs = {"schedule": [10, 60], "auto_attempt": 1, "status_code": status}
    assert rp.next_delay(retry_after=120, **kwargs) == 120
    assert rp.next_delay(retry_after=3, **kwargs) == 10  # never earlier than the step
    assert rp.next_delay(retry_after=None, **kwargs) == 10
    cap = 10 + rp.RETRY_AFTER_CAP_EXTRA
    assert rp.next_delay(retry_after=10**9, **kwargs) == cap
    assert rp.next_delay(retry_after=cap + 1, **kwargs) == cap
    second = {**kwargs, "auto_attempt": 2}
    assert rp.next_delay(retry_after=10**9, **second) == 60 + rp.RETRY_AFTER_CAP_EXTRA


@pytest.mark.parametrize("status", [500, 502, 404, None])
def test_retry_after_is_ignored_on_other_statuses(monkeypatch, status):
    monkeypatch.setattr(random, "uniform", lambda a, b: 0.0)
    assert rp.next_delay(schedule=[10], auto_attempt=1, status_code=status, retry_after=999) == 10


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        (str(rp.MAX_STEP_SECONDS), float(rp.MAX_STEP_SECONDS)),
        ("9" * 40, float(rp.MAX_STEP_SECONDS)),  # huge: capped
        (None, None),
        ("", None),
        ("garbage", None),
        ("-5", None),
        ("1.5", None),
        ("\u0661\u0662", None),  # Arabic-Indic digits: str.isdigit() says yes, HTTP says no
        ("\uff11\uff12", None),  # full-width digits
        ("Mon, 99 Foo 2024 00:00:00 GMT", None),
    ],
)
def test_parse_retry_after_values(value, expected):
    assert rp.parse_retry_after(value) == expected


def test_parse_retry_after_http_date_in_the_future():
    when = datetime.now(UTC) + timedelta(seconds=300)
    header = format_datetime(when, usegmt=True)
    assert header.endswith("GMT")
    assert 295 <= rp.parse_retry_after(header) <= 300


def test_parse_retry_after_minus_0000_date_is_read_as_gmt():
    when = datetime.now(UTC) + timedelta(seconds=600)
    header = when.strftime("%a, %d %b %Y %H:%M:%S -0000")
    assert 595 <= rp.parse_retry_after(header) <= 600


def test_parse_retry_after_past_date_is_zero():
    assert rp.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert rp.parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000") == 0.0


def test_attempts_count_from_one():
    with pytest.raises(ValueError, match="from 1"):
        rp.next_delay(schedule=[10, 60, 300], auto_attempt=0, status_code=500)
