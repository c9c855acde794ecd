"""The two state machines, declared once: a task's run and its callback.

Each machine is its statuses, a table of allowed transitions and the named sets the rest of the
code asks about (finished, deliverable, in flight, ...). Nothing else spells a status set out.
Every write of either status goes through `tasks.state`, which checks the transition here before
it builds its guarded UPDATE, hand-written SQL included; adding a state or a transition is one
edit to a table below (and `tests/unit/test_state_table.py` says what else must hold).

Task (one run; a new run starts again at pending, run + 1):

    pending -> running -> succeeded | failed
    pending | running -> cancelled        pending -> failed (an operator's Mark failed, when stuck)
    failed | cancelled -> pending          a new run (operator retry)
    running -> pending                     a new run after a lost worker, when the app allows it

Callback (of the current run; reset to none when a new run starts):

    none -> pending                        the run succeeded or failed, with a callback URL
    pending -> delivering                  an attempt claimed it (automatic or manual)
    delivering -> delivering               the next attempt (a retry is scheduled, or manual)
    delivering -> delivered | failed       an attempt succeeded | the retry policy gave up
    pending -> failed                      an operator gave up on a waiting callback (Work page)
    delivered | failed -> delivering       a manual attempt (redeliver) claimed it
    delivered | failed -> pending          an operator asked for redelivery
    any -> none                            a new run of the task
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from django.db import models


class TaskStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Priority(models.TextChoices):
    """The lanes a task waits in (tasks.scheduling), highest first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class ErrorCode(models.TextChoices):
    """`error_code` of a failed run, for machines; null for any other failure."""

    DEADLINE_EXCEEDED = "deadline_exceeded"


class CallbackStatus(models.TextChoices):
    NONE = "none"
    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"


T, C = TaskStatus, CallbackStatus

TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    T.PENDING: frozenset({T.RUNNING, T.CANCELLED, T.FAILED}),
    T.RUNNING: frozenset({T.SUCCEEDED, T.FAILED, T.CANCELLED, T.PENDING}),
    T.FAILED: frozenset({T.PENDING}),
    T.CANCELLED: frozenset({T.PENDING}),
    T.SUCCEEDED: frozenset(),
}

# Named task sets, tuples so that they go straight into `status__in` and SQL parameters.
FINISHED = (T.SUCCEEDED, T.FAILED, T.CANCELLED)
UNFINISHED = (T.PENDING, T.RUNNING)
RETRYABLE = (T.FAILED, T.CANCELLED)  # an operator may start a new run
DELIVERABLE = (T.SUCCEEDED, T.FAILED)  # finished runs that send their result (cancelled: none)

CALLBACK_TRANSITIONS: dict[str, frozenset[str]] = {
    C.NONE: frozenset({C.PENDING}),
    C.PENDING: frozenset({C.DELIVERING, C.FAILED, C.NONE}),
    C.DELIVERING: frozenset({C.DELIVERING, C.DELIVERED, C.FAILED, C.NONE}),
    C.DELIVERED: frozenset({C.DELIVERING, C.PENDING, C.NONE}),
    C.FAILED: frozenset({C.DELIVERING, C.PENDING, C.NONE}),
}

# Named callback sets.
CALLBACK_IN_FLIGHT = (C.PENDING, C.DELIVERING)  # delivery not over: retention keeps the task
CALLBACK_SETTLED = (C.DELIVERED, C.FAILED)
CALLBACK_AUTO_CLAIMABLE = (C.PENDING, C.DELIVERING)  # an automatic attempt runs only from these


class StuckRule(NamedTuple):
    """Tasks in `status` since before (`since`, a Task field) the application's `threshold` (an
    Application field, seconds) ago are stuck: an alert, and operator actions on them."""

    status: str
    since: str
    threshold: str


# Alert name -> rule; one rule per status (tasks.sql counts them by status).
STUCK_RULES = {
    "stuck_pending": StuckRule(T.PENDING, "created_at", "queue_threshold_seconds"),
    "stuck_running": StuckRule(T.RUNNING, "started_at", "run_threshold_seconds"),
}


class IllegalTransition(ValueError):
    pass


def _check(
    table: dict[str, frozenset[str]], machine: str, *, to: str, expected: Iterable[str]
) -> tuple[str, ...]:
    expected = tuple(expected)
    if not expected:
        raise IllegalTransition(f"a {machine} transition to {to} names no status it leaves")
    for status in expected:
        if to not in table[status]:
            raise IllegalTransition(f"{status} -> {to} is not a {machine} transition")
    return expected


def task_transition(*, to: str, expected: Iterable[str]) -> tuple[str, ...]:
    """The statuses a task may leave for `to`, checked against TASK_TRANSITIONS; raises
    IllegalTransition for any that may not. What a guarded UPDATE puts in its WHERE."""
    return _check(TASK_TRANSITIONS, "task", to=to, expected=expected)


def callback_transition(*, to: str, expected: Iterable[str] | None = None) -> tuple[str, ...]:
    """The same for a callback; without `expected`, every status that may move to `to`."""
    if expected is None:
        expected = [status for status, allowed in CALLBACK_TRANSITIONS.items() if to in allowed]
    return _check(CALLBACK_TRANSITIONS, "callback", to=to, expected=expected)


def is_finished(status: str) -> bool:
    return status in FINISHED
