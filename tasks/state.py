"""The task state machine: the one place where a task's status changes.

    pending -> running -> succeeded | failed
    pending | running -> cancelled        pending -> failed (never started: worker lost, bad runner)
    failed | cancelled -> pending          a new run (operator retry), run + 1
    running -> pending                     a new run after a lost worker, when the app allows it

Every change is one guarded `UPDATE ... WHERE id = ? AND status IN (expected) [AND run = ?]`, so
of two workers, or a worker and an operator, exactly one wins; the loser sees `False` and must
not act on the transition (no callback, no second result).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any, NamedTuple

from django.db import connection, transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from tasks.models import CallbackStatus, Task, TaskRunHistory, TaskStatus
from tasks.plumbing import rawsql

S = TaskStatus
ALLOWED: dict[str, frozenset[str]] = {
    S.PENDING: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PENDING}),
    S.FAILED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING}),
    S.SUCCEEDED: frozenset(),
}


class IllegalTransition(ValueError):
    pass


def _guarded_update(
    task_id: uuid.UUID | str,
    *,
    to: str,
    expected: Iterable[str],
    expected_run: int | None = None,
    **fields: Any,
) -> bool:
    expected = tuple(expected)
    for status in expected:
        if to not in ALLOWED[status]:
            raise IllegalTransition(f"{status} -> {to} is not a task transition")
    rows = Task.objects.filter(pk=task_id, status__in=expected)
    if expected_run is not None:
        rows = rows.filter(run=expected_run)
    return rows.update(status=to, **fields) == 1


def _callback_due(has_callback: bool | None = None) -> Case | str:
    """A finished task with a callback URL has a delivery pending; without one there is none.
    The caller may already know (the worker does); otherwise the database decides."""
    if has_callback is not None:
        return CallbackStatus.PENDING if has_callback else CallbackStatus.NONE
    return Case(
        When(callback_url="", then=Value(CallbackStatus.NONE)),
        default=Value(CallbackStatus.PENDING),
    )


def start(*, task_id: uuid.UUID | str, run: int, worker_name: str = "") -> bool:
    """pending -> running for this run; False if it was not pending (or not this run)."""
    return start_returning(task_id=task_id, run=run, worker_name=worker_name) is not None


START_RETURNING = (
    "UPDATE {table} SET status = %s, started_at = %s, worker_name = %s, progress = 0 "
    "WHERE id = %s AND status = %s AND run = %s "
    "RETURNING inputs, callback_url, application_id, response_mode"
)


class StartedRun(NamedTuple):
    inputs: Any
    callback_url: str
    application_id: uuid.UUID
    response_mode: str


def start_returning(
    *, task_id: uuid.UUID | str, run: int, worker_name: str = ""
) -> StartedRun | None:
    """`start`, and what the worker needs to run the task, in one round trip (the worker's hot
    path); None when the transition lost.

    UPDATE ... RETURNING is PostgreSQL and SQLite >= 3.35; the ORM has no spelling for it.
    """
    table = rawsql.quote(Task._meta.db_table)
    pk = Task._meta.pk.get_db_prep_value(uuid.UUID(str(task_id)), connection)
    row = rawsql.fetchone(rawsql.Statement(
        START_RETURNING.format(table=table),
        [S.RUNNING, timezone.now(), worker_name[:255], pk, S.PENDING, run],
    ))  # fmt: skip
    if row is None:
        return None
    fields = (Task._meta.get_field(name)
              for name in ("inputs", "callback_url", "application", "response_mode"))  # fmt: skip
    return StartedRun(
        *(rawsql.from_db(field, value) for field, value in zip(fields, row, strict=True))
    )


def succeed(
    *, task_id: uuid.UUID | str, run: int, output: Any, has_callback: bool | None = None
) -> bool:
    if has_callback is None:
        return _guarded_update(
            task_id,
            to=S.SUCCEEDED,
            expected=[S.RUNNING],
            expected_run=run,
            output=output,
            progress=100,
            finished_at=timezone.now(),
            callback_status=_callback_due(),
        )
    # The worker's hot path: the same guarded update without the ORM's per-call query
    # compilation (about a third of a millisecond per task).
    return rawsql.execute(rawsql.update_statement(
        Task,
        where={"id": uuid.UUID(str(task_id)), "status": S.RUNNING, "run": run},
        values={"status": S.SUCCEEDED, "output": output, "progress": 100,
                "finished_at": timezone.now(), "callback_status": _callback_due(has_callback)},
    )) == 1  # fmt: skip


def fail(
    *,
    task_id: uuid.UUID | str,
    run: int,
    error: str,
    traceback: str = "",
    expected: Iterable[str] = (S.RUNNING,),
) -> bool:
    return _guarded_update(
        task_id,
        to=S.FAILED,
        expected=expected,
        expected_run=run,
        error=error,
        traceback=traceback,
        finished_at=timezone.now(),
        callback_status=_callback_due(),
    )


def cancel(*, task_id: uuid.UUID | str) -> bool:
    """Pending or running -> cancelled. A running runner notices at its next ctx call."""
    return _guarded_update(
        task_id,
        to=S.CANCELLED,
        expected=[S.PENDING, S.RUNNING],
        cancel_requested=True,
        finished_at=timezone.now(),
    )


def set_progress(*, task_id: uuid.UUID | str, run: int, progress: int) -> bool:
    """Record progress; False when the run is no longer running (cancelled, lost, re-run)."""
    progress = max(0, min(100, int(progress)))
    return Task.objects.filter(pk=task_id, run=run, status=S.RUNNING).update(progress=progress) == 1


def start_new_run(
    *,
    task_id: uuid.UUID | str,
    expected: Iterable[str] = (S.FAILED, S.CANCELLED),
    lost_reason: str = "",
) -> int | None:
    """Begin run N+1 of a finished (or lost) task; keep run N's outcome in TaskRunHistory.

    `lost_reason` records why a run that never finished (a lost worker) ended: its history row
    says failed with that error. Returns the new run number, or None when the task was not in
    an expected status.
    """
    expected = tuple(expected)
    with transaction.atomic():
        task = (
            Task.objects.select_for_update()
            .filter(pk=task_id, status__in=expected)
            .only("id", "run", "status", "output", "error", "traceback", "started_at",
                  "finished_at")
            .first()
        )  # fmt: skip
        if task is None:
            return None
        TaskRunHistory.objects.create(
            task_id=task.id,
            run=task.run,
            status=S.FAILED if lost_reason else task.status,
            output=task.output,
            error=lost_reason or task.error,
            traceback=task.traceback,
            started_at=task.started_at,
            finished_at=task.finished_at or timezone.now(),
        )
        won = _guarded_update(
            task.id,
            to=S.PENDING,
            expected=[task.status],
            expected_run=task.run,
            run=F("run") + 1,
            output=None,
            error="",
            traceback="",
            progress=0,
            started_at=None,
            finished_at=None,
            worker_name="",
            cancel_requested=False,
            callback_status=CallbackStatus.NONE,
            callback_attempts=0,
            callback_last_status_code=None,
            callback_next_attempt_at=None,
        )
        if not won:
            transaction.set_rollback(True)
            return None
        return task.run + 1
