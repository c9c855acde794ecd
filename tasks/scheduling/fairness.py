"""Per-key fairness: at most an application's `max_concurrency_per_key` runs of one end user
queued or running at once. The key is the submit's `concurrency_key`, else its `user`; a task
with neither is not capped per key.

A run over its key's cap waits in the key's line, a sorted set (highest priority first, then
oldest), without an RQ job: it holds no worker, and the other keys' runs enter their lanes at
once, so one user's 5,000 tasks never stand in front of another's one. Slots are the run's job
ids in a second sorted set; when a run ends (tasks.execution.executor), its slot passes to the
head of the line, which is enqueued then. The reconciler calls `refill` for every key with
slots or a line: it frees the slots of runs that ended without saying so (a killed worker, a
cancel before the start) and follows a changed cap.

Both sets of a key share a Redis Cluster hash slot; `KEYS_KEY` lists the keys in use.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import redis

from tasks.plumbing.queueing import redis_client, task_job_id
from tasks.scheduling import lanes

logger = logging.getLogger(__name__)

META_FIELD = "fair_key"  # in the RQ job's meta: the key whose slot the run holds
KEYS_KEY = "taskhook:fair:keys"  # "<app id>|<key hash>" of every key with slots or a line
UNCAPPED = 1_000_000_000  # the cap a key follows once its application has none: everyone goes
REFILL_KEYS_PER_PASS = 1000

# KEYS: slots, line, registry. ARGV: job id, cap, line score, now, registry member.
# Returns 1 when the run has (or already had) a slot, 0 when it waits in the line.
ACQUIRE_SCRIPT = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('SADD', KEYS[3], ARGV[5])
if redis.call('ZCARD', KEYS[2]) == 0 and redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
    return 1
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 0
"""

# KEYS: slots, line, registry. ARGV: the ended job ids..., then cap, now, registry member, and
# the count of ended ids first. Frees their slots, fills free slots from the head of the line,
# forgets a key with neither. Returns the job ids that got a slot.
RELEASE_SCRIPT = """
local ended = tonumber(ARGV[1])
for index = 2, ended + 1 do
    redis.call('ZREM', KEYS[1], ARGV[index])
    redis.call('ZREM', KEYS[2], ARGV[index])
end
local cap, now, member = tonumber(ARGV[ended + 2]), ARGV[ended + 3], ARGV[ended + 4]
local granted = {}
while redis.call('ZCARD', KEYS[1]) < cap do
    local head = redis.call('ZPOPMIN', KEYS[2])
    if #head == 0 then break end
    redis.call('ZADD', KEYS[1], now, head[1])
    table.insert(granted, head[1])
end
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('SREM', KEYS[3], member)
end
return granted
"""


@dataclass(frozen=True)
class Key:
    application_id: str
    digest: str  # of the concurrency key: any string, any length, fits a Redis key

    @classmethod
    def of(cls, *, application_id: uuid.UUID | str, concurrency_key: str) -> Key:
        digest = hashlib.sha256(concurrency_key.encode()).hexdigest()[:24]
        return cls(str(application_id), digest)

    @classmethod
    def parse(cls, member: str) -> Key:
        application_id, _, digest = member.partition("|")
        return cls(application_id, digest)

    @property
    def member(self) -> str:
        return f"{self.application_id}|{self.digest}"

    @property
    def slots(self) -> str:
        return f"taskhook:fair:{{{self.member}}}:slots"

    @property
    def line(self) -> str:
        return f"taskhook:fair:{{{self.member}}}:line"


def key_of(task, application=None) -> Key | None:
    """The task's key when its application caps runs per key, else None."""
    application = application or task.application
    if not application.max_concurrency_per_key:
        return None
    concurrency_key = task.concurrency_key or task.user
    if not concurrency_key:
        return None
    return Key.of(application_id=task.application_id, concurrency_key=concurrency_key)


def line_score(priority: str, queued_at: float) -> float:
    """Highest priority first, then the oldest: the lane in the billions of seconds."""
    return lanes.lane_of(priority) * 1e10 + queued_at


def acquire(task, *, key: Key) -> bool:
    """True when the task's current run may enter its lane now: its key has a free slot (or
    the run already holds one). Else it joins its key's line."""
    queued_at = task.queued_at.timestamp() if task.queued_at else time.time()
    granted = redis_client().eval(
        ACQUIRE_SCRIPT, 3, key.slots, key.line, KEYS_KEY,
        task_job_id(task.id, task.run), task.application.max_concurrency_per_key,
        line_score(task.priority, queued_at), time.time(), key.member,
    )  # fmt: skip
    return bool(granted)


def acquire_many(tasks: list, *, keys: list[Key | None]) -> list[bool]:
    """`acquire` for many fresh runs in one round trip (a batch's items); a task whose key is
    None is not capped and always may enter its lane."""
    pipeline = redis_client().pipeline(transaction=False)
    for task, key in zip(tasks, keys, strict=True):
        if key is None:
            continue
        queued_at = task.queued_at.timestamp() if task.queued_at else time.time()
        pipeline.eval(
            ACQUIRE_SCRIPT, 3, key.slots, key.line, KEYS_KEY,
            task_job_id(task.id, task.run), task.application.max_concurrency_per_key,
            line_score(task.priority, queued_at), time.time(), key.member,
        )  # fmt: skip
    answers = iter(pipeline.execute() if len(pipeline) else [])
    return [True if key is None else bool(next(answers)) for key in keys]


def release(*, key: Key, ended_job_ids: Iterable[str], cap: int | None) -> list[str]:
    """Free the slots of `ended_job_ids` and fill free slots from the line; returns the job ids
    granted a slot, for the caller to enqueue."""
    ended = list(ended_job_ids)
    granted = redis_client().eval(
        RELEASE_SCRIPT, 3, key.slots, key.line, KEYS_KEY,
        len(ended), *ended, cap or UNCAPPED, time.time(), key.member,
    )  # fmt: skip
    return [g.decode() if isinstance(g, bytes) else g for g in granted]


def line_place(task, application=None) -> tuple[int, int] | None:
    """(runs of the same key ahead of this one in its line, the key's cap), or None when the
    run is not in a line."""
    application = application or task.application
    key = key_of(task, application)
    if key is None:
        return None
    rank = cast(int | None, redis_client().zrank(key.line, task_job_id(task.id, task.run)))
    return None if rank is None else (rank, application.max_concurrency_per_key)


def keys_in_use(client: redis.Redis | None = None) -> list[Key]:
    client = client or redis_client()
    members = cast(list[bytes], client.srandmember(KEYS_KEY, REFILL_KEYS_PER_PASS) or [])
    return [Key.parse(m.decode()) for m in members]


def slot_holders(client: redis.Redis, key: Key) -> list[str]:
    return [j.decode() for j in cast(list[bytes], client.zrange(key.slots, 0, -1))]
