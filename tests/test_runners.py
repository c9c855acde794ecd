"""Runners against real processes: the http runner against a real upstream on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from tasks.execution.executor import execute_task
from tasks.execution.runners import RunnerError, resolve_runner
from tasks.models import Task

pytestmark = pytest.mark.django_db


def custom_runner(inputs, ctx):
    ctx.progress(50)
    ctx.log("custom says hi")
    return {"sum": inputs["a"] + inputs["b"]}


def run_one(app, inputs) -> Task:
    task = Task.objects.create(application=app.application, inputs=inputs)
    execute_task(task_id=str(task.id), run=1, worker_name="inline")
    return Task.objects.get(pk=task.id)


def test_http_runner_returns_upstream_json(make_app, receiver):
    receiver.default = (200, {"Content-Type": "application/json"}, b'{"answer": 42}', 0.0)
    app = make_app("http", runner_config={"url": receiver.url})
    task = run_one(app, {"question": "life"})
    assert task.status == "succeeded" and task.output == {"answer": 42}
    assert json.loads(receiver.received[0].body) == {"question": "life"}


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (500, b"upstream exploded", "upstream answered HTTP 500: upstream exploded"),
        (200, b"<html>not json</html>", "upstream answered invalid JSON"),
    ],
)
def test_http_runner_failures_are_clear(make_app, receiver, status, body, error):
    receiver.default = (status, {}, body, 0.0)
    app = make_app("http", runner_config={"url": receiver.url})
    task = run_one(app, {})
    assert task.status == "failed"
    assert task.error.startswith(error)


def test_http_runner_timeout(make_app, receiver):
    receiver.default = (200, {}, b"{}", 2.0)
    app = make_app("http", runner_config={"url": receiver.url, "timeout": 0.3})
    task = run_one(app, {})
    assert task.status == "failed" and "did not answer within 0.3 s" in task.error


def test_custom_runner_by_dotted_path(make_app):
    app = make_app("tests.test_runners.custom_runner")
    task = run_one(app, {"a": 2, "b": 3})
    assert task.status == "succeeded" and task.output == {"sum": 5}
    assert task.logs.get().message == "custom says hi"


def test_non_json_output_fails_the_task(make_app):
    app = make_app("tests.test_runners.returns_a_set")
    task = run_one(app, {})
    assert task.status == "failed" and "cannot be stored as JSON" in task.error


def returns_a_set(inputs, ctx):
    return {"s": {1, 2}}


def test_unknown_runner_is_refused():
    with pytest.raises(RunnerError):
        resolve_runner("nope")
    with pytest.raises(RunnerError):
        resolve_runner("tasks.missing.runner")


def cancels_itself_then_only_logs(inputs, ctx):
    """A runner that never reports progress: it is cancelled (as an operator would) and then
    logs; the log call must stop it."""
    from tasks import services

    services.cancel_task(task_id=ctx.task_id)
    for n in range(1000):
        ctx.log(f"line {n}")
    return {"finished": "anyway"}  # never reached


def test_a_runner_that_only_logs_stops_when_cancelled(make_app):
    app = make_app("tests.test_runners.cancels_itself_then_only_logs")
    task = run_one(app, {})
    assert task.status == "cancelled" and task.output is None
    assert [log.message for log in task.logs.all()] == ["line 0"]
