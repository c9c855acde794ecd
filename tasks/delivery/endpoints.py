"""Delivery isolation: at most N deliveries in flight per endpoint, the rest wait off the queue.

An endpoint is an application's callback origin (scheme, host, port). Each may have at most the
application's `endpoint_max_in_flight` deliveries in flight at once, across every callback
worker (0 = no cap), so a receiver that hangs or times out can tie up only that many delivery
threads; every other endpoint's deliveries go ahead on the free ones.

A delivery job first takes a slot (one Lua script: free expired slots, take one or park). A
delivery over the cap does not hold its thread: it is parked in the endpoint's waiting set in
Redis, ordered by when it first parked, and its job ends. When a delivery to that endpoint ends
it gives its slot back and the oldest parked delivery is enqueued again (at the front of the
callbacks queue: it has waited already). A slot whose delivery died with its worker expires
after the callback timeout plus a margin, and the reconciler promotes parked deliveries of
endpoints whose slots freed that way. A parked delivery is recorded nowhere but Redis; if Redis
loses it, the reconciler's callback rescue reschedules it from the database.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import cast

import redis

from tasks.delivery import ssrf
from tasks.plumbing.queueing import redis_client

SLOTS_KEY = "taskhook:endpoint:{endpoint}:slots"  # zset: job id -> slot expiry (unix time)
WAITING_KEY = "taskhook:endpoint:{endpoint}:waiting"  # zset: parked delivery -> first parked at
WAITING_INDEX_KEY = "taskhook:endpoints:waiting"  # set of endpoints with parked deliveries
SLOT_MARGIN_SECONDS = 30

# KEYS: slots, waiting, index. ARGV: now, cap, job id, slot expiry, parked payload, endpoint.
# Returns 1 when a slot was taken, 0 when the delivery was parked.
ACQUIRE_OR_PARK = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
  return 1
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
  redis.call('EXPIRE', KEYS[1], 86400)
  return 1
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[5])
redis.call('SADD', KEYS[3], ARGV[6])
return 0
"""

# KEYS: slots, waiting, index. ARGV: now, cap, job id (may be ''), endpoint.
# Frees the job's slot and the expired ones; returns the parked deliveries that now fit.
RELEASE_AND_PROMOTE = """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[1], ARGV[3]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
local promoted = {}
if free > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], free)
  for i = 1, #popped, 2 do table.insert(promoted, popped[i]) end
end
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[4]) end
return promoted
"""


@dataclass(frozen=True)
class ParkedDelivery:
    task_id: str
    run: int
    trigger: str
    auto_attempt: int | None
    job_id: str

    def encode(self) -> str:
        return json.dumps(
            [self.task_id, self.run, self.trigger, self.auto_attempt, self.job_id],
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> ParkedDelivery:
        task_id, run, trigger, auto_attempt, job_id = json.loads(raw)
        return cls(task_id, run, trigger, auto_attempt, job_id)


def endpoint_of(*, application_id: uuid.UUID | str, callback_url: str) -> str:
    """`<app id>|<scheme>://<host>:<port>`: the unit of isolation."""
    try:
        url = ssrf.parse_callback_url(callback_url)
    except ssrf.UnsafeCallbackUrl:
        return f"{application_id}|invalid"  # the delivery fails at the SSRF guard anyway
    return f"{application_id}|{url.scheme}://{url.host}:{url.port}"


def acquire_or_park(
    *, endpoint: str, cap: int, job_id: str, hold_seconds: float, parked: ParkedDelivery
) -> bool:
    """True: this job holds one of the endpoint's slots (for at most `hold_seconds`). False: it
    was parked and must end now; it is enqueued again when a slot frees. No cap: always True;
    Redis unreachable: True (isolation is lost for a moment, no delivery is)."""
    if cap <= 0:
        return True
    now = time.time()
    try:
        taken = redis_client().eval(
            ACQUIRE_OR_PARK, 3, *_keys(endpoint),
            now, cap, job_id, now + hold_seconds + SLOT_MARGIN_SECONDS, parked.encode(), endpoint,
        )  # fmt: skip
    except redis.RedisError:
        return True
    return bool(taken)


def release(*, endpoint: str, cap: int, job_id: str = "") -> list[ParkedDelivery]:
    """Give the job's slot back (and expired ones); the parked deliveries that now fit, oldest
    first, for the caller to enqueue."""
    if cap <= 0:
        return []
    try:
        raw = redis_client().eval(
            RELEASE_AND_PROMOTE, 3, *_keys(endpoint), time.time(), cap, job_id, endpoint
        )
    except redis.RedisError:
        return []
    return [ParkedDelivery.decode(item) for item in raw]


def endpoints_with_waiting() -> list[str]:
    try:
        members = cast(set[bytes], redis_client().smembers(WAITING_INDEX_KEY))  # not decoded
        return sorted(member.decode() for member in members)
    except redis.RedisError:
        return []


def waiting_count(*, application_id: uuid.UUID | str) -> int:
    """Deliveries of this application parked on its endpoints' caps now."""
    prefix = f"{application_id}|"
    endpoints = [e for e in endpoints_with_waiting() if e.startswith(prefix)]
    if not endpoints:
        return 0
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            for endpoint in endpoints:
                pipe.zcard(WAITING_KEY.format(endpoint=endpoint))
            return sum(pipe.execute())
    except redis.RedisError:
        return 0


def is_parked(*, endpoint: str, parked: ParkedDelivery) -> bool:
    try:
        score = redis_client().zscore(WAITING_KEY.format(endpoint=endpoint), parked.encode())
    except redis.RedisError:
        return False
    return score is not None


def _keys(endpoint: str) -> tuple[str, str, str]:
    return (
        SLOTS_KEY.format(endpoint=endpoint),
        WAITING_KEY.format(endpoint=endpoint),
        WAITING_INDEX_KEY,
    )
