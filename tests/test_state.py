"""The state machine: legal transitions only, and exactly one winner under real concurrency."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from tasks import state
from tasks.models import Task, TaskRunHistory

pytestmark = pytest.mark.django_db(transaction=True)


def make_task(app, **fields) -> Task:
    return Task.objects.create(application=app.application, inputs={}, **fields)


def race_each(actions: list) -> list:
    """Run each action in its own thread (own DB connection), released together."""
    barrier = threading.Barrier(len(actions))
    results: list = []
    lock = threading.Lock()

    def body(action):
        barrier.wait()
        try:
            outcome = action()
        finally:
            connection.close()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=body, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def race(count: int, action) -> list:
    return race_each([action] * count)


def test_concurrent_starts_have_one_winner(make_app):
    task = make_task(make_app())
    results = race(8, lambda: state.start(task_id=task.id, run=1, worker_name="w"))
    assert results.count(True) == 1
    assert Task.objects.get(pk=task.id).status == "running"


def test_finish_and_cancel_race_has_one_winner(make_app):
    app = make_app()
    for _ in range(5):
        task = make_task(app)
        assert state.start(task_id=task.id, run=1)
        actions = [
            lambda t=task: ("succeed", state.succeed(task_id=t.id, run=1, output={"ok": 1})),
            lambda t=task: ("cancel", state.cancel(task_id=t.id)),
            lambda t=task: ("fail", state.fail(task_id=t.id, run=1, error="boom")),
        ]
        outcomes = race_each(actions)
        winners = [name for name, won in outcomes if won]
        assert len(winners) == 1
        final = Task.objects.get(pk=task.id).status
        assert (
            final == {"succeed": "succeeded", "cancel": "cancelled", "fail": "failed"}[winners[0]]
        )


def test_illegal_transitions_are_refused(make_app):
    task = make_task(make_app())
    assert not state.succeed(task_id=task.id, run=1, output={})  # pending -> succeeded: no
    assert state.start(task_id=task.id, run=1)
    assert not state.start(task_id=task.id, run=1)  # running -> running: no
    assert state.succeed(task_id=task.id, run=1, output={"a": 1})
    assert not state.cancel(task_id=task.id)  # finished stays finished
    assert not state.fail(task_id=task.id, run=1, error="late")
    assert state.start_new_run(task_id=task.id) is None  # succeeded is not retried
    with pytest.raises(state.IllegalTransition):
        state._guarded_update(task.id, to="succeeded", expected=["pending"])


def test_stale_run_cannot_write(make_app):
    task = make_task(make_app())
    assert state.start(task_id=task.id, run=1)
    assert state.fail(task_id=task.id, run=1, error="first", traceback="tb1")
    assert state.start_new_run(task_id=task.id) == 2
    # A late worker of run 1 can neither start nor finish run 2.
    assert not state.start(task_id=task.id, run=1)
    assert not state.set_progress(task_id=task.id, run=1, progress=50)
    fresh = Task.objects.get(pk=task.id)
    assert (fresh.status, fresh.run, fresh.error) == ("pending", 2, "")
    history = TaskRunHistory.objects.get(task_id=task.id)
    assert (history.run, history.status, history.error, history.traceback) == (
        1,
        "failed",
        "first",
        "tb1",
    )


def test_concurrent_retries_make_one_new_run(make_app):
    task = make_task(make_app(), status="failed")
    results = race(6, lambda: state.start_new_run(task_id=task.id) is not None)
    assert results.count(True) == 1
    assert Task.objects.get(pk=task.id).run == 2
    assert TaskRunHistory.objects.filter(task_id=task.id).count() == 1


def test_finished_task_with_callback_url_gets_pending_callback(make_app):
    app = make_app()
    with_url = make_task(app, callback_url="http://127.0.0.1:9/hook")
    without = make_task(app)
    for task in (with_url, without):
        state.start(task_id=task.id, run=1)
        state.succeed(task_id=task.id, run=1, output={})
    assert Task.objects.get(pk=with_url.id).callback_status == "pending"
    assert Task.objects.get(pk=without.id).callback_status == "none"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements: PostgreSQL")
@pytest.mark.parametrize("prepared", [True, False])
def test_worker_statements_are_prepared_once_per_connection(make_app, settings, prepared):
    settings.DATABASE_PREPARED_STATEMENTS = prepared
    app = make_app()
    for _ in range(3):
        task = make_task(app)
        assert state.start_returning(task_id=task.id, run=1, worker_name="w") is not None
        assert state.succeed(task_id=task.id, run=1, output={"n": 1}, has_callback=False)
    assert Task.objects.filter(status="succeeded").count() == 3
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        statements = [row[0] for row in cursor.fetchall()]
    starts = [sql for sql in statements if sql.startswith("UPDATE") and 'RETURNING "inputs"' in sql]
    finishes = [sql for sql in statements if 'SET "status" = $1, "output"' in sql]
    assert (len(starts), len(finishes)) == ((1, 1) if prepared else (0, 0))
