"""tasks.state.ALLOWED: every allowed transition succeeds once through the guarded functions,
every other one is refused (IllegalTransition, or False/None where the module says so)."""

from __future__ import annotations

import itertools

import pytest

from tasks import state
from tasks.models import (
    FINISHED_STATUSES,
    UNFINISHED_STATUSES,
    Application,
    Task,
    TaskRunHistory,
    TaskStatus,
)

S = TaskStatus
ALL = tuple(S)
PAIRS = list(itertools.product(ALL, ALL))
ALLOWED_PAIRS = [(a, b) for a, b in PAIRS if b in state.ALLOWED[a]]
DISALLOWED_PAIRS = [(a, b) for a, b in PAIRS if b not in state.ALLOWED[a]]


def test_the_table_covers_every_status_and_only_statuses():
    assert set(state.ALLOWED) == set(ALL)
    assert all(targets <= set(ALL) for targets in state.ALLOWED.values())


def test_the_table_is_the_documented_one():
    assert sorted(ALLOWED_PAIRS) == sorted([
        (S.PENDING, S.RUNNING), (S.PENDING, S.CANCELLED), (S.PENDING, S.FAILED),
        (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.CANCELLED),
        (S.RUNNING, S.PENDING),
        (S.FAILED, S.PENDING), (S.CANCELLED, S.PENDING),
    ])  # fmt: skip


def test_finished_and_unfinished_sets_agree_with_the_table():
    assert set(FINISHED_STATUSES) | set(UNFINISHED_STATUSES) == set(ALL)
    assert not set(FINISHED_STATUSES) & set(UNFINISHED_STATUSES)
    assert state.ALLOWED[S.SUCCEEDED] == frozenset()  # nothing ever leaves succeeded
    for status in FINISHED_STATUSES:  # a finished run only leaves by a new run
        assert state.ALLOWED[status] <= {S.PENDING}
        assert Task(status=status).is_finished
    for status in UNFINISHED_STATUSES:  # every unfinished run can finish
        assert state.ALLOWED[status] & set(FINISHED_STATUSES)
        assert not Task(status=status).is_finished
    assert all(status not in state.ALLOWED[status] for status in ALL)  # no self-loops


@pytest.fixture
def application(db) -> Application:
    return Application.objects.create(name="states", runner="echo", webhook_secret="whsec_x")


def task_in(application: Application, status: str, **fields) -> Task:
    return Task.objects.create(application=application, inputs={}, status=status, **fields)


def transition(task: Task, to: str):
    """The module's own function for `task.status -> to`."""
    now = task.status
    if to == S.RUNNING:
        return state.start(task_id=task.id, run=task.run, worker_name="w")
    if to == S.SUCCEEDED:
        return state.succeed(task_id=task.id, run=task.run, output={"ok": True})
    if to == S.FAILED:
        return state.fail(task_id=task.id, run=task.run, error="boom", expected=[now])
    if to == S.CANCELLED:
        return state.cancel(task_id=task.id)
    if to == S.PENDING:
        lost = "worker lost" if now == S.RUNNING else ""
        return state.start_new_run(task_id=task.id, expected=[now], lost_reason=lost)
    raise AssertionError(f"no function for {now} -> {to}")


WON = {S.PENDING: 2}  # start_new_run answers the new run number


@pytest.mark.parametrize(("source", "to"), ALLOWED_PAIRS)
def test_every_allowed_transition_succeeds_once(application, source, to):
    task = task_in(application, source)
    assert transition(task, to) == WON.get(to, True)
    row = Task.objects.get(pk=task.pk)
    assert row.status == to
    if to == S.PENDING:
        assert row.run == 2
        history = TaskRunHistory.objects.get(task=task)
        assert history.run == 1
        assert history.status == (S.FAILED if source == S.RUNNING else source)
    elif to in FINISHED_STATUSES:
        assert row.finished_at is not None
    # The same transition again loses: the row is no longer in `source` (or not this run).
    again = transition(task, to)
    assert again in (False, None)
    assert Task.objects.get(pk=task.pk).status == to


@pytest.mark.parametrize(("source", "to"), DISALLOWED_PAIRS)
def test_every_disallowed_transition_is_illegal_in_the_guard(application, source, to):
    task = task_in(application, source)
    with pytest.raises(state.IllegalTransition, match=f"{source} -> {to}"):
        state._guarded_update(task.id, to=to, expected=[source])
    assert Task.objects.get(pk=task.pk).status == source


@pytest.mark.parametrize(("source", "to"), DISALLOWED_PAIRS)
def test_every_disallowed_transition_fails_through_the_functions(application, source, to):
    """fail/start_new_run take the expected statuses (IllegalTransition for a bad one);
    start/succeed/cancel name theirs and answer False for a task in any other status."""
    task = task_in(application, source)
    if to in (S.FAILED, S.PENDING):
        with pytest.raises(state.IllegalTransition):
            transition(task, to)
    elif to in (S.RUNNING, S.SUCCEEDED, S.CANCELLED):
        assert transition(task, to) is False
    assert Task.objects.get(pk=task.pk).status == source
    assert not TaskRunHistory.objects.filter(task=task).exists()  # rolled back


def test_a_guard_on_several_expected_statuses_refuses_if_any_is_illegal(application):
    task = task_in(application, S.PENDING)
    with pytest.raises(state.IllegalTransition, match="succeeded -> failed"):
        state.fail(task_id=task.id, run=1, error="x", expected=[S.PENDING, S.SUCCEEDED])
    assert Task.objects.get(pk=task.pk).status == S.PENDING


def test_the_run_guard(application):
    task = task_in(application, S.RUNNING, run=3)
    assert state.succeed(task_id=task.id, run=2, output=1) is False
    assert state.succeed(task_id=task.id, run=2, output=1, has_callback=False) is False
    assert state.fail(task_id=task.id, run=4, error="x") is False
    assert state.set_progress(task_id=task.id, run=2, progress=50) is False
    assert state.set_progress(task_id=task.id, run=3, progress=150) is True
    row = Task.objects.get(pk=task.pk)
    assert row.status == S.RUNNING and row.progress == 100  # clamped
    assert state.start(task_id=task_in(application, S.PENDING, run=2).id, run=1) is False
