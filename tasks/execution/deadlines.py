"""Deadlines: how long a client lets a task take, and how long an application lets a run wait.

Two bounds, both on the task row:

- `deadline_at`, the client's bound on the whole task (every run of it): the `Cancel-After`
  header or the body's `deadline_seconds`, counted from the submit; the sooner wins when both
  are given. Set by tasks.submission.
- `start_by`, the application's bound on the current run's wait: `max_queue_seconds` after the
  run was queued. Set by tasks.submission and tasks.state.start_new_run.

A pending run past either bound never starts, and a running run past `deadline_at` is stopped
the way a cancel stops it; either way the run ends `failed` with `error_code`
`deadline_exceeded` and an error that names the bound, and gets its `task.finished` event and
callback like any failed run. Where that happens:

- the worker, as it dequeues the run: `tasks.sql.start_run` refuses to start a run past a bound
  (in its guarded UPDATE, so there is no window), and `expire_unstarted` then fails it;
- the sweep (`sweep`, every SWEEP_INTERVAL_SECONDS from the cron process): a run stuck behind a
  long queue fails on time, not only once a worker reaches it (its job stays queued, and the
  worker that reaches it skips it); a running one is failed and its job is sent RQ's stop-job
  command (a forking worker kills the work horse);
- the run itself: the worker knows the run's deadline when it starts it (`StartedRun`), so each
  ctx call checks it without a database read (`check`, raising DeadlineExceeded, which a
  runner sees as TaskCancelled), and a run that ends after it, whatever the runner returned or
  raised, ends with the deadline's error.

RQ's job timeout is not capped at the deadline. It counts from the job's start while the
deadline counts from the submit, so a cap set at the enqueue could only be loose (the deadline
plus the time in queue); a job timeout fails the run as "timed out" rather than with this
code; and the checks above already stop it: a cooperative runner at its next ctx call, a
forking worker's horse by the stop-job command. Only a runner that never calls ctx on a
non-forking worker keeps its worker busy past the deadline, as after a cancel, and its result
is dropped.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from django.utils import timezone
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError

from tasks import state
from tasks.execution.runners import TaskCancelled
from tasks.models import Task
from tasks.plumbing.queueing import redis_client, task_job_id
from tasks.scheduling import dispatch
from tasks.statuses import UNFINISHED, ErrorCode
from tasks.statuses import TaskStatus as S

logger = logging.getLogger(__name__)

CODE = ErrorCode.DEADLINE_EXCEEDED.value
# The longest bound a client may set, in seconds: the same as max_queue_seconds' (7 days).
MAX_SECONDS = 7 * 24 * 3600
# How often the cron process runs the sweep (tasks.upkeep.cron), and how many runs of each
# bound one pass fails at most (each is an UPDATE, its event and its callback's enqueue).
SWEEP_INTERVAL_SECONDS = 2
BATCH = 500

# The error of a run ended by a bound: what it says names the bound (the Failures page groups
# by it, numbers masked).
QUEUE_BOUND = "deadline exceeded: not started within the application's max_queue_seconds ({} s)"
CLIENT_BOUND_PENDING = (
    "deadline exceeded: not started before the client's deadline (Cancel-After or deadline_seconds)"
)
CLIENT_BOUND_RUNNING = (
    "deadline exceeded: still running at the client's deadline (Cancel-After or deadline_seconds)"
)


# --- the client's bound, as a submit gives it ----------------------------------------------------


class InvalidDeadline(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# A decimal number of seconds, or of minutes or hours with its unit (lowercase); blanks around
# it are an HTTP header's optional whitespace. No exponent, sign, inner space or other unit.
_CANCEL_AFTER = re.compile(r"[ \t]*(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>[smh]?)[ \t]*")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}
CANCEL_AFTER_RULE = (
    "Cancel-After must be a number of seconds, or a number with the unit s, m or h (30, 30s, "
    "1.5m, 2h), greater than 0 and at most 7 days."
)
DEADLINE_SECONDS_RULE = (
    f"deadline_seconds must be a number of seconds greater than 0 and at most {MAX_SECONDS} "
    "(7 days)."
)


def parse_cancel_after(raw: str | None) -> float | None:
    """The `Cancel-After` header in seconds; None when absent or empty (as an empty
    Idempotency-Key is none). Fractions are kept (`1.5m` is 90 s); InvalidDeadline otherwise."""
    if raw is None or not raw.strip(" \t"):
        return None
    match = _CANCEL_AFTER.fullmatch(raw)
    if match is None:
        raise InvalidDeadline("Cancel-After", CANCEL_AFTER_RULE)
    seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"]]
    if not 0 < seconds <= MAX_SECONDS:
        raise InvalidDeadline("Cancel-After", CANCEL_AFTER_RULE)
    return seconds


def parse_deadline_seconds(value: Any) -> float | None:
    """The body's `deadline_seconds`: a JSON number (not a boolean) > 0 and <= MAX_SECONDS;
    None when absent or null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidDeadline("deadline_seconds", DEADLINE_SECONDS_RULE)
    if not (0 < value <= MAX_SECONDS):  # NaN compares false; before float(): a huge int
        raise InvalidDeadline("deadline_seconds", DEADLINE_SECONDS_RULE)
    return float(value)


def client_bound(*, cancel_after: str | None, deadline_seconds: Any) -> float | None:
    """Seconds from the submit the task may take: the sooner of the header and the field."""
    bounds = [
        bound
        for bound in (parse_deadline_seconds(deadline_seconds), parse_cancel_after(cancel_after))
        if bound is not None
    ]
    return min(bounds) if bounds else None


# --- enforcement ------------------------------------------------------------------------------


class DeadlineExceeded(TaskCancelled):
    """Raised by a ctx call once the run's deadline has passed: a runner that stops on
    TaskCancelled stops on this too, and the run ends failed with `deadline_exceeded`."""


def passed(deadline_at: datetime | None, now: datetime | None = None) -> bool:
    return deadline_at is not None and (now or timezone.now()) >= deadline_at


def check(deadline_at: datetime | None) -> None:
    """In the worker, with the deadline the run started with: no database read."""
    if passed(deadline_at):
        raise DeadlineExceeded(CLIENT_BOUND_RUNNING)


def _pending_error(
    *,
    start_by: datetime | None,
    deadline_at: datetime | None,
    queued_at: datetime | None,
    now: datetime,
) -> str | None:
    """Why a pending run may no longer start (the bound that passed first), or None."""
    late = [
        (bound, error)
        for bound, error in (
            (deadline_at, CLIENT_BOUND_PENDING),
            (start_by, QUEUE_BOUND.format(_seconds_between(queued_at, start_by))),
        )
        if bound is not None and bound <= now
    ]
    return min(late)[1] if late else None


def _seconds_between(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "?"
    return str(round((end - start).total_seconds()))  # max_queue_seconds is whole seconds


def expire_unstarted(*, task_id: uuid.UUID | str, run: int) -> bool:
    """A worker dequeued a run that `start_run` refused: fail it if a bound is why (it may as
    well have been cancelled, taken, superseded or removed). True if it failed it now."""
    row = (
        Task.objects.filter(pk=task_id, run=run, status=S.PENDING)
        .values("start_by", "deadline_at", "queued_at")
        .first()
    )
    if row is None:
        return False
    error = _pending_error(**row, now=timezone.now())
    return error is not None and _finish(task_id=task_id, run=run, status=S.PENDING, error=error)


@dataclass
class SweepReport:
    expired_pending: list[str] = field(default_factory=list)
    expired_running: list[str] = field(default_factory=list)

    @property
    def expired(self) -> int:
        return len(self.expired_pending) + len(self.expired_running)


def sweep(*, batch: int = BATCH) -> SweepReport:
    """Fail the runs past a bound: pending ones past `start_by` (task_start_by_part_idx) and
    unfinished ones past `deadline_at` (task_deadline_part_idx), soonest first, at most `batch`
    of each. A run this fails leaves both indexes' conditions, so the next pass goes on with
    the rest; of a sweep, a worker and a cancel at once, the guarded UPDATE picks one."""
    now = timezone.now()
    report = SweepReport()
    waited = (
        Task.objects.filter(status=S.PENDING, start_by__lt=now)
        .order_by("start_by")
        .values("id", "run", "start_by", "deadline_at", "queued_at")[:batch]
    )
    for row in waited:
        error = _pending_error(start_by=row["start_by"], deadline_at=row["deadline_at"],
                               queued_at=row["queued_at"], now=now)  # fmt: skip
        if error and _finish(task_id=row["id"], run=row["run"], status=S.PENDING, error=error):
            report.expired_pending.append(str(row["id"]))
    bounded = (
        Task.objects.filter(status__in=UNFINISHED, deadline_at__lt=now)
        .order_by("deadline_at")
        .values_list("id", "run", "status")[:batch]
    )
    for task_id, run, status in bounded:
        error = CLIENT_BOUND_RUNNING if status == S.RUNNING else CLIENT_BOUND_PENDING
        if _finish(task_id=task_id, run=run, status=status, error=error):
            target = report.expired_running if status == S.RUNNING else report.expired_pending
            target.append(str(task_id))
    if report.expired:
        logger.warning("deadline sweep: %d pending and %d running tasks failed",
                       len(report.expired_pending), len(report.expired_running))  # fmt: skip
    return report


def _finish(*, task_id: uuid.UUID | str, run: int, status: str, error: str) -> bool:
    """`status` -> failed with the deadline's code, then what every finish does (the event,
    blocking waiters, counts, the callback: executor.on_task_finished); a running run's job is
    told to stop, as a cancel does. A queued job is left (the worker that reaches it finds the
    run failed and skips it), but its key's slot passes on now (tasks.scheduling.dispatch)."""
    from tasks.execution.executor import on_task_finished  # the executor imports this module

    if not state.fail(task_id=task_id, run=run, error=error, expected=(status,), error_code=CODE):
        return False
    logger.info("task failed: %s", error, extra={"task_id": str(task_id), "run": run})
    on_task_finished(task_id, run=run)
    if status == S.RUNNING:
        _stop_job(task_job_id(task_id, run))
    else:
        dispatch.run_dropped(task_id=task_id, run=run)
    return True


def _stop_job(job_id: str) -> None:
    # As tasks.services does for a cancel: a forking worker kills the work horse; a
    # non-forking one has none, and its runner stops at its next ctx call.
    try:
        send_stop_job_command(redis_client(), job_id)
    except (NoSuchJobError, InvalidJobOperation, redis.RedisError):
        logger.info("could not send stop-job for %s", job_id)
