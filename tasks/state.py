"""Every change of a task's status or of its callback's status: the only writes of either.

The machines themselves (statuses, transitions, named sets) are declared in `tasks.statuses`;
each function here asks it whether its transition is allowed before it builds the statement, so
a write the table does not allow raises IllegalTransition instead of reaching the database.

Every change is one guarded `UPDATE ... WHERE id = ? AND status IN (expected) [AND run = ?]`, so
of two workers, or a worker and an operator, exactly one wins; the loser sees `False` and must
not act on the transition (no callback, no second result). Plain values go out as one
precompiled statement (`tasks.plumbing.rawsql`), expressions through the ORM: the same UPDATE.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Case, Expression, F, Q, TextField, Value, When
from django.db.models.functions import Concat
from django.utils import timezone

from tasks import sql, triage
from tasks.models import Task, TaskRunHistory
from tasks.plumbing import rawsql
from tasks.sql import ClaimedAttempt, StartedRun
from tasks.statuses import (
    CALLBACK_AUTO_CLAIMABLE,
    DELIVERABLE,
    RETRYABLE,
    IllegalTransition,
    callback_transition,
    task_transition,
)
from tasks.statuses import CallbackStatus as C
from tasks.statuses import TaskStatus as S

__all__ = ["ClaimedAttempt", "IllegalTransition", "StartedRun"]


def _update(where: dict[str, Any], values: dict[str, Any]) -> int:
    """`Task.objects.filter(**where).update(**values)`, where a tuple value means IN."""
    if any(isinstance(value, Expression | F) for value in values.values()):
        lookups = {f"{k}__in" if isinstance(v, tuple) else k: v for k, v in where.items()}
        return Task.objects.filter(**lookups).update(**values)
    # The worker's hot path: the same UPDATE without the ORM's per-call compilation.
    return rawsql.execute(rawsql.update_statement(Task, where=where, values=values))


def _guarded_update(
    task_id: uuid.UUID | str,
    *,
    to: str,
    expected: Iterable[str],
    expected_run: int | None = None,
    **fields: Any,
) -> bool:
    where: dict[str, Any] = {"id": uuid.UUID(str(task_id))}
    where["status"] = task_transition(to=to, expected=expected)
    if expected_run is not None:
        where["run"] = expected_run
    return _update(where, {"status": to, **fields}) == 1


def _callback_due(has_callback: bool | None = None) -> Case | str:
    """A finished task with a callback URL has a delivery pending; without one there is none.
    The caller may already know (the worker does); otherwise the database decides. Whatever the
    callback was, a run that finishes has had its callback reset to none when it started."""
    callback_transition(to=C.PENDING, expected=[C.NONE])
    if has_callback is not None:
        return C.PENDING if has_callback else C.NONE
    return Case(When(callback_url="", then=Value(C.NONE)), default=Value(C.PENDING))


def start(*, task_id: uuid.UUID | str, run: int, worker_name: str = "") -> bool:
    """pending -> running for this run; False if it was not pending (or not this run)."""
    return start_returning(task_id=task_id, run=run, worker_name=worker_name) is not None


def start_returning(
    *, task_id: uuid.UUID | str, run: int, worker_name: str = ""
) -> StartedRun | None:
    """`start`, and what the worker needs to run the task, in one round trip (the worker's hot
    path, `tasks.sql.start_run`); None when the transition lost, or when the run is past its
    start_by or deadline_at (it must not start: tasks.execution.deadlines)."""
    (expected,) = task_transition(to=S.RUNNING, expected=[S.PENDING])
    return sql.start_run(
        task_id=uuid.UUID(str(task_id)), run=run, worker_name=worker_name[:255],
        now=timezone.now(), to=S.RUNNING, expected=expected,
    )  # fmt: skip


def succeed(
    *, task_id: uuid.UUID | str, run: int, output: Any, has_callback: bool | None = None
) -> bool:
    return _guarded_update(
        task_id,
        to=S.SUCCEEDED,
        expected=[S.RUNNING],
        expected_run=run,
        output=output,
        progress=100,
        finished_at=timezone.now(),
        callback_status=_callback_due(has_callback),
    )


def fail(
    *,
    task_id: uuid.UUID | str,
    run: int,
    error: str,
    traceback: str = "",
    expected: Iterable[str] = (S.RUNNING,),
    error_code: str | None = None,
) -> bool:
    """-> failed, with the error's group (tasks.triage) stored by the same UPDATE, and its
    `error_code` (tasks.statuses.ErrorCode; None for any other failure)."""
    group = triage.task_error(error)
    won = _guarded_update(
        task_id,
        to=S.FAILED,
        expected=expected,
        expected_run=run,
        error=error,
        error_code=error_code,
        traceback=traceback,
        error_fingerprint=group.fingerprint,
        finished_at=timezone.now(),
        callback_status=_callback_due(),
    )
    if won:
        triage.record(group)
    return won


def cancel(*, task_id: uuid.UUID | str) -> bool:
    """Pending or running -> cancelled. A running runner notices at its next ctx call."""
    return _guarded_update(
        task_id,
        to=S.CANCELLED,
        expected=[S.PENDING, S.RUNNING],
        cancel_requested=True,
        finished_at=timezone.now(),
    )


def cancel_many(*, task_ids: list[uuid.UUID], expected: str) -> list[Task]:
    """`cancel` for many tasks that were `expected` (pending or running) in one statement (a
    batch's cancel); the rows it moved, with id, run, user, concurrency_key, application and
    batch loaded (a task that moved on meanwhile is left as it is)."""
    statement = rawsql.update_statement(
        Task,
        where={
            "id": tuple(task_ids),
            "status": task_transition(to=S.CANCELLED, expected=[expected]),
        },
        values={"status": S.CANCELLED, "cancel_requested": True, "finished_at": timezone.now()},
    )
    fields, columns = rawsql.columns(
        Task, ("id", "run", "user", "concurrency_key", "application", "batch")
    )
    with rawsql.cursor() as db:
        db.execute(f"{statement.sql} RETURNING {columns}", statement.params)
        return [rawsql.instance(Task, fields, row) for row in db.fetchall()]


def set_progress(*, task_id: uuid.UUID | str, run: int, progress: int) -> bool:
    """Record progress; False when the run is no longer running (cancelled, lost, re-run)."""
    progress = max(0, min(100, int(progress)))
    return _update({"id": uuid.UUID(str(task_id)), "run": run, "status": S.RUNNING},
                   {"progress": progress}) == 1  # fmt: skip


def append_streamed_output(*, task_id: uuid.UUID | str, run: int, text: str) -> bool:
    """Append to the run's streamed output (ctx.emit, in batches); False when the run is no
    longer running (cancelled, lost, re-run)."""
    appended = Concat(F("streamed_output"), Value(text), output_field=TextField())
    return _update({"id": uuid.UUID(str(task_id)), "run": run, "status": S.RUNNING},
                   {"streamed_output": appended}) == 1  # fmt: skip


def start_new_run(
    *,
    task_id: uuid.UUID | str,
    expected: Iterable[str] = RETRYABLE,
    expected_run: int | None = None,
    lost_reason: str = "",
    error: str = "",
    traceback: str = "",
    automatic: bool = False,
    queued_at: datetime | None = None,
    ended_at: datetime | None = None,
) -> int | None:
    """Begin run N+1 of a finished (or lost) task; keep run N's outcome in TaskRunHistory.

    `lost_reason` records why a run that never finished (a lost worker) ended: its history row
    says failed with that error. `error` and `traceback`: the failure a running run ends with
    here instead of in `fail` (an automatic retry); its history row says failed with them.
    `expected_run`: only if run N is this run. `automatic`: an automatic retry starts it
    (counted in `auto_retries`). `queued_at`: when the run joins the queue (later than now for
    a retry that waits its backoff); the application's max_queue_seconds counts from then.
    `ended_at`: when run N ended, if it has no finished_at yet (the moment a retry's wait was
    counted from, so run N+1 is never due sooner than that wait after it).
    Returns the new run number, or None when the task was not in an expected status (or run).
    """
    expected = tuple(expected)
    queued_at = queued_at or timezone.now()
    failure = lost_reason or error
    run_filter = {} if expected_run is None else {"run": expected_run}
    with transaction.atomic():
        task = (
            Task.objects.select_for_update(of=("self",))
            .select_related("application")
            .filter(pk=task_id, status__in=expected, **run_filter)
            .only("id", "run", "status", "output", "error", "error_code", "traceback",
                  "started_at", "finished_at", "application__max_queue_seconds")
            .first()
        )  # fmt: skip
        if task is None:
            return None
        TaskRunHistory.objects.create(
            task_id=task.id,
            run=task.run,
            status=S.FAILED if failure else task.status,
            output=task.output,
            error=failure or task.error,
            error_code=None if failure else task.error_code,
            traceback=traceback if error else task.traceback,
            started_at=task.started_at,
            finished_at=task.finished_at or ended_at or timezone.now(),
            retried_automatically=automatic,
        )
        max_queue = task.application.max_queue_seconds
        won = _guarded_update(
            task.id,
            to=S.PENDING,
            expected=[task.status],
            expected_run=task.run,
            run=F("run") + 1,
            output=None,
            error="",
            error_code=None,
            traceback="",
            error_fingerprint="",
            callback_error_fingerprint="",
            progress=0,
            streamed_output="",
            queued_at=queued_at,
            start_by=queued_at + timedelta(seconds=max_queue) if max_queue else None,
            **({"auto_retries": F("auto_retries") + 1} if automatic else {}),
            started_at=None,
            finished_at=None,
            worker_name="",
            cancel_requested=False,
            callback_status=_callback_reset(),
            callback_attempts=0,
            callback_last_status_code=None,
            callback_next_attempt_at=None,
        )
        if not won:
            transaction.set_rollback(True)
            return None
        return task.run + 1


def _callback_reset() -> str:
    """A new run has no callback yet, whatever the last run's was."""
    callback_transition(to=C.NONE)
    return C.NONE


# --- the callback -------------------------------------------------------------------------------


def claim_delivery(*, task_id: uuid.UUID | str, run: int, automatic: bool) -> ClaimedAttempt | None:
    """-> delivering, reserving the next attempt number, for a finished run with a callback URL:
    one atomic UPDATE ... RETURNING (`tasks.sql.claim_attempt`), so two deliveries of the same
    run never share a number. An automatic attempt runs only while the callback is unsettled
    (and clears its schedule); a manual one runs from any status the table allows. None when
    there is nothing to deliver."""
    expected = callback_transition(
        to=C.DELIVERING, expected=CALLBACK_AUTO_CLAIMABLE if automatic else None
    )
    return sql.claim_attempt(
        task_id=uuid.UUID(str(task_id)), run=run, to=C.DELIVERING, expected=expected,
        task_statuses=DELIVERABLE, clear_next_attempt=automatic,
    )  # fmt: skip


def delivery_outcome(
    *,
    task_id: uuid.UUID | str,
    run: int,
    to: str | None,
    attempt_error: str = "",
    **fields: Any,
) -> rawsql.Statement:
    """The statement that records an attempt's outcome on the task: delivering -> `to`
    (delivered, failed) when given, else only `fields` (a retry is scheduled, or a manual attempt
    failed). Returned, not run: the caller commits it with the attempt's own row.

    Given up (-> failed), the callback's group (tasks.triage: the attempt's HTTP status, else
    `attempt_error`) is set by the same statement and its ErrorGroup upserted now, before the
    commit: the claim just made means the guard wins, and a group without tasks shows 0."""
    where: dict[str, Any] = {"id": uuid.UUID(str(task_id)), "run": run}
    values = dict(fields)
    if to is not None:
        where["callback_status"] = callback_transition(to=to, expected=[C.DELIVERING])
        values["callback_status"] = to
        values["callback_error_fingerprint"] = ""
    if to == C.FAILED:
        group = triage.callback_error(
            status_code=fields.get("callback_last_status_code"), error=attempt_error
        )
        values["callback_error_fingerprint"] = group.fingerprint
        triage.record(group)
    return rawsql.update_statement(Task, where=where, values=values)


def settle_failed_manual_delivery(
    *, task_id: uuid.UUID | str, run: int, status_code: int | None = None, attempt_error: str = ""
) -> bool:
    """A failed manual attempt settles the callback as failed, unless an automatic retry is
    still due (it decides); its group comes from that attempt (`status_code`, `attempt_error`)."""
    expected = callback_transition(to=C.FAILED, expected=[C.DELIVERING])
    group = triage.callback_error(status_code=status_code, error=attempt_error)
    won = (
        Task.objects.filter(
            pk=task_id, run=run, callback_status__in=expected, callback_next_attempt_at__isnull=True
        ).update(callback_status=C.FAILED, callback_error_fingerprint=group.fingerprint)
        == 1
    )
    if won:
        triage.record(group)
    return won


def reopen_delivery(*, task_id: uuid.UUID | str, run: int) -> bool:
    """An operator's redelivery: a settled (or never started) callback is pending again; one
    being delivered is left as it is (its attempt will record the outcome)."""
    expected = callback_transition(to=C.PENDING)
    return (
        _update(
            {"id": uuid.UUID(str(task_id)), "run": run, "callback_status": expected},
            {"callback_status": C.PENDING, "callback_error_fingerprint": ""},
        )
        == 1
    )


def give_up_delivery(
    *, task_id: uuid.UUID | str, run: int, reason: str, stalled_too: bool = False
) -> bool:
    """An operator's discard of a waiting callback: -> failed, its schedule cleared and `reason`
    its error group (tasks.triage). Only a callback with no attempt in flight: pending, or
    delivering with its next retry scheduled (an automatic claim clears the schedule, so an
    attempt running now is left to record its own outcome). A scheduled job that still fires
    finds the callback settled and skips (automatic claims need an unsettled one).
    `stalled_too`: also one delivering with nothing scheduled, whose attempt's worker died (a
    disabled endpoint's refusal: no attempt to it can be running)."""
    pending = callback_transition(to=C.FAILED, expected=[C.PENDING])
    delivering = callback_transition(to=C.FAILED, expected=[C.DELIVERING])
    group = triage.callback_error(status_code=None, error=reason)
    in_flight = Q(callback_status__in=delivering)
    if not stalled_too:
        in_flight &= Q(callback_next_attempt_at__isnull=False)
    won = (
        Task.objects.filter(pk=task_id, run=run)
        .filter(Q(callback_status__in=pending) | in_flight)
        .update(
            callback_status=C.FAILED,
            callback_next_attempt_at=None,
            callback_error_fingerprint=group.fingerprint,
        )
        == 1
    )
    if won:
        triage.record(group)
    return won
