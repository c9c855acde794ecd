"""Redis and RQ plumbing: connections, queues, job ids, and 'task finished' notifications.

The database is the source of truth; Redis only carries work. Job ids are derived from the task
id and run number, so anyone can tell whether a run's job still exists in Redis, and enqueueing
the same run twice is refused by RQ (`unique=True`) instead of running it twice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from django.conf import settings
from redis.sentinel import Sentinel
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.rate_limit import RateLimit

logger = logging.getLogger(__name__)

DONE_CHANNEL_PREFIX = "taskhook:done:"
SUCCESSFUL_JOB_TTL = 60
# A task job fails only when the worker could not reach the database (a runner's own errors fail
# the task, not the job): run it again at once (the worker has replaced a dropped connection by
# then), then after 10 s. Past that the reconciler re-enqueues the still-pending task.
INFRASTRUCTURE_RETRY = Retry(max=2, interval=[0, 10])


@functools.cache
def redis_client() -> redis.Redis:
    """One pooled client per process (redis-py resets the pool after a fork); through Redis
    Sentinel's current master when REDIS_SENTINELS is set."""
    options: dict[str, Any] = {
        "socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 30,
    }  # fmt: skip
    if settings.REDIS_SENTINELS:
        sentinel = Sentinel(settings.REDIS_SENTINELS, socket_connect_timeout=2)
        return sentinel.master_for(
            settings.REDIS_SENTINEL_MASTER,
            db=settings.REDIS_DB,
            password=settings.REDIS_PASSWORD,
            **options,
        )
    return redis.Redis.from_url(settings.REDIS_URL, **options)


def queue(name: str) -> Queue:
    return Queue(name, connection=redis_client())


def queue_length(name: str) -> int | None:
    """Jobs waiting on a queue (one LLEN); None while Redis is unreachable."""
    try:
        return int(redis_client().llen(queue(name).key))
    except redis.RedisError:
        return None


def enqueue_delivery_job(
    func: str, *, job_id: str, delay: float = 0.0, at_front: bool = False, **options: Any
) -> bool:
    """Put a delivery job (a callback attempt, a batch's `batch.finished`, a destination
    publish) on the callbacks queue, now or after `delay` seconds, unique by `job_id` and kept
    SUCCESSFUL_JOB_TTL once done. False when a job of that id is there already; raises
    redis.RedisError (the caller logs it: the reconciler schedules it from the database)."""
    callbacks = queue(settings.CALLBACK_QUEUE)
    options |= {"job_id": job_id, "result_ttl": SUCCESSFUL_JOB_TTL, "unique": True}
    try:
        if delay > 0:
            # RQ's scheduled registry keeps whole seconds (truncated): round up, never run early.
            due = datetime.fromtimestamp(math.ceil(time.time() + delay), tz=UTC)
            callbacks.enqueue_at(due, func, **options)
        else:
            callbacks.enqueue(func, at_front=at_front, **options)
    except DuplicateJobError:
        return False  # already scheduled: nothing to add
    return True


def task_job_id(task_id: uuid.UUID | str, run: int) -> str:
    return f"task-{task_id}-{run}"


def enqueue_task_run(
    *,
    task_id: uuid.UUID | str,
    run: int,
    timeout: int,
    failure_ttl: int,
    application_id: uuid.UUID | str | None = None,
    max_concurrency: int | None = None,
    at_front: bool = False,
    fresh: bool = False,
    queue_name: str | None = None,
    meta: dict[str, str] | None = None,
    also: Callable[[redis.client.Pipeline], None] | None = None,
    into: redis.client.Pipeline | None = None,
) -> bool:
    """Put one run of a task on `queue_name` (its priority lane; the task queue by default).
    True if enqueued (or already there).

    `also` adds the caller's own commands (the task's `task.queued` event) to the enqueue's
    pipeline when it has one, else to a pipeline of their own sent right after.

    With `max_concurrency`, RQ's own concurrency limit (RateLimit, RQ >= 3) keeps at most that
    many of the application's jobs queued-or-running; the rest wait in RQ's rate-limited set and
    are promoted as slots free up, so one tenant cannot fill every worker.

    `fresh`: the task was created a moment ago, so no job can exist for it yet; RQ's
    duplicate check (a Lua round trip of its own) is skipped and the job goes in one pipeline.
    Every other caller (retries, the reconciler, an operator's requeue) keeps the check.
    `into`: a fresh run's commands go in the caller's pipeline, which the caller sends (a
    batch's items, many runs a trip); a rate-limited run still goes in its own trips.

    Raises redis.RedisError when Redis is unreachable; callers decide whether that is fatal.
    """
    job_id = task_job_id(task_id, run)
    rate_limit = None
    if max_concurrency and application_id:
        rate_limit = RateLimit(key=f"app-{application_id}", concurrency=max_concurrency)
        # RQ refuses unique=True for rate-limited jobs: check first. A duplicate that slips
        # through a race is harmless, the guarded pending -> running transition runs it once.
        if not fresh and redis_client().exists(Job.key_for(job_id)):
            return True
    one_trip = fresh and rate_limit is None
    pipeline = (into if into is not None else redis_client().pipeline()) if one_trip else None
    try:
        queue(queue_name or settings.TASK_QUEUE).enqueue_call(
            "tasks.jobs.run_task",
            args=(str(task_id), run),
            job_id=job_id,
            timeout=timeout,
            # The result lives in the database: RQ keeps a successful job a minute (deleting it
            # at once costs RQ more). A failed job (a crashed worker) stays in RQ's failed
            # registry for the application's retention.
            result_ttl=SUCCESSFUL_JOB_TTL,
            failure_ttl=failure_ttl,
            ttl=None,
            at_front=at_front,
            unique=not fresh and rate_limit is None,
            description=f"task {task_id} run {run}",
            meta=meta,
            rate_limit=rate_limit,
            retry=INFRASTRUCTURE_RETRY,
            pipeline=pipeline,
        )
        if pipeline is not None:
            if also is not None:
                also(pipeline)
            if into is None:
                pipeline.execute()
            also = None
    except DuplicateJobError:
        logger.info("task %s run %s is already enqueued", task_id, run)
    if also is not None:
        extra = redis_client().pipeline(transaction=False)
        also(extra)
        extra.execute()
    return True


def publish_finished(
    task_id: uuid.UUID | str, pipeline: redis.client.Pipeline | None = None
) -> None:
    """Wake any blocking request waiting on this task (added to `pipeline` when given).

    Best effort: waiters also re-read the database every 2 s.
    """
    if pipeline is not None:
        pipeline.publish(DONE_CHANNEL_PREFIX + str(task_id), b"1")
        return
    try:
        redis_client().publish(DONE_CHANNEL_PREFIX + str(task_id), b"1")
    except redis.RedisError:
        logger.warning("could not publish completion of task %s", task_id, exc_info=True)


def wait_for_finish(task_id: uuid.UUID | str, *, timeout: float, is_finished) -> bool:
    """Block up to `timeout` seconds until `is_finished()` is true; True if it became so.

    Subscribes before the first check, so a completion between check and wait is not missed.
    Falls back to polling the database every 0.5 s if Redis is unavailable.
    """
    deadline = time.monotonic() + timeout
    pubsub = None
    try:
        pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(DONE_CHANNEL_PREFIX + str(task_id))
    except redis.RedisError:
        pubsub = None
    try:
        while True:
            if is_finished():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pubsub is None:
                time.sleep(min(0.5, remaining))
                continue
            try:
                # Re-check the database at least every 2 s in case a notification was lost.
                pubsub.get_message(timeout=min(2.0, remaining))
            except redis.RedisError:
                pubsub = None
    finally:
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                pubsub.close()


# Statuses of a job that may still run; any other job under an id is over and may be replaced.
LIVE_JOB_STATUSES = (b"queued", b"scheduled", b"started", b"deferred")


def delete_job(job_id: str, *, unless_live: bool = False) -> None:
    """Remove a job so its id can be enqueued again: RQ's delete (registries included), then
    the bare hash, which RQ refuses to load when it is partial and a unique enqueue would still
    collide with. `unless_live`: leave a job that may still run."""
    client = redis_client()
    if unless_live:
        status = client.hget(Job.key_for(job_id), "status")
        if status is None or status in LIVE_JOB_STATUSES:
            return
    with contextlib.suppress(Exception):
        Job.fetch(job_id, connection=client).delete()
    client.delete(Job.key_for(job_id))
