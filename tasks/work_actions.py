"""The Work page's actions on waiting work: run now, deliver now, discard, delete (retry and
redeliver are tasks.services / tasks.delivery.callbacks). Each takes task ids and returns what it
did, so the dashboard's selected rows and a background 'all matching' run (tasks.upkeep.bulk)
share it.

Run now keeps the application's concurrency cap: a held run moves to the head of its
application's line (and to the front of the task queue when promoted), it does not jump the
cap, which is the operator's own setting; the answer says how many are still held.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis
from django.conf import settings
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.rate_limit import RateLimitRegistry
from rq.registry import ScheduledJobRegistry

from tasks import services, state
from tasks.delivery import callbacks
from tasks.models import AttemptTrigger, CallbackAttempt, Task
from tasks.plumbing.queueing import queue, redis_client, task_job_id
from tasks.selectors import work
from tasks.statuses import (
    CALLBACK_AUTO_CLAIMABLE,
    CALLBACK_IN_FLIGHT,
    DELIVERABLE,
    FINISHED,
    TaskStatus,
)
from tasks.upkeep import retention

logger = logging.getLogger(__name__)

GIVE_UP_REASON = "given up by an operator"


@dataclass
class ActionResult:
    done: list[uuid.UUID] = field(default_factory=list)
    held: int = 0  # run now: still behind the application's concurrency cap
    refused: int = 0  # delete: unfinished, or a callback still being delivered

    def note(self) -> str:
        parts = []
        if self.held:
            parts.append(f"{self.held} still wait for a free slot under their application's "
                         "concurrency cap (first in line)")  # fmt: skip
        if self.refused:
            parts.append(f"{self.refused} refused: unfinished, or a callback still being "
                         "delivered (only finished work can be deleted)")  # fmt: skip
        return (" " + "; ".join(parts) + ".") if parts else ""


def _ids(task_ids: Iterable[uuid.UUID | str]) -> list[uuid.UUID]:
    return [uuid.UUID(str(task_id)) for task_id in task_ids]


def _due_now(registry: ScheduledJobRegistry, job_id: str) -> Job | None:
    """A job of RQ's scheduled registry onto its queue now, at the front: what RQ's scheduler
    does when it is due (rq.scheduler.enqueue_scheduled_jobs), rate limit included. None when
    the job is not scheduled (any more)."""
    client = redis_client()
    if client.zscore(registry.key, job_id) is None:
        return None
    try:
        job = Job.fetch(job_id, connection=client)
    except NoSuchJobError:
        registry.remove(job_id)
        return None
    target = queue(job.origin)
    with client.pipeline() as pipeline:
        registry.remove(job.id, pipeline=pipeline)
        if job.has_rate_limit:
            target._enqueue_rate_limited_job(job, pipeline=pipeline, at_front=True)
        else:
            target._enqueue_job(job, pipeline=pipeline, at_front=True)
        pipeline.execute()
    return job


def _front_of_line(task: Task, job_id: str) -> bool | None:
    """A run held by its application's cap to the head of the line. True if a free slot took it
    at once, False if it still waits (first), None if the cap does not hold it."""
    client = redis_client()
    key = work.rate_limit_key(task.application_id)
    waiting = work.rate_limited_key(key)
    if client.zscore(waiting, job_id) is None:
        return None
    lowest = client.zrange(waiting, 0, 0, withscores=True)
    with client.pipeline() as pipeline:
        pipeline.hset(Job.key_for(job_id), "enqueue_at_front", "1")
        pipeline.zadd(waiting, {job_id: float(lowest[0][1]) - 1 if lowest else 0.0})
        pipeline.execute()
    registry = RateLimitRegistry(key, connection=client)
    cap = registry.concurrency or task.application.max_concurrency or 1
    return job_id in registry.acquire_and_enqueue(cap)


def run_now(*, task_ids: Iterable[uuid.UUID | str]) -> ActionResult:
    """Pending runs that wait (behind the cap, or scheduled by RQ for an infrastructure retry)
    to the front of the task queue now. A run already queued or running is left as it is."""
    result = ActionResult()
    tasks = Task.objects.select_related("application").filter(
        pk__in=_ids(task_ids), status=TaskStatus.PENDING
    )
    scheduled = work.scheduled_registry()
    for task in tasks:
        job_id = task_job_id(task.id, task.run)
        try:
            moved = _front_of_line(task, job_id)
            if moved is None and (job := _due_now(scheduled, job_id)) is not None:
                moved = job.get_status(refresh=True) != "rate_limited"
        except redis.RedisError:
            logger.warning("run now: Redis unavailable", extra={"task_id": str(task.id)})
            continue
        if moved is None:
            continue
        result.done.append(task.id)
        result.held += not moved
    return result


def _next_auto_job_id(task: Task) -> str:
    done = CallbackAttempt.objects.filter(
        task_id=task.id, run=task.run, trigger=AttemptTrigger.AUTO
    ).count()
    return f"cb-{task.id}-{task.run}-a{done + 1}"  # tasks.delivery.callbacks._delivery_job_id


def deliver_now(*, task_ids: Iterable[uuid.UUID | str]) -> ActionResult:
    """Callbacks waiting for their next automatic attempt: that attempt now, at the front of the
    callbacks queue. It is the scheduled attempt itself (same job, same number), so it claims,
    records and schedules what follows as it would have at its time (tasks.delivery.callbacks);
    a schedule lost with Redis is re-created first (callbacks.resume_delivery)."""
    result = ActionResult()
    tasks = (
        Task.objects.select_related("application")
        .filter(pk__in=_ids(task_ids), status__in=DELIVERABLE,
                callback_status__in=CALLBACK_AUTO_CLAIMABLE,
                callback_next_attempt_at__isnull=False)
        .exclude(callback_url="")
    )  # fmt: skip
    registry = ScheduledJobRegistry(queue=queue(settings.CALLBACK_QUEUE))
    for task in tasks:
        try:
            # Not in RQ's schedule: lost with Redis (re-created, due now), or parked on its
            # endpoint's in-flight cap (it runs when a slot frees; nothing to do).
            if _due_now(registry, _next_auto_job_id(task)) is None and not (
                callbacks.resume_delivery(task=task)
            ):
                continue
        except redis.RedisError:
            logger.warning("deliver now: Redis unavailable", extra={"task_id": str(task.id)})
            continue
        result.done.append(task.id)
    return result


def discard(*, task_ids: Iterable[uuid.UUID | str]) -> ActionResult:
    """Waiting work stops, its record stays: an unfinished task is cancelled (its job dropped
    from the queue, the cap's line or RQ's schedule); a finished task's waiting callback is given
    up (-> failed, reason recorded), its scheduled attempt removed."""
    result = ActionResult()
    ids = _ids(task_ids)
    rows = Task.objects.filter(pk__in=ids).values_list("id", "status", "run", "callback_status")
    registry = ScheduledJobRegistry(queue=queue(settings.CALLBACK_QUEUE))
    for task_id, status, run, callback_status in rows:
        if status not in FINISHED:
            if services.cancel_task(task_id=task_id).cancelled:
                result.done.append(task_id)
            continue
        if callback_status not in CALLBACK_IN_FLIGHT:
            continue
        task = Task.objects.only("id", "run").get(pk=task_id)
        job_id = _next_auto_job_id(task)
        if state.give_up_delivery(task_id=task_id, run=run, reason=GIVE_UP_REASON):
            result.done.append(task_id)
            try:  # its attempt would find the callback settled and skip; tidy it away anyway
                registry.remove(job_id, delete_job=True)
            except (redis.RedisError, NoSuchJobError):
                pass
    return result


def delete(*, task_ids: Iterable[uuid.UUID | str]) -> ActionResult:
    """Remove finished tasks with their logs, attempts and earlier runs (retention's deletion,
    rows re-checked under lock). Unfinished tasks, and tasks whose callback is still being
    delivered, are refused: they are work, not records."""
    ids = _ids(task_ids)
    deletable = Task.objects.filter(status__in=FINISHED).exclude(
        callback_status__in=CALLBACK_IN_FLIGHT
    )
    candidates = list(deletable.filter(pk__in=ids).values_list("pk", flat=True))
    existing = Task.objects.filter(pk__in=ids).count()
    if candidates:
        retention.delete_batch(deletable, candidates)
    remaining = set(Task.objects.filter(pk__in=candidates).values_list("pk", flat=True))
    done = [task_id for task_id in candidates if task_id not in remaining]
    return ActionResult(done=done, refused=existing - len(candidates))


def retry(*, task_ids: Iterable[uuid.UUID | str]) -> ActionResult:
    return ActionResult(done=services.retry_tasks(task_ids=task_ids))


def redeliver(*, task_ids: Iterable[uuid.UUID | str]) -> ActionResult:
    return ActionResult(done=callbacks.redeliver(task_ids=list(task_ids)))


# Kind (tasks.models.BulkOperation.Kind) -> the action, and the tabs of the Work page it
# applies to: the one place that says which action makes sense for which state of work.
ACTIONS = {
    "run_now": run_now,
    "deliver_now": deliver_now,
    "retry": retry,
    "redeliver": redeliver,
    "discard": discard,
    "delete": delete,
}
TAB_ACTIONS: dict[str, tuple[str, ...]] = {
    "queued": ("discard",),
    "scheduled": ("deliver_now", "run_now", "discard"),
    "deferred": ("run_now", "discard"),
    "running": ("discard",),
    "failed": ("retry", "delete"),
    "callbacks": ("deliver_now", "discard"),
    "given_up": ("redeliver", "delete"),
}
