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

A batch's items (tasks.batches) are one key of their own, `batch:<batch id>`, whatever the
application's cap: at most `max_concurrency_per_key` of them (BATCH_CONCURRENCY when the
application sets none) are queued or running, the rest wait in the batch's line in index order.
So a batch of 100,000 items never puts 100,000 jobs in front of another client's task, and its
ingestion writes one line entry per item (LINE_MANY_SCRIPT, a chunk a call), not an RQ job.

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
from django.conf import settings

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

# KEYS: slots, line, registry. ARGV: cap, now, registry member, the job ids of fresh runs in
# order and their line scores, each list one space-separated argument (two arguments for a
# chunk of hundreds: redis-py encodes each argument on its own). ACQUIRE_SCRIPT for each;
# returns 1 or 0 per run.
LINE_MANY_SCRIPT = """
redis.call('SADD', KEYS[3], ARGV[3])
local cap = tonumber(ARGV[1])
local jobs, scores, answers = {}, {}, {}
for job in string.gmatch(ARGV[4], '%S+') do table.insert(jobs, job) end
for score in string.gmatch(ARGV[5], '%S+') do table.insert(scores, score) end
local position = 1
while position <= #jobs do
    local job = jobs[position]
    if redis.call('ZSCORE', KEYS[1], job) then
        answers[position] = 1
    elseif redis.call('ZSCORE', KEYS[2], job) then
        answers[position] = 0
    elseif redis.call('ZCARD', KEYS[2]) == 0 and redis.call('ZCARD', KEYS[1]) < cap then
        redis.call('ZADD', KEYS[1], ARGV[2], job)
        answers[position] = 1
    else
        break
    end
    position = position + 1
end
if position <= #jobs then
    -- The line has entries now, so every later run joins it: one that holds a slot keeps it,
    -- one in the line keeps its place (NX), the others are added in one call.
    local rest = {}
    for index = position, #jobs do table.insert(rest, jobs[index]) end
    local held = redis.call('ZMSCORE', KEYS[1], unpack(rest))
    local add = {}
    for offset, job in ipairs(rest) do
        local index = position + offset - 1
        if held[offset] then
            answers[index] = 1
        else
            answers[index] = 0
            table.insert(add, scores[index])
            table.insert(add, job)
        end
    end
    if #add > 0 then redis.call('ZADD', KEYS[2], 'NX', unpack(add)) end
end
return answers
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


BATCH_DIGEST_PREFIX = "batch-"  # a batch's key: the batch id, never a sha256 digest (24 hex)
LINE_INDEX_STEP = 1e-5  # seconds between a batch's items in its line: index order, one instant


@dataclass(frozen=True)
class Key:
    application_id: str
    digest: str  # of the concurrency key: any string, any length, fits a Redis key

    @property
    def is_batch(self) -> bool:
        return self.digest.startswith(BATCH_DIGEST_PREFIX)

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
    """The task's key: its batch's for a batch item that names no key of its own, else its
    concurrency key (or user) when its application caps runs per key; None when uncapped."""
    application = application or task.application
    concurrency_key = task.concurrency_key or task.user
    batch_id = getattr(task, "batch_id", None)
    if batch_id is not None and concurrency_key == f"batch:{batch_id}":
        return Key(str(task.application_id), BATCH_DIGEST_PREFIX + uuid.UUID(str(batch_id)).hex)
    if not application.max_concurrency_per_key or not concurrency_key:
        return None
    return Key.of(application_id=task.application_id, concurrency_key=concurrency_key)


def cap_of(key: Key, application) -> int | None:
    """How many runs of `key` may be queued or running at once (None: no cap)."""
    if key.is_batch:
        return application.max_concurrency_per_key or settings.BATCH_CONCURRENCY
    return application.max_concurrency_per_key


def line_score(priority: str, queued_at: float) -> float:
    """Highest priority first, then the oldest: the lane in the billions of seconds."""
    return lanes.lane_of(priority) * 1e10 + queued_at


def acquire(task, *, key: Key) -> bool:
    """True when the task's current run may enter its lane now: its key has a free slot (or
    the run already holds one). Else it joins its key's line."""
    queued_at = task.queued_at.timestamp() if task.queued_at else time.time()
    granted = redis_client().eval(
        ACQUIRE_SCRIPT, 3, key.slots, key.line, KEYS_KEY,
        task_job_id(task.id, task.run), cap_of(key, task.application) or UNCAPPED,
        line_score(task.priority, queued_at), time.time(), key.member,
    )  # fmt: skip
    return bool(granted)


# Runs per LINE_MANY_SCRIPT call: Redis's Lua unpacks at most about 8,000 values at once, and
# the script unpacks two per lined run.
LINE_MANY_MAX = 2000


def acquire_many(tasks: list, *, keys: list[Key | None]) -> list[bool]:
    """`acquire` for many fresh runs in one round trip (a batch's items): one script call per
    key (LINE_MANY_SCRIPT; per LINE_MANY_MAX of its runs), its runs in the given order; a batch
    item's line score follows its index. A task whose key is None is not capped and always may
    enter its lane."""
    by_key: dict[Key, list[int]] = {}
    for position, key in enumerate(keys):
        if key is not None:
            by_key.setdefault(key, []).append(position)
    answers: list[bool] = [True] * len(tasks)
    if not by_key:
        return answers
    now = time.time()
    stamps: dict[int, float] = {}  # a batch's items share one queued_at object
    pipeline = redis_client().pipeline(transaction=False)
    calls: list[list[int]] = []
    for key, positions in by_key.items():
        cap = cap_of(key, tasks[positions[0]].application) or UNCAPPED
        for start in range(0, len(positions), LINE_MANY_MAX):
            part = positions[start : start + LINE_MANY_MAX]
            job_ids: list[str] = []
            scores: list[str] = []
            for position in part:
                task = tasks[position]
                stamp = task.queued_at
                if stamp is None:
                    queued_at = now
                elif id(stamp) in stamps:
                    queued_at = stamps[id(stamp)]
                else:
                    queued_at = stamps[id(stamp)] = stamp.timestamp()
                if key.is_batch and task.batch_index is not None:
                    queued_at += task.batch_index * LINE_INDEX_STEP
                job_ids.append(task_job_id(task.id, task.run))
                scores.append(repr(line_score(task.priority, queued_at)))  # exact, as redis-py's
            pipeline.eval(LINE_MANY_SCRIPT, 3, key.slots, key.line, KEYS_KEY, cap, now,
                          key.member, " ".join(job_ids), " ".join(scores))  # fmt: skip
            calls.append(part)
    for part, granted in zip(calls, pipeline.execute(), strict=True):
        for position, answer in zip(part, granted, strict=True):
            answers[position] = bool(answer)
    return answers


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
    return None if rank is None else (rank, cap_of(key, application) or UNCAPPED)


def keys_in_use(client: redis.Redis | None = None) -> list[Key]:
    client = client or redis_client()
    members = cast(list[bytes], client.srandmember(KEYS_KEY, REFILL_KEYS_PER_PASS) or [])
    return [Key.parse(m.decode()) for m in members]


def slot_holders(client: redis.Redis, key: Key) -> list[str]:
    return [j.decode() for j in cast(list[bytes], client.zrange(key.slots, 0, -1))]
