"""Running one run of a task inside a worker, and what happens when a task finishes."""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from typing import Any

from rq.timeouts import JobTimeoutException

from . import state
from .applications import cached_application
from .metrics import observe_task_duration
from .models import Application, TaskLog
from .queueing import publish_finished
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
    started_run = state.start_returning(task_id=task_id, run=run, worker_name=worker_name)
    if started_run is None:
        # Cancelled before it started, already taken by another worker, superseded by a newer
        # run, or gone (expired and cleaned up): in every case this job has nothing to do.
        return "not-started"
    task_uuid = uuid.UUID(str(task_id))
    has_callback = bool(started_run.callback_url)
    log_extra = {"task_id": str(task_uuid), "app_id": str(started_run.application_id), "run": run}
    logger.debug("task started", extra=log_extra)

    application = cached_application(started_run.application_id)
    started = time.monotonic()
    ctx = TaskContext(task_id=task_uuid, run=run, config=dict(application.runner_config or {}))
    try:
        runner = resolve_runner(application.runner)
        output = runner(dict(started_run.inputs), ctx)
        json.dumps(output)  # a result the API cannot serve is a failure of the runner
    except TaskCancelled:
        logger.info("task stopped: cancelled", extra=log_extra)
        return "cancelled"
    except JobTimeoutException:
        error = f"timed out after {application.job_timeout_seconds} s"
        won = state.fail(task_id=task_uuid, run=run, error=error, traceback=traceback.format_exc())
        outcome = "failed"
    except Exception as exc:
        error = str(exc) if isinstance(exc, RunnerError) else f"{type(exc).__name__}: {exc}"
        won = state.fail(task_id=task_uuid, run=run, error=error[:5000],
                         traceback=traceback.format_exc())  # fmt: skip
        outcome = "failed"
    else:
        won = state.succeed(task_id=task_uuid, run=run, output=output, has_callback=has_callback)
        outcome = "succeeded"
    if not won:
        return "discarded"  # cancelled (or re-run) while the runner worked: its end is dropped
    logger.info("task %s", outcome, extra=log_extra)
    on_task_finished(
        task_uuid,
        run=run,
        application=application,
        has_callback=has_callback,
        # Only a blocking submit waits on the notification; pollers read the database.
        wake_waiters=started_run.response_mode == "blocking",
        run_seconds=time.monotonic() - started,
    )
    return outcome


def on_task_finished(
    task_id: uuid.UUID | str,
    *,
    run: int | None = None,
    application: Application | None = None,
    has_callback: bool = True,
    wake_waiters: bool = True,
    run_seconds: float | None = None,
) -> None:
    """Side effects of reaching succeeded/failed: wake blocking clients, count it for the charts
    and metrics (batched in workers), and schedule the callback if the task has one.

    The worker passes the run and application it already holds, so nothing is read again.
    """
    from .callbacks import schedule_first_delivery  # callbacks imports execution's models

    if wake_waiters:
        publish_finished(task_id)
    count_finished()
    if run_seconds is not None and application is not None:
        observe_task_duration(application_id=application.id, seconds=run_seconds)
    if has_callback:
        schedule_first_delivery(task_id=task_id, run=run, application=application)
