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

An endpoint's circuit (tasks.delivery.health) is kept here too, as one key: while it is open
every delivery parks in the same waiting set (none spends an attempt) and none is promoted;
half-open lets the first delivery through as the probe; disabled refuses them all.

Destinations (tasks.delivery.destinations) use the same slots, waiting sets and circuit under
an endpoint name of their own (`dest-<id>`), with their own index of waiting sets
(DESTINATIONS_WAITING_KEY) and their own parked payload: every function here takes the index,
and the payload is anything with `encode()`.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Protocol, cast

import redis

from tasks.delivery import ssrf
from tasks.plumbing.queueing import redis_client

SLOTS_KEY = "taskhook:endpoint:{endpoint}:slots"  # zset: job id -> slot expiry (unix time)
WAITING_KEY = "taskhook:endpoint:{endpoint}:waiting"  # zset: parked delivery -> first parked at
WAITING_INDEX_KEY = "taskhook:endpoints:waiting"  # set of endpoints with parked deliveries
DESTINATIONS_WAITING_KEY = "taskhook:destinations:waiting"  # the same, of destinations
# The circuit when not closed: open, half (the next delivery probes), probe:<job id>, disabled.
CIRCUIT_KEY = "taskhook:endpoint:{endpoint}:circuit"
SLOT_MARGIN_SECONDS = 30
NO_CAP = 1_000_000  # the cap of an application without one: only the circuit holds deliveries

TAKEN, PARKED, REFUSED = 1, 0, 2

# KEYS: slots, waiting, index, circuit. ARGV: now, cap, job id, slot expiry, parked payload,
# endpoint. Returns TAKEN (a slot), PARKED (over the cap or the circuit is open), REFUSED
# (the endpoint is disabled).
ACQUIRE_OR_PARK = """
local circuit = redis.call('GET', KEYS[4])
if circuit == 'disabled' then return 2 end
if circuit == 'half' then
  redis.call('SET', KEYS[4], 'probe:' .. ARGV[3], 'EX', 86400)
  redis.call('ZREM', KEYS[2], ARGV[5])
elseif circuit and circuit ~= 'probe:' .. ARGV[3] then
  redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[5])
  redis.call('SADD', KEYS[3], ARGV[6])
  return 0
end
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

# KEYS: slots, waiting, index, circuit. ARGV: now, cap, job id (may be ''), endpoint.
# Frees the job's slot and the expired ones; returns the parked deliveries that now fit (none
# while the circuit is open or probing).
RELEASE_AND_PROMOTE = """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[1], ARGV[3]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
local circuit = redis.call('GET', KEYS[4])
if circuit and circuit ~= 'disabled' then free = 0 end
local promoted = {}
if free > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], free)
  for i = 1, #popped, 2 do table.insert(promoted, popped[i]) end
end
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[4]) end
return promoted
"""


class Parked(Protocol):
    """What waits in a waiting set: one member, its encoding."""

    def encode(self) -> str: ...


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
    *,
    endpoint: str,
    cap: int,
    job_id: str,
    hold_seconds: float,
    parked: Parked,
    index: str = WAITING_INDEX_KEY,
) -> int:
    """TAKEN: this job holds one of the endpoint's slots (for at most `hold_seconds`). PARKED:
    it must end now; it is enqueued again when a slot frees or the circuit closes. REFUSED: the
    endpoint is disabled. Redis unreachable: TAKEN (isolation is lost for a moment, no delivery
    is; the attempt's health record puts the circuit back)."""
    cap = cap if cap > 0 else NO_CAP
    now = time.time()
    try:
        taken = redis_client().eval(
            ACQUIRE_OR_PARK, 4, *_keys(endpoint, index),
            now, cap, job_id, now + hold_seconds + SLOT_MARGIN_SECONDS, parked.encode(), endpoint,
        )  # fmt: skip
    except redis.RedisError:
        return TAKEN
    return int(cast(int, taken))


def release(*, endpoint: str, cap: int, job_id: str = "") -> list[ParkedDelivery]:
    """Give the job's slot back (and expired ones); the parked deliveries that now fit, oldest
    first, for the caller to enqueue."""
    promoted = release_encoded(endpoint=endpoint, cap=cap, job_id=job_id)
    return [ParkedDelivery.decode(item) for item in promoted]


def release_encoded(
    *, endpoint: str, cap: int, job_id: str = "", index: str = WAITING_INDEX_KEY
) -> list[bytes]:
    """`release` for any waiting set (`index`): the promoted members as stored."""
    cap = cap if cap > 0 else NO_CAP
    try:
        raw = redis_client().eval(
            RELEASE_AND_PROMOTE, 4, *_keys(endpoint, index), time.time(), cap, job_id, endpoint
        )
    except redis.RedisError:
        return []
    return cast(list[bytes], raw)


def endpoints_with_waiting(index: str = WAITING_INDEX_KEY) -> list[str]:
    try:
        members = cast(set[bytes], redis_client().smembers(index))  # not decoded
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


def run_is_parked(*, endpoint: str, task_id: str, run: int) -> bool:
    """Whether any delivery of this task run waits on the endpoint (a member starts with
    its task id and run: ParkedDelivery.encode); matched by Redis, a page of members a call."""
    return has_parked(endpoint=endpoint, pattern=f'\\["{task_id}",{run},*')


def has_parked(*, endpoint: str, pattern: str) -> bool:
    """Whether a member of the endpoint's waiting set matches the glob `pattern`."""
    try:
        for _member in redis_client().zscan_iter(
            WAITING_KEY.format(endpoint=endpoint), match=pattern, count=1000
        ):
            return True
    except redis.RedisError:
        return False
    return False


def is_parked(*, endpoint: str, parked: ParkedDelivery) -> bool:
    try:
        score = redis_client().zscore(WAITING_KEY.format(endpoint=endpoint), parked.encode())
    except redis.RedisError:
        return False
    return score is not None


def oldest_parked(*, endpoint: str) -> ParkedDelivery | None:
    """The delivery that has waited longest on this endpoint, left in place (the probe)."""
    found = oldest_parked_encoded(endpoint=endpoint)
    return ParkedDelivery.decode(found) if found else None


def oldest_parked_encoded(*, endpoint: str) -> bytes | None:
    try:
        found = cast(
            list[bytes], redis_client().zrange(WAITING_KEY.format(endpoint=endpoint), 0, 0)
        )
    except redis.RedisError:
        return None
    return found[0] if found else None


def set_circuit(*, endpoint: str, circuit: str | None, only_if_missing: bool = False) -> None:
    """The circuit's Redis copy (None: closed). The database holds the truth: the reconciler
    and each attempt's health record set it again if Redis lost it (`only_if_missing`, so a
    probe's claim stays)."""
    key = CIRCUIT_KEY.format(endpoint=endpoint)
    with contextlib.suppress(redis.RedisError):
        if circuit is None:
            redis_client().delete(key)
        else:
            redis_client().set(key, circuit, ex=86400, nx=only_if_missing)


def circuit_of(*, endpoint: str) -> str | None:
    try:
        raw = cast(bytes | None, redis_client().get(CIRCUIT_KEY.format(endpoint=endpoint)))
    except redis.RedisError:
        return None
    return raw.decode() if raw else None


def _keys(endpoint: str, index: str = WAITING_INDEX_KEY) -> tuple[str, str, str, str]:
    return (
        SLOTS_KEY.format(endpoint=endpoint),
        WAITING_KEY.format(endpoint=endpoint),
        index,
        CIRCUIT_KEY.format(endpoint=endpoint),
    )
