"""tasks.execution.deadlines: how a submit states its deadline (`Cancel-After`,
`deadline_seconds`), and the check a running run makes (no database)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tasks.execution import deadlines
from tasks.execution.runners import TaskCancelled


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1.5", 1.5),
        ("1.5m", 90.0), ("0.25s", 0.25), ("007", 7.0), (" 10s\t", 10.0), ("604800", 604800.0),
        ("10080m", 604800.0), ("168h", 604800.0), ("0.001", 0.001),
    ],
)  # fmt: skip
def test_cancel_after_takes_seconds_or_a_unit(raw, seconds):
    assert deadlines.parse_cancel_after(raw) == seconds


@pytest.mark.parametrize("raw", [None, "", "  ", "\t"])
def test_an_empty_cancel_after_is_none(raw):
    assert deadlines.parse_cancel_after(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        "0", "0s", "0.0m", "-5", "+5", "abc", "5d", "5ms", "5M", "5S", "1e3", "inf", "nan",
        "604801", "10081m", "169h", "10 s", "1.", ".5", "1,5", "5s5", "30, 40", "٣", "5\n",
    ],
)  # fmt: skip
def test_a_bad_cancel_after_names_the_header(raw):
    with pytest.raises(deadlines.InvalidDeadline) as raised:
        deadlines.parse_cancel_after(raw)
    assert raised.value.field == "Cancel-After"
    assert "Cancel-After must be" in raised.value.message


@pytest.mark.parametrize(
    ("value", "seconds"), [(30, 30.0), (0.5, 0.5), (604800, 604800.0), (1e-3, 0.001)]
)
def test_deadline_seconds_takes_a_positive_number(value, seconds):
    assert deadlines.parse_deadline_seconds(value) == seconds
    assert isinstance(deadlines.parse_deadline_seconds(value), float)  # one hash for 30, 30.0


@pytest.mark.parametrize(
    "value", [0, 0.0, -1, 604800.5, 10**400, float("inf"), float("nan"), True, False, "30", [30],
              {"s": 30}],
)  # fmt: skip
def test_a_bad_deadline_seconds_names_the_field(value):
    with pytest.raises(deadlines.InvalidDeadline) as raised:
        deadlines.parse_deadline_seconds(value)
    assert raised.value.field == "deadline_seconds"


def test_the_sooner_bound_wins():
    assert deadlines.client_bound(cancel_after="1m", deadline_seconds=30) == 30.0
    assert deadlines.client_bound(cancel_after="10", deadline_seconds=30) == 10.0
    assert deadlines.client_bound(cancel_after=None, deadline_seconds=None) is None
    assert deadlines.client_bound(cancel_after="", deadline_seconds=12) == 12.0
    with pytest.raises(deadlines.InvalidDeadline):  # a bad one is refused, even if not sooner
        deadlines.client_bound(cancel_after="soon", deadline_seconds=1)


def test_check_raises_a_task_cancelled_once_the_deadline_passed():
    deadlines.check(None)
    deadlines.check(timezone.now() + timedelta(minutes=1))
    with pytest.raises(TaskCancelled) as raised:  # what a cooperative runner stops on
        deadlines.check(timezone.now() - timedelta(microseconds=1))
    assert isinstance(raised.value, deadlines.DeadlineExceeded)
    assert str(raised.value) == deadlines.CLIENT_BOUND_RUNNING
