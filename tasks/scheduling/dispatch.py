"""The moves between the per-key lines and the lanes: a run that ended passes its key's slot
on (`run_ended`, from the job), and the reconciler's `refill` frees the slots of runs that
ended without saying so and follows changed caps (tasks.scheduling.fairness)."""

from __future__ import annotations

import logging
import uuid

import redis
from rq import get_current_job

from tasks.applications import cached_application
from tasks.models import Application, Task
from tasks.plumbing.queueing import task_job_id
from tasks.scheduling import fairness
from tasks.statuses import TaskStatus

logger = logging.getLogger(__name__)

UNFINISHED = (TaskStatus.PENDING, TaskStatus.RUNNING)


def _run_of(job_id: str) -> tuple[uuid.UUID, int] | None:
    """(task id, run) of a task job id `task-<uuid>-<run>`."""
    head, _, run = job_id.rpartition("-")
    try:
        return uuid.UUID(head.removeprefix("task-")), int(run)
    except ValueError:
        return None


def run_ended() -> None:
    """From the task job, once its run ended: pass the key's slot on. Best effort (the
    reconciler's refill frees what this could not)."""
    job = get_current_job()
    member = job.meta.get(fairness.META_FIELD) if job is not None else None
    if job is None or not member:
        return
    key = fairness.Key.parse(member)
    try:
        _pass_on(key, [job.id])
    except redis.RedisError as exc:
        logger.warning("could not pass on the slot of %s: %s", job.id, exc)


def run_dropped(*, task_id: uuid.UUID | str, run: int) -> None:
    """A run ended before any worker took it (a cancel, a deadline): its key's slot passes on
    now rather than when a worker reaches its job. Best effort, as `run_ended`."""
    task = Task.objects.select_related("application").filter(pk=task_id).first()
    key = fairness.key_of(task) if task is not None else None
    if key is None:
        return
    try:
        _pass_on(key, [task_job_id(task_id, run)])
    except redis.RedisError as exc:
        logger.warning("could not pass on the slot of task %s: %s", task_id, exc)


def runs_dropped(*, key: fairness.Key, job_ids: list[str]) -> None:
    """`run_dropped` for many runs of one key (a batch's cancel): one pass for all of them."""
    try:
        _pass_on(key, job_ids)
    except redis.RedisError as exc:
        logger.warning("could not pass on the slots of %d runs: %s", len(job_ids), exc)


def _cap(key: fairness.Key, *, fresh: bool = False) -> int | None:
    """The key's cap (fairness.cap_of). A run's end reads the application as this process
    caches it (AUTH_CACHE_SECONDS), so it costs no query; the reconciler's refill reads it
    fresh."""
    try:
        if fresh:
            application = Application.objects.get(pk=key.application_id)
        else:
            application = cached_application(key.application_id)
    except Application.DoesNotExist:
        return None
    return fairness.cap_of(key, application)


def _pass_on(key: fairness.Key, ended: list[str], *, fresh: bool = False) -> int:
    """Free `ended`'s slots and enqueue the runs granted one; a granted run that is no longer
    waiting (cancelled, failed by its deadline) frees its slot again. Returns runs enqueued."""
    from tasks.submission import enqueue_pending_task  # submission imports scheduling

    cap = _cap(key, fresh=fresh)
    enqueued = 0
    while True:
        granted = fairness.release(key=key, ended_job_ids=ended, cap=cap)
        if not granted:
            return enqueued
        runs = {job_id: _run_of(job_id) for job_id in granted}
        tasks = Task.objects.select_related("application").in_bulk(
            [run[0] for run in runs.values() if run]
        )
        ended = []
        for job_id, run in runs.items():
            task = tasks.get(run[0]) if run else None
            if run is None or task is None or task.run != run[1] or task.status != "pending":
                ended.append(job_id)
            elif enqueue_pending_task(task=task, announce=True):
                enqueued += 1
        if not ended:
            return enqueued


def refill() -> int:
    """For every key in use: free the slots of runs that have ended, fill free slots from the
    line (at the application's current cap, everyone once it has none). Returns runs enqueued."""
    client = fairness.redis_client()
    enqueued = 0
    for key in fairness.keys_in_use(client):
        holders = fairness.slot_holders(client, key)
        runs = {job_id: _run_of(job_id) for job_id in holders}
        current = dict(
            Task.objects.filter(
                pk__in=[run[0] for run in runs.values() if run], status__in=UNFINISHED
            ).values_list("pk", "run")
        )
        ended = [
            job_id for job_id, run in runs.items() if run is None or current.get(run[0]) != run[1]
        ]
        enqueued += _pass_on(key, ended, fresh=True)
    return enqueued
