"""Where a waiting task run stands: how many runs will start before it (`position`, 0 = it is
next) and when it should start (`eta_seconds`), for the poll body, the `task.queued` event and
the poll's Retry-After.

Nothing is scanned. The runs ahead of a queued run are those of the higher lanes (LLEN) plus
its place in its own lane: its ticket minus the lane's head, the last ticket workers took
(tasks.scheduling.lanes), at most the lane's length. A run in its key's line
(tasks.scheduling.fairness) or in RQ's per-application waiting set also counts the runs of its
key or application ahead of it (ZRANK), which start at most `cap` at a time.

The ETA divides the position by the drain rate: the runs started per second over the last
ETA_WINDOW_SECONDS, counted by the workers in 2-second buckets, over the buckets in which any
run started (the rate while draining, so idle gaps between bursts do not slow it). For a run
held back by a cap it is at least one mean run time (of its application) per `cap` runs ahead
of it. It is null when nothing started during the window.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import redis
from django.conf import settings
from django.utils import timezone
from rq.queue import Queue

from tasks.plumbing.queueing import redis_client, task_job_id
from tasks.scheduling import fairness, lanes
from tasks.telemetry import counters

# Short buckets, so that the drain rate is measured while workers drain: a bucket in which
# nothing started (the queue was empty) does not count, or a bursty load would look slow.
BUCKET_SECONDS = 2
STARTED_KEY = "taskhook:started:{bucket}"
RUN_SECONDS_KEY = "taskhook:run-seconds:{app}"  # hash: sum, count
SNAPSHOT_SECONDS = 1.0  # how stale a process's view of the lanes may be for a new run's event


def count_started() -> None:
    """A worker started a run (batched in workers)."""
    bucket = int(time.time() // BUCKET_SECONDS)
    counters.add(STARTED_KEY.format(bucket=bucket), expire=settings.ETA_WINDOW_SECONDS + 60)


def observe_run(*, application_id: uuid.UUID | str, seconds: float) -> None:
    key = RUN_SECONDS_KEY.format(app=application_id)
    counters.add(key, float(seconds), field="sum", expire=7 * 24 * 3600)
    counters.add(key, field="count", expire=7 * 24 * 3600)


@dataclass(frozen=True)
class Lanes:
    waiting: tuple[int, ...]  # per lane, highest first
    heads: tuple[int, ...]  # the highest ticket taken from each lane
    rate: float | None  # runs started per second


def _read_lanes(pipeline: redis.client.Pipeline) -> None:
    names = lanes.lane_names()
    for name in names:
        pipeline.llen(Queue.redis_queue_namespace_prefix + name)
    for name in names:
        pipeline.get(lanes.HEAD_KEY.format(queue=name))
    now_bucket = int(time.time() // BUCKET_SECONDS)
    buckets = range(now_bucket - settings.ETA_WINDOW_SECONDS // BUCKET_SECONDS, now_bucket + 1)
    pipeline.mget([STARTED_KEY.format(bucket=b) for b in buckets])


def _lanes_from(results: list[Any]) -> Lanes:
    waiting = tuple(int(n) for n in results[0:3])
    heads = tuple(int(n or 0) for n in results[3:6])
    counts = [int(n or 0) for n in results[6]]
    busy_seconds = sum(1 for n in counts if n) * BUCKET_SECONDS
    return Lanes(waiting, heads, sum(counts) / busy_seconds if busy_seconds else None)


_snapshot: tuple[float, Lanes] | None = None
_snapshot_lock = threading.Lock()


def snapshot() -> Lanes:
    """The lanes as this process saw them at most SNAPSHOT_SECONDS ago (one round trip)."""
    global _snapshot
    with _snapshot_lock:
        if _snapshot is None or time.monotonic() - _snapshot[0] > SNAPSHOT_SECONDS:
            pipeline = redis_client().pipeline(transaction=False)
            _read_lanes(pipeline)
            _snapshot = (time.monotonic(), _lanes_from(pipeline.execute()))
        return _snapshot[1]


def place(position: int, rate: float | None, *, at_least: float = 0.0) -> dict[str, Any]:
    eta = max(position / rate, at_least) if rate else (at_least or None)
    return {"position": position, "eta_seconds": None if eta is None else round(eta, 1)}


def for_new_run(priority: str) -> dict[str, Any] | None:
    """The place of a run about to join the end of its lane (the submit's `task.queued`);
    None while Redis is away."""
    try:
        seen = snapshot()
    except redis.RedisError:
        return None
    return place(sum(seen.waiting[: lanes.lane_of(priority) + 1]), seen.rate)


def mean_run_seconds(client: redis.Redis, application_id: uuid.UUID | str) -> float | None:
    total, count = client.hmget(RUN_SECONDS_KEY.format(app=application_id), ["sum", "count"])
    return float(total) / int(count) if total and count and int(count) else None


def for_task(task, *, now: datetime | None = None) -> dict[str, Any] | None:
    """The place of a pending task's current run, read now (one round trip, two when it waits
    behind a cap); None when it is not pending or Redis is away."""
    if task.status != "pending":
        return None
    from tasks.applications import cached_application  # applications imports the models

    application = cached_application(task.application_id)
    client = redis_client()
    job_id = task_job_id(task.id, task.run)
    try:
        pipeline = client.pipeline(transaction=False)
        pipeline.hmget(f"rq:job:{job_id}", ["status", "origin", "th_ticket"])
        _read_lanes(pipeline)
        results = pipeline.execute()
        status, origin, ticket = (v.decode() if isinstance(v, bytes) else v for v in results[0])
        seen = _lanes_from(results[1:])
        lane = lanes.lane_of(task.priority)
        if status == "queued" and origin in lanes.lane_names():
            lane = lanes.lane_names().index(origin)
            ahead = sum(seen.waiting[:lane])
            in_lane = int(ticket) - seen.heads[lane] - 1 if ticket and ticket != "0" else 0
            return place(ahead + min(max(in_lane, 0), max(seen.waiting[lane] - 1, 0)), seen.rate)
        through_lane = sum(seen.waiting[: lane + 1])
        held = _held_place(client, task, application, job_id, status)
        if held is not None:
            rank, cap = held
            mean = mean_run_seconds(client, task.application_id) or 0.0
            # It starts after the `rank` runs ahead of it, `cap` at a time, and then queues.
            return place(through_lane + rank, seen.rate, at_least=(rank // cap + 1) * mean)
        due_in = 0.0
        if task.queued_at is not None:  # an automatic retry waiting for its backoff
            due_in = max(0.0, (task.queued_at - (now or timezone.now())).total_seconds())
        return place(through_lane, seen.rate, at_least=due_in)
    except redis.RedisError:
        return None


def _held_place(client: redis.Redis, task, application, job_id: str, status: str | None):
    if status == "rate_limited" and application.max_concurrency:
        rank = cast(
            int | None, client.zrank(f"rq:rl:app-{task.application_id}:rate_limited", job_id)
        )
        if rank is not None:
            return rank, application.max_concurrency
    return fairness.line_place(task, application=application)


def retry_after(queue: dict[str, Any] | None) -> int | None:
    """The poll's Retry-After while the task waits: its ETA, within 1-5 s."""
    if not queue or queue.get("eta_seconds") is None:
        return None
    return min(5, max(1, math.ceil(queue["eta_seconds"])))
