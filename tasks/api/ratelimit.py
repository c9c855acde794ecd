"""Per-API-key token bucket in Redis: `rate_limit_per_second` refill, `rate_limit_burst` capacity.

A kept library was looked for first: `limits` (used by Flask-Limiter/SlowAPI) offers fixed, moving
and sliding windows but no token bucket, and window limits cannot express "N per second with a
burst of M". The bucket is one Lua script, so check-and-take is atomic across web processes.
If Redis is unreachable the request is let through: losing rate limiting for a moment is better
than refusing every submit while the database could still accept it. A rate of 0 means unlimited:
no bucket, no Redis round trip.
"""

from __future__ import annotations

import logging
import math

import redis

from tasks.models import ApiKey
from tasks.plumbing.queueing import redis_client

logger = logging.getLogger(__name__)

# KEYS[1] bucket key. ARGV: rate (tokens/s), capacity, cost.
# Returns {allowed (0/1), seconds until enough tokens (as string, float)}.
BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return {allowed, tostring(wait)}
"""


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limited, retry after {retry_after} s")
        self.retry_after = retry_after


def take(*, bucket: str, rate: float, burst: int, cost: int = 1) -> tuple[bool, float]:
    """Take `cost` tokens from `bucket`; returns (allowed, seconds to wait if not)."""
    script = redis_client().register_script(BUCKET_SCRIPT)  # cheap: a SHA1, then EVALSHA
    allowed, wait = script(keys=[f"taskhook:ratelimit:{bucket}"], args=[rate, burst, cost])
    return bool(int(allowed)), float(wait)


def check_submit(*, key: ApiKey) -> None:
    """Raise RateLimited when this key's bucket is empty."""
    application = key.application
    if application.rate_limit_per_second <= 0:  # unlimited (the Lua script would divide by 0)
        return
    try:
        allowed, wait = take(
            bucket=f"key:{key.key_hash[:32]}",  # never reused, unlike a row id
            rate=application.rate_limit_per_second,
            burst=application.rate_limit_burst,
        )
    except redis.RedisError:
        logger.warning("rate limiter unavailable (Redis); request let through")
        return
    if not allowed:
        raise RateLimited(retry_after=max(1, math.ceil(wait)))
