"""The event log and its writers, in process against the real (embedded) Redis and database:
what a run publishes, what ctx.emit keeps, callback_events at submit, stream tokens on the poll,
and retention removing a task's stream."""

from __future__ import annotations

import json
import time
import uuid
from unittest import mock

import pytest

from tasks.delivery import intermediate
from tasks.events import catalog, tokens
from tasks.events import stream as event_stream
from tasks.execution.executor import TaskContext, execute_task
from tasks.execution.runners import TaskCancelled
from tasks.models import Task
from tasks.plumbing.queueing import redis_client
from tasks.services import cancel_task, retry_tasks
from tasks.upkeep import retention
from tests.conftest import clean_redis

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _clean_redis():
    clean_redis()


def entries(task_id) -> list[event_stream.Event]:
    return [event_stream.decode(e) for e in redis_client().xrange(event_stream.stream_key(task_id))]


def streaming_runner(inputs, ctx):
    ctx.progress(10, "warming up")
    for piece in inputs["pieces"]:
        ctx.emit(piece)
    ctx.log("all pieces out", level="debug")
    return {"count": len(inputs["pieces"])}


def submit(client, app, body: dict):
    return client.post(
        f"/api/applications/{app.application.id}/generate",
        data=json.dumps({"inputs": {}, "response_mode": "async", **body}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )


def test_a_run_publishes_its_life_in_order_and_keeps_the_streamed_output(
    make_app, client, django_capture_on_commit_callbacks
):
    app = make_app("tests.test_event_log.streaming_runner")
    with django_capture_on_commit_callbacks(execute=True):  # the enqueue, with task.queued
        body = {"inputs": {"pieces": ["Hel", "lo", " wörld"]}}
        task_id = submit(client, app, body).json()["task_id"]
    assert execute_task(task_id=task_id, run=1, worker_name="w-1") == "succeeded"

    events = entries(task_id)
    assert [e.event for e in events] == [
        catalog.QUEUED, catalog.STARTED, catalog.PROGRESS, *[catalog.OUTPUT_DELTA] * 3,
        catalog.LOG, catalog.FINISHED,
    ]  # fmt: skip
    pairs = [event_stream.parse_id(e.id) for e in events]
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)
    data = [json.loads(e.data) for e in events]
    # Nothing started during the ETA window yet: no estimate.
    queue = {"position": 0, "eta_seconds": None}
    assert data[0] == {"run": 1, "status": "pending", "priority": "normal", "position": 0,
                       "queue": queue}  # fmt: skip
    assert data[1]["worker"] == "w-1" and data[1]["started_at"].endswith("Z")
    assert data[2] == {"run": 1, "progress": 10, "message": "warming up"}
    assert [d["text"] for d in data[3:6]] == ["Hel", "lo", " wörld"]
    assert data[6]["level"] == "debug" and data[6]["message"] == "all pieces out"
    assert all(e.run == 1 for e in events)
    # The final output is the return value; what was emitted is kept beside it.
    task = Task.objects.get(pk=task_id)
    assert task.output == {"count": 3} and task.streamed_output == "Hello wörld"
    assert redis_client().ttl(event_stream.stream_key(task_id)) > 23 * 3600


def test_a_new_run_starts_a_fresh_streamed_output_with_ids_still_increasing(
    make_app, client, django_capture_on_commit_callbacks
):
    app = make_app("tests.test_event_log.streaming_runner")
    task_id = submit(client, app, {"inputs": {"pieces": ["a"]}}).json()["task_id"]
    execute_task(task_id=task_id, run=1)
    Task.objects.filter(pk=task_id).update(status="failed")
    with django_capture_on_commit_callbacks(execute=True):  # run 2's enqueue and task.queued
        assert retry_tasks(task_ids=[task_id])
    assert Task.objects.get(pk=task_id).streamed_output == ""
    execute_task(task_id=task_id, run=2)
    events = entries(task_id)
    run_two = [e.event for e in events if e.run == 2]
    assert run_two[0] == catalog.QUEUED and run_two[-1] == catalog.FINISHED and len(run_two) == 6
    pairs = [event_stream.parse_id(e.id) for e in events]
    assert pairs == sorted(pairs)
    assert Task.objects.get(pk=task_id).streamed_output == "a"


def test_an_emitting_runner_stops_at_the_next_stored_batch_once_cancelled(make_app, client):
    app = make_app("echo")
    task_id = submit(client, app, {}).json()["task_id"]
    Task.objects.filter(pk=task_id).update(status="running")
    ctx = TaskContext(task_id=uuid.UUID(task_id), run=1, config={})
    ctx.emit("kept ")
    ctx.flush_output()
    assert Task.objects.get(pk=task_id).streamed_output == "kept "
    cancel_task(task_id=task_id)
    # The cancel put the finish marker on the stream, so open streams end.
    assert entries(task_id)[-1].event == catalog.FINISHED
    ctx.emit("lost")  # published at once; stored with the next batch, which finds it cancelled
    with pytest.raises(TaskCancelled):
        ctx.flush_output()
    assert Task.objects.get(pk=task_id).streamed_output == "kept "


def test_events_wait_while_redis_is_away_then_go_out_in_order(make_app, client, settings):
    app = make_app("echo")
    task_id = submit(client, app, {}).json()["task_id"]
    Task.objects.filter(pk=task_id).update(status="running")
    ctx = TaskContext(task_id=uuid.UUID(task_id), run=1, config={})
    reachable = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there: Redis is away
    redis_client.cache_clear()
    try:
        ctx.progress(40)  # stored in the database; its event waits, and nothing raises
        ctx.emit("x")
    finally:
        settings.REDIS_URL = reachable
        redis_client.cache_clear()
    assert entries(task_id) == []
    ctx.log("back")  # within the retry interval: waits too
    assert entries(task_id) == []
    ctx.publish_waiting(force=True)  # what the end of a run does (or the next event, later)
    events = entries(task_id)
    assert [e.event for e in events] == [catalog.PROGRESS, catalog.OUTPUT_DELTA, catalog.LOG]
    ctx.flush_output()
    task = Task.objects.get(pk=task_id)
    assert task.progress == 40 and task.streamed_output == "x"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("progress", "must be a list"),
        ([1], "must be a list"),
        (["progress", "tokens"], "Unknown callback event 'tokens'"),
        (["progress"], "needs a callback_url"),
    ],
)
def test_callback_events_are_validated_and_nothing_is_stored(make_app, client, value, message):
    app = make_app("echo")
    response = submit(client, app, {"callback_events": value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == "callback_events"
    assert message in error["message"]
    assert not Task.objects.exists()


def test_callback_events_are_stored_in_canonical_order_and_shown_on_the_poll(make_app, client):
    app = make_app("echo")
    body = {"callback_url": "http://127.0.0.1:9/hook", "callback_events": ["output", "started"]}
    task_id = submit(client, app, body).json()["task_id"]
    assert Task.objects.get(pk=task_id).callback_events == "started,output"
    poll = client.get(f"/api/tasks/{task_id}", HTTP_AUTHORIZATION=f"Bearer {app.api_key}").json()
    assert poll["callback"]["events"] == ["started", "output", "finished"]
    plain = submit(client, app, {"callback_url": "http://127.0.0.1:9/hook"}).json()["task_id"]
    assert Task.objects.get(pk=plain).callback_events == ""
    assert catalog.listed_kinds("") == ["finished"]


def test_the_stream_token_reads_the_poll_of_its_task_only(make_app, client):
    app = make_app("echo")
    accepted = submit(client, app, {}).json()
    other = submit(client, app, {}).json()
    token = accepted["stream_url"].split("token=")[1]
    mine = client.get(f"/api/tasks/{accepted['task_id']}?token={token}")
    assert mine.status_code == 200 and mine.json()["task_id"] == accepted["task_id"]
    refused = client.get(f"/api/tasks/{other['task_id']}?token={token}")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    # The token reads; it does not act: cancel still needs the API key.
    cancel = client.post(f"/api/tasks/{accepted['task_id']}/cancel?token={token}")
    assert cancel.status_code == 401


def test_tokens_are_bound_to_the_task_and_expire(settings):
    task_id = uuid.uuid4()
    token = tokens.issue(task_id)
    assert tokens.is_valid(task_id, token) and tokens.is_valid(str(task_id), token)
    assert not tokens.is_valid(uuid.uuid4(), token)
    assert not tokens.is_valid(task_id, token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert not tokens.is_valid(task_id, "") and not tokens.is_valid(task_id, "x" * 300)
    with mock.patch("time.time", return_value=time.time() + settings.STREAM_TOKEN_SECONDS + 5):
        assert not tokens.is_valid(task_id, token)


def test_a_wsgi_only_server_answers_the_events_path_with_a_clear_error(make_app, client):
    app = make_app("echo")
    task_id = submit(client, app, {}).json()["task_id"]
    response = client.get(
        f"/api/tasks/{task_id}/events", HTTP_AUTHORIZATION=f"Bearer {app.api_key}"
    )
    assert response.status_code == 501 and response.json()["error"]["code"] == "not_implemented"


def test_retention_removes_a_tasks_event_stream_with_it(make_app, client):
    app = make_app("echo", retention_hours=1)
    task_id = submit(client, app, {}).json()["task_id"]
    execute_task(task_id=task_id, run=1)
    assert redis_client().exists(event_stream.stream_key(task_id))
    expired = Task.objects.filter(pk=task_id)
    assert retention.delete_batch(expired, [uuid.UUID(task_id)]) == 1
    assert not redis_client().exists(event_stream.stream_key(task_id))


def test_event_ids_parse_and_compare():
    assert event_stream.parse_id("1733212345678-0") == (1733212345678, 0)
    assert event_stream.parse_id("0") == (0, 0)
    for bad in ("", "12", "12-", "-1", "a-b", "1-2-3", "1" * 21 + "-0"):
        assert event_stream.parse_id(bad) is None
    assert event_stream.parse_id("9-10") > event_stream.parse_id("9-9")
    assert event_stream.format_id((5, 1)) == "5-1"


def test_intermediate_bodies_coalesce_by_kind(make_app):
    app = make_app("echo")
    hooks = intermediate.for_run(
        task_id=uuid.uuid4(), run=2, application=app.application,
        callback_url="http://127.0.0.1:9/", kinds=["progress", "log"],
    )  # fmt: skip
    assert hooks is not None and hooks.kinds == {"progress", "log"}
    progress = [intermediate._Waiting("progress", {"progress": p, "message": None}, f"1-{p}")
                for p in (10, 20, 30)]  # fmt: skip
    body = intermediate.body_of(hooks, progress)
    assert body["event"] == "task.progress" and body["progress"] == 30
    assert body["event_id"] == "1-30" and body["run"] == 2 and body["status"] == "running"
    lines = [intermediate._Waiting("log", {"level": "info", "message": m, "at": None}, None)
             for m in ("a", "b")]  # fmt: skip
    assert [line["message"] for line in intermediate.body_of(hooks, lines)["logs"]] == ["a", "b"]
    deltas = [intermediate._Waiting("output", {"text": t}, None) for t in ("x", "y")]
    assert intermediate.body_of(hooks, deltas)["delta"] == "xy"
    assert intermediate.for_run(task_id=uuid.uuid4(), run=1, application=app.application,
                                callback_url="", kinds=["progress"]) is None  # fmt: skip
