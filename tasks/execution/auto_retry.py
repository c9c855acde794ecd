"""Automatic retries of failed runs: which failures are retried, how often, and after what wait.

A run that fails with a `RetryableError` (a runner raised it; the `http` runner raises it for a
connection error, a timeout, a 5xx or a 429 from its upstream) becomes a new run of the same
task instead of a failure, when the application allows automatic retries (`auto_retry`, at most
that many per task) and the submit did not opt out (`"retry": false`). Any other failure, and a
retryable one past the last retry, fails the task as before.

The wait before retry n is `auto_retry_backoff_seconds` x 2^(n-1), plus up to 10 % jitter (never
less: many tasks failed by one outage do not come back at once), at least the upstream's
Retry-After (up to MAX_RETRY_AFTER_SECONDS), and at most MAX_BACKOFF_SECONDS.

The executor (tasks.execution.executor) applies the decision: run N is kept failed in the run
history and run N+1 waits its backoff as a scheduled RQ job (tasks.jobs.enqueue_due_run).
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from datetime import UTC, datetime

import redis
from django.conf import settings
from rq.exceptions import DuplicateJobError

from tasks.execution.runners import RetryableError
from tasks.models import Task
from tasks.plumbing.queueing import SUCCESSFUL_JOB_TTL, queue
from tasks.statuses import TaskStatus
from tasks.submission import enqueue_pending_task

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_BACKOFF_SECONDS",
    "RetryableError",
    "backoff_seconds",
    "describe",
    "due_time",
    "enqueue_due_run",
    "is_retryable",
    "schedule_due_run",
    "should_retry",
]

JITTER = 0.10
# An upstream's Retry-After is honoured up to an hour; a wait is never longer than a day.
MAX_RETRY_AFTER_SECONDS = 3600.0
MAX_BACKOFF_SECONDS = 24 * 3600.0


def is_retryable(exc: BaseException) -> bool:
    """A failure that may pass if the run is tried again later."""
    return isinstance(exc, RetryableError)


def should_retry(exc: BaseException, *, allowed: int, made: int, opted_out: bool) -> bool:
    """Whether this failure becomes a new run: it is retryable, the application allows
    `allowed` automatic retries of which `made` were made, and the submit did not opt out."""
    return not opted_out and made < allowed and is_retryable(exc)


def backoff_seconds(
    number: int,
    *,
    base: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """The wait before automatic retry `number` (1 for the first): see the module docstring."""
    delay = max(0.0, base) * 2 ** max(0, number - 1)
    delay += delay * (rng or random).uniform(0, JITTER)
    if retry_after is not None:
        delay = max(delay, min(max(0.0, retry_after), MAX_RETRY_AFTER_SECONDS))
    return min(delay, MAX_BACKOFF_SECONDS)


def retry_after_of(exc: BaseException) -> float | None:
    """The least wait the failure asked for (a RetryableError's hint), if any."""
    return exc.retry_after if isinstance(exc, RetryableError) else None


def describe(*, number: int, allowed: int, delay: float, error: str) -> str:
    """The run's log line that says what happens next."""
    return f"automatic retry {number} of {allowed} in {round(delay, 1):g} s: {error}"


# --- waiting out the backoff ---------------------------------------------------------------------


def due_time(delay: float, *, since: datetime | None = None) -> datetime:
    """When a run that waits `delay` seconds after `since` (now) joins the queue: whole seconds,
    rounded up, because RQ's scheduled registry keeps whole seconds (truncated) and a run must
    never start early."""
    start = since.timestamp() if since is not None else time.time()
    return datetime.fromtimestamp(math.ceil(start + delay), tz=UTC)


def due_job_id(task_id: uuid.UUID | str, run: int) -> str:
    return f"due-{task_id}-{run}"


def schedule_due_run(*, task_id: uuid.UUID | str, run: int, due: datetime) -> bool:
    """An RQ job on the maintenance queue, scheduled for `due`, that enqueues the run then
    (tasks.jobs.enqueue_due_run): the wait lives in Redis and survives worker restarts. False
    when Redis refused it; the reconciler then enqueues the pending run once it is due (the
    task's queued_at), from the database."""
    try:
        queue(settings.MAINTENANCE_QUEUE).enqueue_at(
            due,
            "tasks.jobs.enqueue_due_run",
            args=(str(task_id), run),
            job_id=due_job_id(task_id, run),
            job_timeout=60,
            result_ttl=SUCCESSFUL_JOB_TTL,
            unique=True,
            description=f"task {task_id} run {run} due (automatic retry)",
        )
    except DuplicateJobError:
        return True
    except redis.RedisError:
        logger.warning("could not schedule an automatic retry; the reconciler will enqueue it",
                       extra={"task_id": str(task_id), "run": run}, exc_info=True)  # fmt: skip
        return False
    return True


def enqueue_due_run(*, task_id: uuid.UUID | str, run: int) -> bool:
    """The backoff is over: enqueue the run, announcing it (`task.queued`), unless the task was
    cancelled meanwhile or has moved on to another run."""
    task = (
        Task.objects.select_related("application")
        .filter(pk=task_id, run=run, status=TaskStatus.PENDING)
        .first()
    )
    if task is None:
        return False
    return enqueue_pending_task(task=task, announce=True)
