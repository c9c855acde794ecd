"""Task operations that combine a state transition with its side effects in Redis.

Clients (cancel) and operators (retry, cancel, mark failed) come through here; views, commands
and jobs stay thin.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from django.db import transaction
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job

from tasks import state
from tasks.batches import completion
from tasks.execution.executor import announce_finished, on_task_finished
from tasks.models import Task, TaskStatus
from tasks.plumbing.queueing import redis_client
from tasks.scheduling import dispatch
from tasks.submission import enqueue_pending_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CancelResult:
    cancelled: bool
    task: Task


def cancel_task(*, task_id: uuid.UUID | str) -> CancelResult:
    """Cancel a pending or running task. `cancelled` is False when it had already finished.

    A running task is marked cancelled at once (its eventual result is discarded by the guarded
    transition), its runner stops at its next progress/log call, and a forking worker is told
    to kill the work horse.
    """
    before = Task.objects.only("status", "run", "batch_id").get(pk=task_id)
    won = state.cancel(task_id=task_id)
    if won:
        announce_finished(task_id, run=before.run)
        completion.item_finished(batch_id=before.batch_id)
        if before.status == TaskStatus.RUNNING:
            _stop_job(before.rq_job_id)
        else:
            _drop_queued_job(before.rq_job_id)
            dispatch.run_dropped(task_id=task_id, run=before.run)
    task = Task.objects.select_related("application").get(pk=task_id)
    return CancelResult(cancelled=won, task=task)


def _stop_job(job_id: str) -> None:
    try:
        send_stop_job_command(redis_client(), job_id)
    except (NoSuchJobError, InvalidJobOperation, redis.RedisError):
        # Not executing (yet/anymore), a non-forking worker, or Redis away: the guarded
        # transitions already keep a cancelled task cancelled.
        logger.info("could not send stop-job for %s", job_id)


def _drop_queued_job(job_id: str) -> None:
    # If this fails the worker still finds the task cancelled and skips it.
    with contextlib.suppress(NoSuchJobError, InvalidJobOperation, redis.RedisError):
        Job.fetch(job_id, connection=redis_client()).cancel()


def retry_tasks(*, task_ids: Iterable[uuid.UUID | str]) -> list[uuid.UUID]:
    """Start a new run of each failed or cancelled task; returns the ids that were retried."""
    retried: list[uuid.UUID] = []
    for task_id in task_ids:
        new_run = state.start_new_run(task_id=task_id)
        if new_run is None:
            continue
        task = Task.objects.select_related("application").get(pk=task_id)
        completion.reopen(batch_ids=[task.batch_id])
        transaction.on_commit(functools.partial(enqueue_pending_task, task=task, announce=True))
        retried.append(task.id)
    return retried


def mark_failed(*, task_id: uuid.UUID | str, error: str) -> bool:
    """Operator's 'mark failed' for a stuck pending/running task; sends its callback."""
    task = Task.objects.only("run").get(pk=task_id)
    if state.fail(
        task_id=task_id,
        run=task.run,
        error=error,
        expected=(TaskStatus.PENDING, TaskStatus.RUNNING),
    ):
        on_task_finished(task_id, run=task.run)
        return True
    return False


def requeue_pending(*, task_id: uuid.UUID | str) -> bool:
    """Put a stuck pending task's current run on the queue again (a no-op if its job is there)."""
    task = (
        Task.objects.select_related("application")
        .filter(pk=task_id, status=TaskStatus.PENDING)
        .first()
    )
    return task is not None and enqueue_pending_task(task=task)
