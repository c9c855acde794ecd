"""The two machines of tasks.statuses: every allowed transition succeeds once through the
functions of tasks.state, every other one is refused (IllegalTransition, or False/None where the
module says so), and no module writes either status around them."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest
from django.utils import timezone

from tasks import state, statuses
from tasks.models import Application, Task, TaskRunHistory
from tasks.statuses import FINISHED as FINISHED_STATUSES
from tasks.statuses import UNFINISHED as UNFINISHED_STATUSES
from tasks.statuses import CallbackStatus, TaskStatus

S = TaskStatus
ALL = tuple(S)
PAIRS = list(itertools.product(ALL, ALL))
ALLOWED_PAIRS = [(a, b) for a, b in PAIRS if b in statuses.TASK_TRANSITIONS[a]]
DISALLOWED_PAIRS = [(a, b) for a, b in PAIRS if b not in statuses.TASK_TRANSITIONS[a]]


def test_the_table_covers_every_status_and_only_statuses():
    assert set(statuses.TASK_TRANSITIONS) == set(ALL)
    assert all(targets <= set(ALL) for targets in statuses.TASK_TRANSITIONS.values())


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
    assert statuses.TASK_TRANSITIONS[S.SUCCEEDED] == frozenset()  # nothing ever leaves succeeded
    for status in FINISHED_STATUSES:  # a finished run only leaves by a new run
        assert statuses.TASK_TRANSITIONS[status] <= {S.PENDING}
        assert Task(status=status).is_finished
    for status in UNFINISHED_STATUSES:  # every unfinished run can finish
        assert statuses.TASK_TRANSITIONS[status] & set(FINISHED_STATUSES)
        assert not Task(status=status).is_finished
    assert all(status not in statuses.TASK_TRANSITIONS[status] for status in ALL)  # no self-loops


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


def test_the_named_task_sets_agree_with_the_table():
    assert set(statuses.RETRYABLE) == {s for s in ALL if S.PENDING in statuses.TASK_TRANSITIONS[s]
                                       and s in FINISHED_STATUSES}  # fmt: skip
    assert set(statuses.DELIVERABLE) < set(FINISHED_STATUSES)
    assert S.CANCELLED not in statuses.DELIVERABLE  # a cancelled run sends no result
    for rule in statuses.STUCK_RULES.values():
        assert rule.status in UNFINISHED_STATUSES
        Task._meta.get_field(rule.since)
        Application._meta.get_field(rule.threshold)


# --- the callback machine ---------------------------------------------------------------------

C = CallbackStatus
CALLBACK_ALL = tuple(C)
CALLBACK_PAIRS = list(itertools.product(CALLBACK_ALL, CALLBACK_ALL))


def test_the_callback_table_is_the_documented_one():
    allowed = sorted((a, b) for a, b in CALLBACK_PAIRS if b in statuses.CALLBACK_TRANSITIONS[a])
    assert allowed == sorted([
        (C.NONE, C.PENDING),
        (C.PENDING, C.DELIVERING), (C.PENDING, C.FAILED), (C.PENDING, C.NONE),
        (C.DELIVERING, C.DELIVERING), (C.DELIVERING, C.DELIVERED), (C.DELIVERING, C.FAILED),
        (C.DELIVERING, C.NONE),
        (C.DELIVERED, C.DELIVERING), (C.DELIVERED, C.PENDING), (C.DELIVERED, C.NONE),
        (C.FAILED, C.DELIVERING), (C.FAILED, C.PENDING), (C.FAILED, C.NONE),
    ])  # fmt: skip
    assert set(statuses.CALLBACK_IN_FLIGHT) | set(statuses.CALLBACK_SETTLED) | {C.NONE} == set(
        CALLBACK_ALL
    )
    for status in statuses.CALLBACK_SETTLED:  # settled: only an operator or a new run reopens it
        assert C.DELIVERED not in statuses.CALLBACK_TRANSITIONS[status]
    assert all(C.NONE in statuses.CALLBACK_TRANSITIONS[s] for s in CALLBACK_ALL if s != C.NONE)


def finished_with_callback(application: Application, callback: str, **fields) -> Task:
    return task_in(application, S.SUCCEEDED, callback_url="http://127.0.0.1:9/x",
                   callback_status=callback, finished_at=timezone.now(), **fields)  # fmt: skip


def callback_of(task: Task) -> str:
    return Task.objects.values_list("callback_status", flat=True).get(pk=task.pk)


@pytest.mark.parametrize("source", CALLBACK_ALL)
@pytest.mark.parametrize("automatic", [True, False])
def test_a_claim_moves_to_delivering_exactly_from_the_table(application, source, automatic):
    task = finished_with_callback(application, source)
    claimed = state.claim_delivery(task_id=task.id, run=1, automatic=automatic)
    sources = (
        statuses.CALLBACK_AUTO_CLAIMABLE
        if automatic
        else statuses.callback_transition(to=C.DELIVERING)
    )
    if source in sources:
        assert claimed is not None and claimed.task.callback_attempts == 1
        assert callback_of(task) == C.DELIVERING
    else:
        assert claimed is None and callback_of(task) == source


@pytest.mark.parametrize("source", CALLBACK_ALL)
@pytest.mark.parametrize("to", [C.DELIVERED, C.FAILED])
def test_an_outcome_settles_only_a_callback_being_delivered(application, source, to):
    task = finished_with_callback(application, source)
    from tasks.plumbing import rawsql

    changed = rawsql.execute(state.delivery_outcome(task_id=task.id, run=1, to=to))
    assert (changed == 1) == (source == C.DELIVERING)
    assert callback_of(task) == (to if source == C.DELIVERING else source)


@pytest.mark.parametrize("source", CALLBACK_ALL)
def test_redelivery_reopens_what_the_table_allows(application, source):
    task = finished_with_callback(application, source)
    reopened = state.reopen_delivery(task_id=task.id, run=1)
    assert reopened == (C.PENDING in statuses.CALLBACK_TRANSITIONS[source])
    assert callback_of(task) == (C.PENDING if reopened or source == C.PENDING else source)


def test_a_failed_manual_attempt_settles_only_without_a_due_retry(application):
    plain = finished_with_callback(application, C.DELIVERING)
    retrying = finished_with_callback(application, C.DELIVERING,
                                      callback_next_attempt_at=timezone.now())  # fmt: skip
    assert state.settle_failed_manual_delivery(task_id=plain.id, run=1) is True
    assert state.settle_failed_manual_delivery(task_id=retrying.id, run=1) is False
    assert callback_of(plain) == C.FAILED and callback_of(retrying) == C.DELIVERING


@pytest.mark.parametrize("source", CALLBACK_ALL)
def test_giving_up_stops_only_a_waiting_callback(application, source):
    """pending, or delivering with a retry scheduled (no attempt in flight): -> failed."""
    task = finished_with_callback(application, source, callback_next_attempt_at=timezone.now())
    given_up = state.give_up_delivery(task_id=task.id, run=1, reason="given up by an operator")
    assert given_up == (source in statuses.CALLBACK_IN_FLIGHT)
    assert callback_of(task) == (C.FAILED if given_up else source)
    in_flight = finished_with_callback(application, C.DELIVERING)  # an attempt running now
    assert state.give_up_delivery(task_id=in_flight.id, run=1, reason="x") is False
    assert callback_of(in_flight) == C.DELIVERING


def test_an_illegal_callback_transition_is_refused_before_the_database():
    with pytest.raises(statuses.IllegalTransition, match="none -> delivered"):
        statuses.callback_transition(to=C.DELIVERED, expected=[C.NONE])
    with pytest.raises(statuses.IllegalTransition, match="names no status"):
        statuses.task_transition(to=S.RUNNING, expected=[])


# --- nothing writes around the machines -------------------------------------------------------

SOURCE = Path(__file__).resolve().parents[2]
WRITERS = {"tasks/state.py", "tasks/sql.py"}  # state decides, sql holds its statements
STATUS_FIELDS = {"status", "callback_status"}
RAW_STATUS_WRITE = re.compile(r"\bSET\b[^\"']*\b(callback_)?status\s*=", re.IGNORECASE)


def _status_writes(path: Path) -> list[str]:
    """`.update(status=...)` / `.update(callback_status=...)` calls and SQL text that sets a
    status, in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"update", "bulk_update"}
            and any(keyword.arg in STATUS_FIELDS for keyword in node.keywords)
            and "Batch.objects" not in ast.unparse(node.func.value)  # a batch's own status
        ):
            found.append(f"{path}:{node.lineno} .{node.func.attr}(status...)")
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and RAW_STATUS_WRITE.search(node.value)
        ):
            found.append(f"{path}:{node.lineno} SQL sets a status")
    return found


def test_no_module_writes_a_status_around_the_state_machine():
    offenders = []
    for path in [*SOURCE.glob("tasks/**/*.py"), *SOURCE.glob("dashboard/**/*.py")]:
        relative = str(path.relative_to(SOURCE))
        if relative in WRITERS or "/migrations/" in relative:
            continue
        if path.name == "models.py":
            continue  # declares the fields
        offenders += _status_writes(path)
    # BulkOperation has its own small status (queued/running/done), not a task's.
    offenders = [o for o in offenders if not o.startswith(str(SOURCE / "tasks/upkeep/bulk.py"))]
    assert offenders == []


def test_the_scan_finds_a_write_around_the_machine(tmp_path):
    """The check above can fail: a module that writes a status directly is reported."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        "Task.objects.filter(pk=1).update(callback_status='delivered')\n"
        "SQL = 'UPDATE tasks_task SET status = %s WHERE id = %s'\n"
    )
    assert len(_status_writes(sneaky)) == 2
