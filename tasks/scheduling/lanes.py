"""Priority lanes: a task run waits in the RQ queue of its priority, and workers listen on them
highest first (dashboard.runtime.processes.task_lanes), so RQ's own dequeue takes a high run
before any normal one and a normal one before any low one.

Starvation guard: at most once a second a worker moves the normal and low runs that have
waited longer than PRIORITY_AGING_SECONDS to the front of the high lane (one Lua call; RQ's
`enqueued_at` is a fixed-width UTC ISO string, so the script compares it as text). So a low
task waits at most about that long plus the runs ahead of it in the high lane.

Tickets: a push onto a lane takes the lane's next ticket number, stored on the job
(`th_ticket`); the lane's head is the highest ticket a worker has taken from it (written once a
second by each worker). A run's place in its lane is its ticket minus the head's
(tasks.scheduling.estimates): no scan of a list, however long, and runs that left the lane
otherwise (a cancel, the aging guard) stop counting as soon as a later run is taken.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

import redis
from django.conf import settings
from rq.job import Job
from rq.queue import Queue

from tasks.plumbing.lane_names import task_lanes
from tasks.statuses import Priority

logger = logging.getLogger(__name__)

PRIORITIES = (Priority.HIGH, Priority.NORMAL, Priority.LOW)  # highest first, as the lanes
PUSHED_KEY = "taskhook:lane:{queue}:pushed"
HEAD_KEY = "taskhook:lane:{queue}:head"
AGED_PER_CALL = 100

# KEYS: the lane's head. ARGV: the job key prefix, then job ids taken from the lane. The head
# becomes the highest of their tickets, if higher.
HEAD_SCRIPT = """
local head = tonumber(redis.call('GET', KEYS[1]) or '0')
for index = 2, #ARGV do
    local ticket = tonumber(redis.call('HGET', ARGV[1] .. ARGV[index], 'th_ticket') or '0')
    if ticket > head then head = ticket end
end
redis.call('SET', KEYS[1], head)
return head
"""

# KEYS: the lane's pushed counter, the job's hash. Returns the ticket.
TICKET_SCRIPT = """
local ticket = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], 'th_ticket', ticket)
return ticket
"""

# KEYS: the high lane, then the lanes to age (normal, low). ARGV: the cutoff (RQ's time format),
# the job key prefix, the high lane's name, the most runs to move. Returns how many moved.
AGING_SCRIPT = """
local moved = {}
for index = 2, #KEYS do
    while #moved < tonumber(ARGV[4]) do
        local head = redis.call('LINDEX', KEYS[index], 0)
        if not head then break end
        local enqueued_at = redis.call('HGET', ARGV[2] .. head, 'enqueued_at')
        if enqueued_at and enqueued_at >= ARGV[1] then break end
        redis.call('LPOP', KEYS[index])
        if enqueued_at then  -- else a job that no longer exists: RQ would skip it too
            redis.call('HSET', ARGV[2] .. head, 'origin', ARGV[3], 'th_ticket', 0)
            table.insert(moved, head)
        end
    end
end
for index = #moved, 1, -1 do  -- the oldest ends up first
    redis.call('LPUSH', KEYS[1], moved[index])
end
return #moved
"""


def lane_names() -> tuple[str, str, str]:
    return task_lanes(settings.TASK_QUEUE)


def lane_of(priority: str) -> int:
    return PRIORITIES.index(Priority(priority))


def queue_name(priority: str) -> str:
    return lane_names()[lane_of(priority)]


def priority_of_queue(name: str) -> str | None:
    names = lane_names()
    return PRIORITIES[names.index(name)].value if name in names else None


def take_ticket(client: redis.Redis | redis.client.Pipeline, *, queue: str, job_id: str) -> None:
    client.eval(TICKET_SCRIPT, 2, PUSHED_KEY.format(queue=queue), Job.key_for(job_id))


_taken: dict[str, list[str]] = {}
_taken_lock = threading.Lock()


def note_taken(queue: str, job_id: str, *, batching: bool = True) -> None:
    """A worker took `job_id` from `queue`: the lane's head moves at the next `flush_taken`
    (each second, in the worker's beat thread), or at once with `batching=False`."""
    if queue not in lane_names():
        return
    with _taken_lock:
        _taken.setdefault(queue, []).append(job_id)
    if not batching:
        flush_taken()


def flush_taken() -> None:
    """Move each lane's head past the runs taken since the last flush (one script per lane).
    Best effort: while Redis is away the ids wait for the next flush."""
    from tasks.plumbing.queueing import redis_client

    with _taken_lock:
        pending = dict(_taken)
        _taken.clear()
    for queue, job_ids in pending.items():
        try:
            redis_client().eval(
                HEAD_SCRIPT, 1, HEAD_KEY.format(queue=queue), Job.redis_job_namespace_prefix,
                *job_ids,
            )  # fmt: skip
        except redis.RedisError:
            with _taken_lock:
                _taken.setdefault(queue, [])[:0] = job_ids


def age(client: redis.Redis, *, now: datetime | None = None) -> int:
    """Move the normal and low runs waiting longer than PRIORITY_AGING_SECONDS to the front of
    the high lane; returns how many moved."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=settings.PRIORITY_AGING_SECONDS)
    high, normal, low = lane_names()
    prefix = Queue.redis_queue_namespace_prefix
    keys = [prefix + high, prefix + normal, prefix + low]
    arguments = [cutoff.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), Job.redis_job_namespace_prefix, high]
    moved = int(client.eval(AGING_SCRIPT, 3, *keys, *arguments, AGED_PER_CALL))
    if moved:
        logger.info("moved %d runs that waited over %d s to the front of the high lane", moved,
                    settings.PRIORITY_AGING_SECONDS)  # fmt: skip
    return moved


def waiting_per_lane(client: redis.Redis) -> dict[str, int]:
    """Runs waiting in each lane (one LLEN each, in one round trip)."""
    pipeline = client.pipeline(transaction=False)
    for name in lane_names():
        pipeline.llen(Queue.redis_queue_namespace_prefix + name)
    lengths = pipeline.execute()
    return {priority.value: int(n) for priority, n in zip(PRIORITIES, lengths, strict=True)}


def total_waiting() -> int | None:
    """Runs waiting in every lane; None while Redis is unreachable."""
    from tasks.plumbing.queueing import redis_client

    try:
        return sum(waiting_per_lane(redis_client()).values())
    except redis.RedisError:
        return None
