"""tasks.execution.auto_retry: which failures are retried, how often, and the backoff."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

import pytest

from tasks.execution import auto_retry
from tasks.execution.auto_retry import RetryableError
from tasks.execution.runners import RetryableError as ExportedForRunners
from tasks.execution.runners import RunnerError


def test_runner_authors_import_the_same_class_and_it_is_a_runner_error():
    assert ExportedForRunners is RetryableError
    assert issubclass(RetryableError, RunnerError)
    assert RetryableError("x").retry_after is None
    assert RetryableError("x", retry_after=7).retry_after == 7


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (RetryableError("upstream down"), True),
        (RunnerError("bad input"), False),
        (ValueError("bug"), False),
        (TimeoutError("a bare timeout is not a runner's word"), False),
    ],
)
def test_only_a_retryable_error_is_retryable(exc, retryable):
    assert auto_retry.is_retryable(exc) is retryable


@pytest.mark.parametrize(
    ("allowed", "made", "opted_out", "retry"),
    [
        (3, 0, False, True),
        (3, 2, False, True),
        (3, 3, False, False),  # exhausted
        (0, 0, False, False),  # the application does not retry
        (3, 0, True, False),  # the submit said "retry": false
    ],
)
def test_should_retry(allowed, made, opted_out, retry):
    exc = RetryableError("upstream down")
    assert auto_retry.should_retry(exc, allowed=allowed, made=made, opted_out=opted_out) is retry
    assert not auto_retry.should_retry(
        RunnerError("x"), allowed=allowed, made=made, opted_out=opted_out
    )


@pytest.mark.parametrize("number", range(1, 11))
def test_backoff_doubles_with_at_most_ten_percent_jitter_never_below(number):
    expected = 5 * 2 ** (number - 1)
    rng = random.Random(number)
    delays = [auto_retry.backoff_seconds(number, base=5, rng=rng) for _ in range(200)]
    assert all(expected <= d <= expected * 1.1 for d in delays)
    assert len(set(delays)) > 1  # jittered


def test_backoff_jitter_extremes():
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def uniform(self, a: float, b: float) -> float:
            return a + (b - a) * self.value

    assert auto_retry.backoff_seconds(1, base=10, rng=Fixed(0.0)) == 10
    assert auto_retry.backoff_seconds(2, base=10, rng=Fixed(1.0)) == pytest.approx(22)


def test_retry_after_is_the_lower_bound_and_is_capped():
    assert auto_retry.backoff_seconds(1, base=1, retry_after=30) == 30
    assert 8 <= auto_retry.backoff_seconds(4, base=1, retry_after=2) <= 8.8  # a smaller hint
    assert auto_retry.backoff_seconds(1, base=1, retry_after=10**9) == (
        auto_retry.MAX_RETRY_AFTER_SECONDS
    )
    assert 1 <= auto_retry.backoff_seconds(1, base=1, retry_after=-5) <= 1.1


def test_backoff_is_capped_and_zero_base_is_at_once():
    assert auto_retry.backoff_seconds(10, base=3600) == auto_retry.MAX_BACKOFF_SECONDS
    assert auto_retry.backoff_seconds(3, base=0) == 0


def test_retry_after_of_reads_the_hint():
    assert auto_retry.retry_after_of(RetryableError("x", retry_after=3)) == 3
    assert auto_retry.retry_after_of(RetryableError("x")) is None
    assert auto_retry.retry_after_of(RunnerError("x")) is None


def test_due_time_is_a_whole_second_never_early():
    before = time.time()
    due = auto_retry.due_time(2.3)
    assert due.timestamp() == int(due.timestamp())
    assert due.timestamp() >= before + 2.3
    assert due.tzinfo is not None


def test_due_time_counts_from_when_the_run_ended():
    # A run that ended just before a second boundary: the wait counts from its end, which the
    # run history records, not from whenever the due time happens to be computed.
    ended = datetime(2026, 12, 7, 16, 24, 55, 999_000, tzinfo=UTC)
    due = auto_retry.due_time(7, since=ended)
    assert due == datetime(2026, 12, 7, 16, 25, 3, tzinfo=UTC)
    assert due - ended >= timedelta(seconds=7)


def test_the_log_line():
    line = auto_retry.describe(number=1, allowed=3, delay=5.04, error="upstream answered HTTP 503")
    assert line == "automatic retry 1 of 3 in 5 s: upstream answered HTTP 503"
    assert auto_retry.describe(number=2, allowed=3, delay=10.56, error="x").endswith("in 10.6 s: x")
