"""tasks.api.ratelimit: the token bucket script against the suite's real (embedded) Redis."""

from __future__ import annotations

import uuid

import pytest

from tasks.api import ratelimit
from tasks.models import ApiKey, Application
from tasks.plumbing.queueing import redis_client


@pytest.fixture
def bucket():
    name = f"unit-{uuid.uuid4().hex}"
    yield name
    redis_client().delete(f"taskhook:ratelimit:{name}")


def key_of(bucket: str) -> str:
    return f"taskhook:ratelimit:{bucket}"


def age_bucket(bucket: str, seconds: float) -> None:
    """Move the bucket's last refill `seconds` into the past (instead of sleeping)."""
    client = redis_client()
    ts = float(client.hget(key_of(bucket), "ts"))
    client.hset(key_of(bucket), "ts", repr(ts - seconds))


def test_burst_then_refused_with_a_wait_of_one_over_rate(bucket):
    # Slow rates throughout: a token refills only after a second, so a loaded machine's delays
    # between the calls never refill one (at 10/s they did).
    results = [ratelimit.take(bucket=bucket, rate=1, burst=3) for _ in range(3)]
    assert [allowed for allowed, _ in results] == [True, True, True]
    assert all(wait == 0 for _, wait in results)
    allowed, wait = ratelimit.take(bucket=bucket, rate=1, burst=3)
    assert not allowed
    assert 0.5 < wait <= 1.0  # one token at 1/s, minus what refilled since


def test_refill_over_time(bucket):
    for _ in range(4):
        ratelimit.take(bucket=bucket, rate=1, burst=4)
    assert not ratelimit.take(bucket=bucket, rate=1, burst=4)[0]
    age_bucket(bucket, 2.5)  # 2.5 tokens at 1/s
    assert [ratelimit.take(bucket=bucket, rate=1, burst=4)[0] for _ in range(3)] == [
        True, True, False,
    ]  # fmt: skip
    age_bucket(bucket, 3600)  # refill stops at the burst
    assert [ratelimit.take(bucket=bucket, rate=1, burst=4)[0] for _ in range(5)] == [
        True, True, True, True, False,
    ]  # fmt: skip


def test_cost_and_wait_for_several_tokens(bucket):
    assert ratelimit.take(bucket=bucket, rate=0.2, burst=5, cost=5) == (True, 0.0)
    allowed, wait = ratelimit.take(bucket=bucket, rate=0.2, burst=5, cost=3)
    assert not allowed and 14 < wait <= 15  # 3 tokens at 0.2/s
    tokens = float(redis_client().hget(key_of(bucket), "tokens"))
    assert 0 <= tokens < 0.2  # a refusal takes nothing


def test_bucket_expires_once_it_would_be_full_again(bucket):
    ratelimit.take(bucket=bucket, rate=0.5, burst=3)
    assert redis_client().ttl(key_of(bucket)) == 7  # ceil(3 / 0.5) + 1


def test_buckets_are_independent(bucket):
    other = f"{bucket}-other"
    try:
        assert ratelimit.take(bucket=bucket, rate=1, burst=1)[0]
        assert not ratelimit.take(bucket=bucket, rate=1, burst=1)[0]
        assert ratelimit.take(bucket=other, rate=1, burst=1)[0]
    finally:
        redis_client().delete(key_of(other))


def api_key(rate: float, burst: int = 1) -> ApiKey:
    application = Application(name="a", runner="echo", rate_limit_per_second=rate,
                              rate_limit_burst=burst)  # fmt: skip
    return ApiKey(application=application, key_hash=uuid.uuid4().hex * 2)


def test_check_submit_rate_zero_is_unlimited_without_redis(monkeypatch):
    calls = []
    monkeypatch.setattr(ratelimit, "redis_client", lambda: calls.append(1))
    key = api_key(rate=0)
    for _ in range(100):
        ratelimit.check_submit(key=key)
    assert calls == []


def test_check_submit_refuses_past_the_burst_with_whole_seconds():
    key = api_key(rate=0.25, burst=2)
    try:
        ratelimit.check_submit(key=key)
        ratelimit.check_submit(key=key)
        with pytest.raises(ratelimit.RateLimited) as info:
            ratelimit.check_submit(key=key)
        assert info.value.retry_after == 4  # ceil(1 token / 0.25 per s)
        assert "retry after 4 s" in str(info.value)
    finally:
        redis_client().delete(key_of(f"key:{key.key_hash[:32]}"))


def test_check_submit_retry_after_is_at_least_one_second():
    # 2 tokens/s: the refused call's wait is under a second and is rounded up to 1. The token
    # comes back only after 0.5 s, far longer than any delay between the two calls (at 100/s a
    # loaded machine refilled it in between).
    key = api_key(rate=2, burst=1)
    try:
        ratelimit.check_submit(key=key)
        with pytest.raises(ratelimit.RateLimited) as info:
            ratelimit.check_submit(key=key)
        assert info.value.retry_after == 1
    finally:
        redis_client().delete(key_of(f"key:{key.key_hash[:32]}"))


def test_check_submit_lets_through_when_redis_is_down(monkeypatch):
    import redis

    def down(**kwargs):
        raise redis.ConnectionError("down")

    monkeypatch.setattr(ratelimit, "take", down)
    ratelimit.check_submit(key=api_key(rate=1))  # no exception: let through
