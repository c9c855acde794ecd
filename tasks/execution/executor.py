"""Running one run of a task inside a worker, and what happens when a task finishes."""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
import uuid
from datetime import datetime
from typing import Any, Literal

import redis
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections
from django.utils import timezone
from rq.timeouts import JobTimeoutException

from tasks import jsonsafety, state
from tasks.applications import cached_application
from tasks.delivery import intermediate
from tasks.events import catalog
from tasks.events import stream as event_stream
from tasks.execution import auto_retry, deadlines
from tasks.execution.deadlines import DeadlineExceeded
from tasks.execution.runners import Runner, RunnerError, TaskCancelled, resolve_runner
from tasks.models import Application, Task, TaskLog, TaskStatus
from tasks.plumbing.queueing import publish_finished, redis_client
from tasks.presenters import iso
from tasks.scheduling import estimates
from tasks.telemetry.metrics import observe_task_duration
from tasks.telemetry.stats_history import count_finished

logger = logging.getLogger(__name__)

MAX_LOG_MESSAGE = 10_000


class TaskContext:
    """The `ctx` a runner receives: progress, log lines and streamed output, each kept in the
    database and published on the task's event stream (tasks.events), and its application's
    runner_config. Every call stops a run that was cancelled (or lost and re-run), and one past
    its deadline (`deadline_at`, known from the start: no database read)."""

    # Streamed output reaches the database in batches, at most this often (and at the end).
    OUTPUT_FLUSH_SECONDS = 0.5
    # While Redis is away, events wait in the run (at most MAX_UNPUBLISHED, oldest dropped
    # first) and are tried again at most this often, in order, so an outage loses none.
    EVENTS_RETRY_SECONDS = 1.0
    MAX_UNPUBLISHED = 10_000

    def __init__(
        self,
        *,
        task_id: uuid.UUID | str,
        run: int,
        config: dict[str, Any],
        webhooks: intermediate.RunWebhooks | None = None,
        deadline_at: datetime | None = None,
    ) -> None:
        self.task_id = task_id
        self.run = run
        self.config = config
        self.webhooks = webhooks
        self.deadline_at = deadline_at
        self._unflushed: list[str] = []
        self._flushed_at = time.monotonic()
        self._unpublished: list[tuple[str, dict[str, Any]]] = []
        self._retry_at = 0.0

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Publish on the task's event stream and offer it to the intermediate webhooks."""
        if len(self._unpublished) >= self.MAX_UNPUBLISHED:
            del self._unpublished[0]
            logger.warning("task %s: an event dropped while Redis is away", self.task_id)
        self._unpublished.append((event, data))
        entry_ids = self.publish_waiting()
        if self.webhooks is not None:
            self.webhooks.offer(event, data, entry_ids[-1] if entry_ids else None)

    def publish_waiting(self, *, force: bool = False) -> list[str]:
        """Send the events waiting (all at once, in order); their ids, or [] while Redis is
        away. `force`: try now even within the retry interval (the end of the run)."""
        if not self._unpublished or (not force and time.monotonic() < self._retry_at):
            return []
        pipeline = redis_client().pipeline(transaction=False)
        for event, data in self._unpublished:
            event_stream.add(pipeline, task_id=self.task_id, run=self.run, event=event, data=data)
        try:
            results = pipeline.execute()
        except redis.RedisError as exc:
            logger.warning("task %s: %d events wait for Redis: %s",
                           self.task_id, len(self._unpublished), exc)  # fmt: skip
            self._retry_at = time.monotonic() + self.EVENTS_RETRY_SECONDS
            return []
        self._unpublished = []
        # Each event is three commands (XADD, EXPIRE, PUBLISH): the XADDs answer the ids.
        return [event_stream.text(entry_id) for entry_id in results[:: event_stream.COMMANDS]]

    def progress(self, percent: int, message: str | None = None) -> None:
        deadlines.check(self.deadline_at)
        percent = max(0, min(100, int(percent)))
        if not state.set_progress(task_id=self.task_id, run=self.run, progress=percent):
            raise TaskCancelled(f"task {self.task_id} run {self.run} is no longer running")
        text = None if message is None else jsonsafety.clean_text(str(message))[:MAX_LOG_MESSAGE]
        self.publish(catalog.PROGRESS, {"progress": percent, "message": text})

    def log(self, message: str, level: str = "info") -> None:
        """Keep a log line of this run; then, like `progress`, stop a run that was cancelled (or
        lost and re-run), so a runner that only logs still stops early."""
        deadlines.check(self.deadline_at)
        line = TaskLog.objects.create(
            task_id=self.task_id,
            run=self.run,
            level=jsonsafety.clean_text(str(level))[:10],
            message=jsonsafety.clean_text(str(message))[:MAX_LOG_MESSAGE],
        )
        if not Task.objects.filter(
            pk=self.task_id, run=self.run, status=TaskStatus.RUNNING
        ).exists():
            raise TaskCancelled(f"task {self.task_id} run {self.run} is no longer running")
        self.publish(
            catalog.LOG,
            {"level": line.level, "message": line.message, "at": iso(line.created_at)},
        )

    def check(self) -> None:
        """Stop a run that was cancelled, lost and re-run, or is past its deadline, as the calls
        above do but reporting nothing: for a runner waiting on an upstream that sends nothing
        (tasks.execution.upstreams). One read by primary key."""
        deadlines.check(self.deadline_at)
        if not Task.objects.filter(
            pk=self.task_id, run=self.run, status=TaskStatus.RUNNING
        ).exists():
            raise TaskCancelled(f"task {self.task_id} run {self.run} is no longer running")

    def emit(self, text: str) -> None:
        """Append a piece of streamed output: published at once, stored in batches (a stored
        batch is where a cancelled run is noticed, so a runner that only emits stops too)."""
        deadlines.check(self.deadline_at)
        text = jsonsafety.clean_text(str(text))
        if not text:
            return
        self._unflushed.append(text)
        self.publish(catalog.OUTPUT_DELTA, {"text": text})
        if time.monotonic() - self._flushed_at >= self.OUTPUT_FLUSH_SECONDS:
            self.flush_output()

    def flush_output(self) -> None:
        self._flushed_at = time.monotonic()
        if not self._unflushed:
            return
        text, self._unflushed = "".join(self._unflushed), []
        if not state.append_streamed_output(task_id=self.task_id, run=self.run, text=text):
            raise TaskCancelled(f"task {self.task_id} run {self.run} is no longer running")


def execute_task(*, task_id: str, run: int, worker_name: str = "") -> str:
    """Run one run of a task; returns the status it ended in (or why nothing was done)."""
    started_run = state.start_returning(task_id=task_id, run=run, worker_name=worker_name)
    if started_run is None:
        if deadlines.expire_unstarted(task_id=task_id, run=run):
            return "failed"  # past its start_by or deadline_at: failed, never started
        # Cancelled before it started, already taken by another worker, superseded by a newer
        # run, or gone (expired and cleaned up): in every case this job has nothing to do.
        return "not-started"
    task_uuid = uuid.UUID(str(task_id))
    has_callback = bool(started_run.callback_url)
    log_extra = {"task_id": str(task_uuid), "app_id": str(started_run.application_id), "run": run}
    logger.debug("task started", extra=log_extra)

    application = cached_application(started_run.application_id)
    started = time.monotonic()
    estimates.count_started()
    webhooks = intermediate.for_run(
        task_id=task_uuid,
        run=run,
        application=application,
        callback_url=started_run.callback_url,
        kinds=catalog.stored_kinds(started_run.callback_events),
    )
    ctx = TaskContext(
        task_id=task_uuid, run=run, config=dict(application.runner_config or {}),
        webhooks=webhooks, deadline_at=started_run.deadline_at,
    )  # fmt: skip
    ctx.publish(catalog.STARTED, {"worker": worker_name, "started_at": iso(timezone.now())})
    try:
        runner = resolve_runner(application.runner)
        output = _call_runner(runner, dict(started_run.inputs), ctx)
        _check_output(output)  # a result that cannot be stored or served fails the task
        ctx.flush_output()  # streamed output is stored before the result that ends the run
        ctx.publish_waiting(force=True)  # and its events go out before task.finished
    except DeadlineExceeded as exc:  # a TaskCancelled, from ctx or from the end of the run
        logger.info("task stopped: deadline exceeded", extra=log_extra)
        _keep_streamed_output(ctx)
        won = _fail(task_uuid, run, str(exc), traceback.format_exc(), error_code=deadlines.CODE)
        outcome = "failed"
    except TaskCancelled:
        logger.info("task stopped: cancelled", extra=log_extra)
        if webhooks is not None:
            webhooks.close()
        return "cancelled"
    except JobTimeoutException:
        error = f"timed out after {application.job_timeout_seconds} s"
        _keep_streamed_output(ctx)
        won = _fail(task_uuid, run, error, traceback.format_exc())
        outcome = "failed"
    except Exception as exc:
        error = str(exc) if isinstance(exc, RunnerError) else f"{type(exc).__name__}: {exc}"
        _keep_streamed_output(ctx)
        trace = traceback.format_exc()
        if _retry_automatically(ctx, application, exc, error, trace):
            # Run N+1 waits its backoff: no callback, no task.finished, no wake-up for run N.
            logger.info("task failed, retried automatically", extra=log_extra)
            if webhooks is not None:
                webhooks.close(wait_seconds=intermediate.CLOSE_WAIT_SECONDS)
            return "retrying"
        won = _fail(task_uuid, run, error, trace)
        outcome = "failed"
    else:
        try:
            won = _store_result(task_uuid, run, output, has_callback)
            outcome = "succeeded"
        except Exception as exc:
            if isinstance(exc, DatabaseError) and _database_down(exc):
                raise  # still unreachable after the retries: the job is retried (queueing)
            # The database refused this result (too large for a column, a type it rejects):
            # the task ends failed with that reason instead of running until the job timeout.
            won = _fail(task_uuid, run, f"the result could not be stored: {exc}", "")
            outcome = "failed"
    if not won:
        if webhooks is not None:
            webhooks.close()
        return "discarded"  # cancelled (or re-run) while the runner worked: its end is dropped
    logger.info("task %s", outcome, extra=log_extra)
    on_task_finished(
        task_uuid,
        run=run,
        application=application,
        has_callback=has_callback,
        callback_url=started_run.callback_url,
        batch_id=started_run.batch_id,
        # Only a blocking submit waits on the notification; pollers read the database.
        wake_waiters=started_run.response_mode == "blocking",
        run_seconds=time.monotonic() - started,
    )
    if webhooks is not None:
        # After the final callback is scheduled, so it never waits: the run's last coalesced
        # events go out before this worker takes its next job (a forking worker's work horse
        # exits with the job, its sender thread with it).
        webhooks.close(wait_seconds=intermediate.CLOSE_WAIT_SECONDS)
    return outcome


def _keep_streamed_output(ctx: TaskContext) -> None:
    """A failing run keeps what it streamed (it shows what went wrong), and its waiting events
    go out before its task.finished; cancelled meanwhile, there is nothing to keep it for."""
    with contextlib.suppress(TaskCancelled, DatabaseError):
        ctx.flush_output()
    ctx.publish_waiting(force=True)


def _check_output(output: Any) -> None:
    try:
        jsonsafety.check_value(output, "output")
    except jsonsafety.UnstorableJson as exc:
        raise RunnerError(f"the runner's output cannot be stored as JSON: {exc}") from None


# A finished runner's result is worth waiting for: a database blip (restart, failover) must not
# throw away minutes of LLM work.
STORE_RETRY_DELAYS = (0.5, 1, 2, 4, 8)


def _store_result(task_id: uuid.UUID, run: int, output: Any, has_callback: bool) -> bool:
    for delay in (*STORE_RETRY_DELAYS, None):
        try:
            return state.succeed(task_id=task_id, run=run, output=output, has_callback=has_callback)
        except DatabaseError as exc:
            if delay is None or not _database_down(exc):
                raise
            logger.warning("database unreachable storing a result; retrying in %s s", delay)
            close_old_connections()
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fail(
    task_id: uuid.UUID, run: int, error: str, trace: str, *, error_code: str | None = None
) -> bool:
    # Exception texts may carry NUL or lone surrogates (from inputs, receivers, C libraries).
    return state.fail(
        task_id=task_id,
        run=run,
        error=jsonsafety.clean_text(error)[:5000],
        traceback=jsonsafety.clean_text(trace),
        error_code=error_code,
    )


def _call_runner(runner: Runner, inputs: dict[str, Any], ctx: TaskContext) -> Any:
    """The runner's call. An end past the run's deadline, returned or raised (a runner error,
    the job timeout), is the deadline's: DeadlineExceeded, so the run ends with its code."""
    try:
        output = runner(inputs, ctx)
    except Exception:
        deadlines.check(ctx.deadline_at)
        raise
    deadlines.check(ctx.deadline_at)
    return output


def _retry_automatically(
    ctx: TaskContext, application: Application, exc: Exception, error: str, trace: str
) -> bool:
    """A retryable failure becomes the task's next run, queued after its backoff, when the
    application allows another automatic retry and the submit did not opt out
    (tasks.execution.auto_retry). Run N is kept in the run history as failed, with its error
    and traceback. False when the failure stands (or the run was cancelled or lost meanwhile:
    the caller's fail then loses too)."""
    if not application.auto_retry or not auto_retry.is_retryable(exc):
        return False
    flags = Task.objects.filter(pk=ctx.task_id, run=ctx.run).values_list(
        "auto_retry", "auto_retries"
    )
    allows, made = flags.first() or (False, 0)
    if not auto_retry.should_retry(
        exc, allowed=application.auto_retry, made=made, opted_out=not allows
    ):
        return False
    number = made + 1
    delay = auto_retry.backoff_seconds(
        number,
        base=application.auto_retry_backoff_seconds,
        retry_after=auto_retry.retry_after_of(exc),
    )
    ended_at = timezone.now()
    due = auto_retry.due_time(delay, since=ended_at) if delay > 0 else ended_at
    error = jsonsafety.clean_text(error)[:5000]
    new_run = state.start_new_run(
        task_id=ctx.task_id,
        expected=(TaskStatus.RUNNING,),
        expected_run=ctx.run,
        error=error,
        traceback=jsonsafety.clean_text(trace),
        automatic=True,
        queued_at=due,
        ended_at=ended_at,
    )
    if new_run is None:
        return False
    # The operator's view of why the task goes on: a log line of the failed run.
    message = auto_retry.describe(
        number=number, allowed=application.auto_retry, delay=delay, error=error
    )
    line = TaskLog.objects.create(
        task_id=ctx.task_id, run=ctx.run, level="warning", message=message[:MAX_LOG_MESSAGE]
    )
    ctx.publish(catalog.LOG, {"level": line.level, "message": line.message,
                              "at": iso(line.created_at)})  # fmt: skip
    if delay > 0:
        auto_retry.schedule_due_run(task_id=ctx.task_id, run=new_run, due=due)
    else:
        auto_retry.enqueue_due_run(task_id=ctx.task_id, run=new_run)
    return True


def _database_down(exc: DatabaseError) -> bool:
    return isinstance(exc, OperationalError | InterfaceError)


def on_task_finished(
    task_id: uuid.UUID | str,
    *,
    run: int,
    application: Application | None = None,
    has_callback: bool = True,
    callback_url: str = "",
    wake_waiters: bool = True,
    run_seconds: float | None = None,
    batch_id: uuid.UUID | Literal["unknown"] | None = "unknown",
) -> None:
    """Side effects of reaching succeeded/failed: end the task's event streams and wake
    blocking clients (one Redis trip), count it for the charts and metrics (batched in
    workers), schedule the callback if the task has one and the publishes to its application's
    destinations (tasks.delivery.destinations), and settle its batch if it was the batch's last
    item.

    The worker passes the run, application and batch it already holds, so nothing is read
    again; the other callers (a deadline, a lost task, an operator) leave the batch to be read.
    """
    from tasks.batches import completion  # completion reaches the delivery modules
    from tasks.delivery import destinations
    from tasks.delivery.callbacks import (
        schedule_first_delivery,  # callbacks imports execution's models
    )

    announce_finished(task_id, run=run, wake_waiters=wake_waiters)
    count_finished()
    if run_seconds is not None and application is not None:
        observe_task_duration(application_id=application.id, seconds=run_seconds)
        estimates.observe_run(application_id=application.id, seconds=run_seconds)
    if has_callback:
        schedule_first_delivery(
            task_id=task_id, run=run, application=application, callback_url=callback_url
        )
    destinations.schedule_first(task_id=task_id, run=run, application=application)
    try:
        if batch_id == "unknown":
            batch_id = Task.objects.filter(pk=task_id).values_list("batch_id", flat=True).first()
        completion.item_finished(batch_id=batch_id)
    except (DatabaseError, redis.RedisError):  # the task's end stands; the reconciler settles
        logger.warning("could not settle the batch of task %s", task_id, exc_info=True)


def announce_finished(task_id: uuid.UUID | str, *, run: int, wake_waiters: bool = True) -> None:
    """The `task.finished` marker on the task's event stream (readers render its body from the
    database) and the wake-up of blocking submits waiting on it. Best effort: streams and
    waiters also read the database."""
    pipeline = redis_client().pipeline(transaction=False)
    event_stream.add(pipeline, task_id=task_id, run=run, event=catalog.FINISHED, data={})
    if wake_waiters:
        publish_finished(task_id, pipeline=pipeline)
    try:
        pipeline.execute()
    except redis.RedisError as exc:
        logger.warning("could not announce the end of task %s: %s", task_id, exc)
