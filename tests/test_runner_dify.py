"""The `dify` runner against a fake Dify service API on 127.0.0.1 (real HTTP, Dify's SSE: one
`data:` JSON per event, `event: ping` keep-alives: tests/upstreams/fake_dify.py), run through the
executor as a worker runs it, and through a real worker for cancelling (the stream is closed
within a second, then Dify's stop endpoint is called for the run)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tasks.applications import InvalidApplication, create_application
from tasks.execution.executor import execute_task
from tasks.execution.runners import RetryableError, RunnerError, TaskCancelled
from tasks.execution.upstreams import dify, sse
from tasks.models import Task, TaskRunHistory
from tests.conftest import Client, api_submit, wait_for, wait_for_status
from tests.upstreams.base import RecordingContext, cancel_later
from tests.upstreams.fake_dify import USAGE, FakeDify, Run

KEY_ENV = "TASKHOOK_TEST_DIFY_KEY"


@pytest.fixture
def fake() -> Iterator[FakeDify]:
    server = FakeDify(api_key="app-fake-key")
    yield server
    server.close()


@pytest.fixture(autouse=True)
def keyed(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "app-fake-key")


def config(fake: FakeDify, app_type: str = "workflow", **extra: Any) -> dict[str, Any]:
    return {"base_url": fake.base_url, "api_key_env": KEY_ENV, "app_type": app_type,
            "timeout": 5, **extra}  # fmt: skip


def run_task(make_app, runner_config: dict[str, Any], inputs: dict[str, Any], *,
             user: str = "", **app: Any) -> Task:  # fmt: skip
    created = make_app("dify", runner_config=runner_config, **app)
    task = Task.objects.create(application=created.application, inputs=inputs, user=user)
    execute_task(task_id=str(task.id), run=1, worker_name="inline")
    return Task.objects.get(pk=task.id)


@pytest.mark.django_db
def test_a_workflow_run_streams_its_nodes_and_text(make_app, fake):
    task = run_task(make_app, config(fake), {"topic": "refunds"}, user="customer_007")
    assert task.status == "succeeded", task.error
    [request] = fake.requests
    run = fake.runs[task.output["task_id"]]
    assert request.path == "/v1/workflows/run"
    assert request.headers["Authorization"] == "Bearer app-fake-key"
    assert request.body == {"inputs": {"topic": "refunds"}, "response_mode": "streaming",
                            "user": "customer_007"}  # fmt: skip
    assert task.output == {
        "outputs": {"answer": "Dify says hi"},
        "status": "succeeded",
        "workflow_run_id": run.workflow_run_id,
        "task_id": run.task_id,
        "elapsed_time": 1.25,
        "total_tokens": 1168,
        "total_steps": 3,
    }
    assert task.streamed_output == "Dify says hi"  # the text_chunk events, pings between
    logs = [line.message for line in task.logs.order_by("id")]
    assert logs == [
        f"POST {fake.base_url}/v1/workflows/run (Dify workflow app, user customer_007)",
        f"Dify workflow run {run.workflow_run_id} started",
        "node 'Start' (start) succeeded in 0.32 s",
        "node 'LLM' (llm) succeeded in 0.32 s",
        "node 'End' (end) succeeded in 0.32 s",
        "usage: total_tokens 1168",
    ]
    assert fake.stops == []  # it finished: nothing to stop


def test_progress_follows_the_nodes(fake):
    ctx = RecordingContext(config(fake))
    dify.run({}, ctx)
    assert ctx.progressed == [
        (0, "node 'Start' (start) started"), (20, "node 'Start' (start) succeeded"),
        (20, "node 'LLM' (llm) started"), (33, "node 'LLM' (llm) succeeded"),
        (33, "node 'End' (end) started"), (42, "node 'End' (end) succeeded"),
    ]  # fmt: skip
    ctx = RecordingContext(
        config(fake, nodes=3)
    )  # the node count known: exact, short of the run's end
    dify.run({}, ctx)
    assert [percent for percent, _ in ctx.progressed] == [0, 33, 33, 66, 66, 99]


@pytest.mark.django_db
def test_a_chat_app_answers_with_its_conversation(make_app, fake):
    inputs = {"query": "如何申请退款?", "conversation_id": "conv-1", "lang": "zh"}
    task = run_task(make_app, config(fake, "chat"), inputs)
    assert task.status == "succeeded", task.error
    [request] = fake.requests
    assert request.path == "/v1/chat-messages"
    assert request.body == {"response_mode": "streaming", "user": "taskhook",
                            "query": "如何申请退款?", "conversation_id": "conv-1",
                            "inputs": {"lang": "zh"}}  # fmt: skip
    [run] = fake.runs.values()
    assert task.output == {"answer": "I can help", "conversation_id": "conv-1",
                           "message_id": run.message_id, "usage": USAGE}  # fmt: skip
    assert task.streamed_output == "I can help"
    assert task.logs.order_by("id").last().message == (
        "usage: prompt_tokens 1033, completion_tokens 135, total_tokens 1168"
    )


def test_a_chatflow_ends_at_message_end_after_its_workflow_events(fake):
    def chatflow(run: Run) -> None:
        run.w.head(content_type="text/event-stream; charset=utf-8")
        run.workflow_started()
        llm = run.node_started("LLM", "llm")
        run.message("Chat")
        run.message("flow")
        run.node_finished(llm)
        run.workflow_finished({"answer": "Chatflow"})
        run.message_end()
        run.w.end()

    fake.chat_script = chatflow
    ctx = RecordingContext(config(fake, "chat", user="ops"))
    output = dify.run({"query": "hi"}, ctx)
    [run] = fake.runs.values()
    assert output["answer"] == "Chatflow" and output["conversation_id"] == run.conversation_id
    assert ctx.emitted == ["Chat", "flow"]
    assert fake.requests[0].body["user"] == "ops"


@pytest.mark.django_db
def test_a_failed_workflow_fails_the_task_with_difys_error(make_app, fake):
    def fails(run: Run) -> None:
        run.w.head()
        run.workflow_started()
        node = run.node_started("HTTP Request", "http-request")
        run.node_finished(node, status="failed", error="Connection refused by api.example.com")
        run.workflow_finished(status="failed", error="Connection refused by api.example.com")
        run.w.end()

    fake.workflow_script = fails
    task = run_task(make_app, config(fake), {}, auto_retry=2)
    assert (task.status, task.run) == ("failed", 1)
    assert task.error == "Dify workflow failed: Connection refused by api.example.com"
    warning = task.logs.get(level="warning")
    assert warning.message == (
        "node 'HTTP Request' (http-request) failed in 0.32 s: Connection refused by api.example.com"
    )
    assert fake.stops == []


@pytest.mark.django_db
def test_an_error_event_mid_stream_fails_the_task(make_app, fake):
    def errs(run: Run) -> None:
        run.w.head()
        run.message("Par")
        run.error(400, "completion_request_error", "Model gpt-x not exist.")
        run.w.end()

    fake.chat_script = errs
    task = run_task(make_app, config(fake, "chat"), {"query": "hi"})
    assert task.status == "failed"
    assert task.error == "Dify failed: Model gpt-x not exist. (completion_request_error)"
    assert task.streamed_output == "Par" and fake.stops == []


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [({"query": "x", "conversation_id": 7}, "conversation_id must be a string"),
     ({"topic": "no query"}, "inputs.query must be the chat message")],
)  # fmt: skip
def test_bad_chat_inputs_fail_before_any_request(fake, inputs, problem):
    with pytest.raises(RunnerError, match=problem):
        dify.run(inputs, RecordingContext(config(fake, "chat")))
    assert fake.requests == []


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("app-wrong", "Dify answered HTTP 401: Access token is invalid"),
        (None, "runner_config.api_key_env names TASKHOOK_TEST_DIFY_KEY, which is not set"),
    ],
)
def test_key_problems_are_clear(fake, monkeypatch, key, error):
    if key is None:
        monkeypatch.delenv(KEY_ENV)
    else:
        monkeypatch.setenv(KEY_ENV, key)
    with pytest.raises(RunnerError) as raised:
        dify.run({}, RecordingContext(config(fake)))
    assert str(raised.value).startswith(error) and not isinstance(raised.value, RetryableError)


def test_a_400_names_difys_message(fake):
    ctx = RecordingContext(config(fake))
    fake.workflow_script = lambda run: run.w.json(
        400, {"code": "invalid_param", "message": "topic is required in input form", "status": 400}
    )
    with pytest.raises(RunnerError) as raised:
        dify.run({}, ctx)
    assert str(raised.value) == "Dify answered HTTP 400: topic is required in input form"
    assert not isinstance(raised.value, RetryableError)


@pytest.mark.parametrize(("status", "retry_after"), [(429, 30.0), (502, None), (503, 5.0)])
def test_overload_and_outages_are_retryable(fake, status, retry_after):
    headers = {"Retry-After": str(int(retry_after))} if retry_after else {}
    fake.workflow_script = lambda run: run.w.json(
        status, {"code": "too_many_requests", "message": "Too many requests", "status": status},
        headers=headers,
    )  # fmt: skip
    with pytest.raises(RetryableError) as raised:
        dify.run({}, RecordingContext(config(fake)))
    assert raised.value.retry_after == retry_after
    assert str(raised.value) == f"Dify answered HTTP {status}: Too many requests"


@pytest.mark.django_db
def test_a_stream_broken_off_is_retried_and_the_dify_run_stopped(make_app, fake):
    def crashes(run: Run) -> None:
        run.w.head()
        run.workflow_started()
        run.node_started("LLM", "llm")
        run.text_chunk("half")
        run.w.cut()

    fake.workflow_script = crashes
    task = run_task(make_app, config(fake), {}, user="u1", auto_retry=1,
                    auto_retry_backoff_seconds=0)  # fmt: skip
    assert (task.status, task.run) == ("pending", 2)
    [history] = TaskRunHistory.objects.filter(task_id=task.id)
    assert history.error.startswith("upstream answer broke off")
    [run] = fake.runs.values()
    [stop] = fake.stops
    assert (stop.kind, stop.task_id, stop.user) == ("workflows/tasks", run.task_id, "u1")


def test_a_stream_ending_without_the_run_finished_is_retryable(fake):
    def ends(run: Run) -> None:
        run.w.head()
        run.workflow_started()
        run.w.end()

    fake.workflow_script = ends
    with pytest.raises(RetryableError, match=r"^Dify.s stream ended before the run finished$"):
        dify.run({}, RecordingContext(config(fake)))


def test_pings_keep_a_slow_run_alive_and_silence_times_it_out(fake):
    def slow(run: Run) -> None:
        run.w.head()
        run.workflow_started()
        for _ in range(5):  # 1.5 s of pings, never 0.5 s without a byte
            run.w.wait(0.3)
            run.ping()
        run.text_chunk("late")
        run.workflow_finished({"text": "late"})
        run.w.end()

    fake.workflow_script = slow
    ctx = RecordingContext(config(fake, timeout=0.5))
    assert dify.run({}, ctx)["outputs"] == {"text": "late"} and ctx.emitted == ["late"]

    def silent(run: Run) -> None:
        run.w.head()
        run.workflow_started()
        run.until_stopped()

    fake.workflow_script = silent
    with pytest.raises(RetryableError, match=r"^upstream sent nothing for 0\.5 s mid-answer$"):
        dify.run({}, RecordingContext(config(fake, timeout=0.5)))
    assert fake.wait_for(lambda: fake.stops, timeout=5)  # given up on: stopped there too


def test_a_cancel_in_process_closes_then_stops(fake):
    def silent(run: Run) -> None:
        run.w.head()
        run.workflow_started()
        run.until_stopped()

    fake.workflow_script = silent
    ctx = RecordingContext(config(fake, timeout=60))
    cancelled_at = cancel_later(ctx, 0.5)
    with pytest.raises(TaskCancelled):
        dify.run({}, ctx)
    assert fake.wait_for(lambda: fake.disconnects and fake.stops, timeout=5)
    assert fake.disconnects[0] - cancelled_at[0] < 1.0
    # The stream first, then the stop: the stream's EOF had reached the server when the stop
    # came (the two times above are taken by two server threads, in either order).
    assert fake.stops[0].stream_gone is True


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("app_type", ["workflow", "chat"])
def test_cancelling_the_task_closes_the_stream_and_stops_the_dify_run(live_worker, make_app,
                                                                      app_type):  # fmt: skip
    fake = FakeDify(api_key=None)  # the shared worker has no key variable: this one needs none
    started = threading.Event()

    def runs_silently(run: Run) -> None:
        run.w.head(content_type="text/event-stream; charset=utf-8")
        run.workflow_started()
        run.node_started("LLM", "llm")
        started.set()
        run.until_stopped()  # nothing more, not even a ping, until stopped or let go of

    fake.workflow_script = fake.chat_script = runs_silently
    try:
        app = make_app("dify", runner_config={"base_url": fake.base_url, "app_type": app_type,
                                              "timeout": 60})  # fmt: skip
        inputs = {"query": "long question"} if app_type == "chat" else {"topic": "long"}
        task_id = api_submit(app, {"inputs": inputs, "response_mode": "async",
                                   "user": "customer_007"})  # fmt: skip
        assert started.wait(20), live_worker.output()[-3000:]
        wait_for(lambda: Task.objects.get(pk=task_id).logs.filter(
            message__contains="workflow run").exists(), timeout=5)  # fmt: skip
        cancelled_at = time.monotonic()
        response = Client().post(f"/api/tasks/{task_id}/cancel",
                                 HTTP_AUTHORIZATION=f"Bearer {app.api_key}")  # fmt: skip
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert fake.wait_for(lambda: fake.disconnects, timeout=5), "the stream was left open"
        assert fake.disconnects[0] - cancelled_at < 1.0
        assert fake.wait_for(lambda: fake.stops, timeout=10), "Dify's stop was never called"
        [run] = fake.runs.values()
        [stop] = fake.stops
        kind = "workflows/tasks" if app_type == "workflow" else "chat-messages"
        assert (stop.kind, stop.task_id, stop.user) == (kind, run.task_id, "customer_007")
        assert run.stopped.is_set()  # the fake's own check: the run's user asked
        wait_for(lambda: "task stopped: cancelled" in live_worker.output(), timeout=5)
        assert wait_for_status(task_id, ("cancelled",)).output is None
    finally:
        fake.close()


def test_sse_events_keep_their_names_and_skip_data_less_pings():
    lines = [b"event: ping", b"", b'data: {"event": "message"}', b"", b"event: error",
             b"data: one", b"data: two", b"", b": comment", b"data: cut off"]  # fmt: skip
    assert list(sse.events(lines)) == [
        sse.Event("message", '{"event": "message"}', 3),
        sse.Event("error", "one\ntwo", 6),
    ]


def test_the_stop_endpoints_and_a_v1_base_url():
    for app_type, path in (("workflow", "workflows/tasks"), ("chat", "chat-messages")):
        cfg = dify.Config.of({"base_url": "https://api.dify.ai/v1/", "app_type": app_type})
        assert cfg.stop_url("t-1") == f"https://api.dify.ai/v1/{path}/t-1/stop"
    assert dify.Config.of({"base_url": "http://d", "app_type": "chat"}).run_url == (
        "http://d/v1/chat-messages"
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("runner_config", "error"),
    [
        ({"app_type": "workflow"}, "the dify runner needs runner_config.base_url"),
        ({"base_url": "http://d"}, "needs runner_config.app_type: one of workflow, chat"),
        ({"base_url": "http://d", "app_type": "agent"}, "one of workflow, chat, not 'agent'"),
        ({"base_url": "http://d", "app_type": "chat", "nodes": 0}, "nodes must be a whole"),
        ({"base_url": "http://d", "app_type": "chat", "user": ""}, "user must be a non-empty"),
    ],
)
def test_the_config_is_checked_when_the_application_is_saved(runner_config, error):
    with pytest.raises(InvalidApplication) as invalid:
        create_application(name="dify", runner="dify", runner_config=runner_config)
    assert invalid.value.field == "runner_config" and error in invalid.value.message


@pytest.mark.django_db
def test_createapplication_reports_a_bad_dify_config():
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="app_type"):
        call_command("createapplication", "dify-app", "--runner", "dify",
                     "--runner-config", '{"base_url": "http://127.0.0.1:5001"}')  # fmt: skip
