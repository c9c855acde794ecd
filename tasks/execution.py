"""Running one run of a task inside a worker, and what happens when a task finishes."""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from typing import Any

import redis
from rq.timeouts import JobTimeoutException

from . import state
from .applications import cached_application
from .metrics import observe_task_duration
from .models import Task, TaskLog
from .queueing import publish_finished, redis_client
from .runners import RunnerError, TaskCancelled, resolve_runner
from .stats_history import count_finished

logger = logging.getLogger(__name__)

MAX_LOG_MESSAGE = 10_000


class TaskContext:
    """The `ctx` a runner receives: progress, log lines, its application's runner_config."""

    def __init__(self, *, task_id: uuid.UUID | str, run: int, config: dict[str, Any]) -> None:
        self.task_id = task_id
        self.run = run
        self.config = config

    def progress(self, percent: int) -> None:
        if not state.set_progress(task_id=self.task_id, run=self.run, progress=percent):
            raise TaskCancelled(f"task {self.task_id} run {self.run} is no longer running")

    def log(self, message: str, level: str = "info") -> None:
        TaskLog.objects.create(
            task_id=self.task_id,
            run=self.run,
            level=level[:10],
            message=str(message)[:MAX_LOG_MESSAGE],
        )


def execute_task(*, task_id: str, run: int, worker_name: str = "") -> str:
    """Run one run of a task; returns the status it ended in (or why nothing was done)."""
    started_task = state.start_returning(task_id=task_id, run=run, worker_name=worker_name)
    if started_task is None:
        # Cancelled before it started, already taken by another worker, superseded by a newer
        # run, or gone (expired and cleaned up): in every case this job has nothing to do.
        return "not-started"
    inputs, callback_url, application_id = started_task
    task = Task(id=uuid.UUID(str(task_id)), run=run, inputs=inputs, callback_url=callback_url,
                application_id=application_id)  # fmt: skip
    log_extra = {"task_id": str(task.id), "app_id": str(task.application_id), "run": run}
    logger.debug("task started", extra=log_extra)

    application = cached_application(task.application_id)
    started = time.monotonic()
    ctx = TaskContext(task_id=task.id, run=run, config=dict(application.runner_config or {}))
    try:
        runner = resolve_runner(application.runner)
        output = runner(dict(task.inputs), ctx)
        json.dumps(output)  # a result the API cannot serve is a failure of the runner
    except TaskCancelled:
        logger.info("task stopped: cancelled", extra=log_extra)
        return "cancelled"
    except JobTimeoutException:
        error = f"timed out after {application.job_timeout_seconds} s"
        won = state.fail(task_id=task.id, run=run, error=error, traceback=traceback.format_exc())
        outcome = "failed"
    except Exception as exc:
        error = str(exc) if isinstance(exc, RunnerError) else f"{type(exc).__name__}: {exc}"
        won = state.fail(task_id=task.id, run=run, error=error[:5000],
                         traceback=traceback.format_exc())  # fmt: skip
        outcome = "failed"
    else:
        won = state.succeed(
            task_id=task.id, run=run, output=output, has_callback=bool(task.callback_url)
        )
        outcome = "succeeded"
    if not won:
        return "discarded"  # cancelled (or re-run) while the runner worked: its end is dropped
    logger.info("task %s", outcome, extra=log_extra)
    on_task_finished(
        task.id,
        has_callback=bool(task.callback_url),
        application_id=application.id,
        run_seconds=time.monotonic() - started,
    )
    return outcome


def on_task_finished(
    task_id: uuid.UUID | str,
    *,
    has_callback: bool = True,
    application_id: uuid.UUID | str | None = None,
    run_seconds: float | None = None,
) -> None:
    """Side effects of reaching succeeded/failed: wake blocking clients, count it for the charts
    and metrics (one Redis round trip), and schedule the callback if the task has one."""
    from .callbacks import schedule_first_delivery  # callbacks imports execution's models

    try:
        pipeline = redis_client().pipeline(transaction=False)
        publish_finished(task_id, pipeline)
        count_finished(pipeline)
        if run_seconds is not None and application_id is not None:
            observe_task_duration(pipeline, application_id=application_id, seconds=run_seconds)
        pipeline.execute()
    except redis.RedisError:
        logger.warning("could not record completion of task %s", task_id, exc_info=True)
    if has_callback:
        schedule_first_delivery(task_id=task_id)
