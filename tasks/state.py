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
from typing import Any

from django.db import transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from .models import CallbackStatus, Task, TaskRunHistory, TaskStatus

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


def _callback_due() -> Case:
    # A finished task with a callback URL has a delivery pending; without one there is none.
    return Case(
        When(callback_url="", then=Value(CallbackStatus.NONE)),
        default=Value(CallbackStatus.PENDING),
    )


def start(*, task_id: uuid.UUID | str, run: int, worker_name: str = "") -> bool:
    return _guarded_update(
        task_id,
        to=S.RUNNING,
        expected=[S.PENDING],
        expected_run=run,
        started_at=timezone.now(),
        worker_name=worker_name[:255],
        progress=0,
    )


def succeed(*, task_id: uuid.UUID | str, run: int, output: Any) -> bool:
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
