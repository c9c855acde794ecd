"""The `openai` runner against a fake OpenAI-compatible server on 127.0.0.1 (real HTTP, chunked
SSE as vLLM and OpenAI write it: tests/upstreams/fake_openai.py), run through the executor as a
worker runs it, and through a real worker for cancelling."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tasks.applications import InvalidApplication, create_application, update_application
from tasks.events import catalog
from tasks.events import stream as event_stream
from tasks.execution.executor import execute_task
from tasks.execution.runners import RetryableError, TaskCancelled
from tasks.execution.upstreams import openai
from tasks.models import Task, TaskRunHistory
from tasks.plumbing.queueing import redis_client
from tests.conftest import Client, api_submit, wait_for, wait_for_status
from tests.upstreams.base import RecordingContext, Request, Writer, cancel_later
from tests.upstreams.fake_openai import FakeOpenAI, chunk, error_body, reply, usage_chunk

KEY_ENV = "TASKHOOK_TEST_OPENAI_KEY"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(api_key="sk-fake")
    yield server
    server.close()


@pytest.fixture
def keyed(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-fake")


def config(fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {"base_url": fake.base_url, "model": "served-model", "api_key_env": KEY_ENV,
            "timeout": 5, **extra}  # fmt: skip


def run_task(make_app, runner_config: dict[str, Any], inputs: dict[str, Any], **app) -> Task:
    created = make_app("openai", runner_config=runner_config, **app)
    task = Task.objects.create(application=created.application, inputs=inputs)
    execute_task(task_id=str(task.id), run=1, worker_name="inline")
    return Task.objects.get(pk=task.id)


def entries(task_id: str) -> list[event_stream.Event]:
    key = event_stream.stream_key(task_id)
    return [event_stream.decode(e) for e in redis_client().xrange(key)]


def test_a_streamed_completion_through_the_executor(make_app, fake, keyed):
    task = run_task(
        make_app,
        config(fake, defaults={"temperature": 0.2, "max_tokens": 64}),
        {"messages": [{"role": "user", "content": "Say hello"}], "temperature": 0.7,
         "model": "client-choice"},
    )  # fmt: skip
    assert task.status == "succeeded", task.error
    assert task.output == {
        "message": {"role": "assistant", "content": "Hello, world"},
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        "model": "served-model",
        "id": "chatcmpl-fake1",
    }
    assert task.streamed_output == "Hello, world"
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-fake"
    assert request.body == {
        "messages": [{"role": "user", "content": "Say hello"}],
        "temperature": 0.7,  # the inputs win over the defaults
        "max_tokens": 64,
        "model": "served-model",  # the configured model wins over the inputs'
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    logs = [line.message for line in task.logs.order_by("id")]
    assert logs == [
        f"POST {fake.base_url}/chat/completions (model served-model)",
        "usage: prompt_tokens 7, completion_tokens 3, total_tokens 10",
    ]


def test_a_prompt_is_one_user_message(make_app, fake, keyed):
    task = run_task(make_app, config(fake), {"prompt": "hi there"})
    assert task.status == "succeeded", task.error
    assert fake.requests[0].body["messages"] == [{"role": "user", "content": "hi there"}]


@pytest.mark.parametrize(
    ("inputs", "error"),
    [
        ({}, "inputs need messages (a non-empty list of message objects) or a prompt"),
        ({"messages": []}, "inputs need messages"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "not both"),
        ({"prompt": ""}, "inputs.prompt must be a non-empty string"),
        ({"prompt": "a", "n": 2}, "inputs.n must be 1"),
    ],
)
def test_bad_inputs_fail_before_any_request(make_app, fake, keyed, inputs, error):
    task = run_task(make_app, config(fake), inputs)
    assert task.status == "failed" and error in task.error
    assert fake.requests == []


def test_a_missing_key_variable_is_a_clear_failure(make_app, fake, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    task = run_task(make_app, config(fake), {"prompt": "hi"})
    assert task.status == "failed"
    assert task.error == (
        f"runner_config.api_key_env names {KEY_ENV}, which is not set in the worker's environment"
    )
    assert fake.requests == []


def test_a_wrong_key_fails_with_the_upstreams_message(make_app, fake, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    task = run_task(make_app, config(fake), {"prompt": "hi"}, auto_retry=3)
    assert (task.status, task.run) == ("failed", 1)  # a 401 is not retried
    assert task.error == "upstream answered HTTP 401: Incorrect API key provided."


def test_a_400_fails_with_error_message_and_is_not_retried(make_app, fake, keyed):
    def bad_request(w: Writer, request: Request) -> None:
        w.json(400, error_body("This model's maximum context length is 4096 tokens.",
                               param="messages", code="context_length_exceeded"))  # fmt: skip

    fake.script = bad_request
    task = run_task(make_app, config(fake), {"prompt": "long"}, auto_retry=3)
    assert (task.status, task.run) == ("failed", 1)
    assert task.error == (
        "upstream answered HTTP 400: This model's maximum context length is 4096 tokens."
    )


def test_a_429_is_retried_after_its_retry_after(make_app, fake, keyed):
    def rate_limited(w: Writer, request: Request) -> None:
        body = error_body("Rate limit reached for requests", "requests", code="rate_limit_exceeded")
        w.json(429, body, headers={"Retry-After": "7"})

    fake.script = rate_limited
    ctx = RecordingContext(config(fake))
    with pytest.raises(RetryableError) as raised:
        openai.run({"prompt": "hi"}, ctx)
    assert raised.value.retry_after == 7
    assert str(raised.value) == "upstream answered HTTP 429: Rate limit reached for requests"

    # Through the executor: run 1 failed, run 2 due no sooner than the upstream asked.
    task = run_task(make_app, config(fake), {"prompt": "hi"}, auto_retry=2,
                    auto_retry_backoff_seconds=0)  # fmt: skip
    assert (task.status, task.run) == ("pending", 2)
    [history] = TaskRunHistory.objects.filter(task_id=task.id)
    assert history.error.startswith("upstream answered HTTP 429")
    assert task.queued_at - history.finished_at >= timedelta(seconds=7)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_is_retryable(fake, status, keyed):
    def down(w: Writer, request: Request) -> None:
        w.json(status, {"object": "error", "message": "Engine loop is not running",
                        "type": "InternalServerError", "code": status})  # fmt: skip

    fake.script = down
    with pytest.raises(RetryableError, match=rf"^upstream answered HTTP {status}: Engine loop"):
        openai.run({"prompt": "hi"}, RecordingContext(config(fake)))


@pytest.mark.parametrize("form", ["data-chunk", "error-event"])
def test_an_error_mid_stream_fails_the_task(make_app, fake, keyed, form):
    def breaks(w: Writer, request: Request) -> None:
        w.head()
        w.data(chunk({"role": "assistant", "content": "Par"}))
        w.data(chunk({"content": "tial"}))
        failure = error_body("The server had an error while processing your request.",
                             "server_error")  # fmt: skip
        w.data(failure, event="error" if form == "error-event" else None)
        w.end()

    fake.script = breaks
    task = run_task(make_app, config(fake), {"prompt": "hi"}, auto_retry=3)
    assert (task.status, task.run) == ("failed", 1)
    assert task.error == (
        "upstream failed mid-stream: The server had an error while processing your request."
    )
    assert task.streamed_output == "Partial"  # what came before is kept


def test_a_dropped_connection_mid_stream_is_retryable(fake, keyed):
    def crashes(w: Writer, request: Request) -> None:
        w.head()
        w.data(chunk({"role": "assistant", "content": "Hel"}))
        w.cut()

    fake.script = crashes
    ctx = RecordingContext(config(fake))
    with pytest.raises(RetryableError, match=r"^upstream answer broke off"):
        openai.run({"prompt": "hi"}, ctx)
    assert ctx.emitted == ["Hel"]


def test_a_stream_ending_before_its_finish_is_retryable(fake, keyed):
    def ends_early(w: Writer, request: Request) -> None:
        w.head()
        w.data(chunk({"role": "assistant", "content": "Hel"}))
        w.end()  # a clean end of the body, but no finish reason and no [DONE]

    fake.script = ends_early
    with pytest.raises(RetryableError, match=r"^upstream stream ended before the answer"):
        openai.run({"prompt": "hi"}, RecordingContext(config(fake)))


def test_done_ends_the_answer_even_if_the_connection_stays_open(fake, keyed):
    def keeps_open(w: Writer, request: Request) -> None:
        w.head()
        w.data(chunk({"content": "only"}, finish="stop"))
        w.data("[DONE]")
        w.hang()

    fake.script = keeps_open
    ctx = RecordingContext(config(fake))
    assert openai.run({"prompt": "hi"}, ctx)["message"]["content"] == "only"
    assert fake.wait_for(lambda: fake.disconnects, timeout=5)  # and the runner let go of it


def test_a_silent_upstream_times_out_but_keep_alives_keep_it_waiting(fake, keyed):
    def silent(w: Writer, request: Request) -> None:
        w.head()
        w.data(chunk({"role": "assistant", "content": "Hel"}))
        w.hang()

    fake.script = silent
    with pytest.raises(RetryableError, match=r"^upstream sent nothing for 0\.5 s mid-answer$"):
        openai.run({"prompt": "hi"}, RecordingContext(config(fake, timeout=0.5)))

    def slow_with_pings(w: Writer, request: Request) -> None:
        w.head()
        for _ in range(6):  # 1.8 s in all, never 0.5 s without a byte
            w.wait(0.3)
            w.comment("OPENROUTER PROCESSING")
        reply(w, request, ("late", " answer"), gap=0.3, head=False)

    fake.script = slow_with_pings
    ctx = RecordingContext(config(fake, timeout=0.5))
    assert openai.run({"prompt": "hi"}, ctx)["message"]["content"] == "late answer"
    assert ctx.emitted == ["late", " answer"]


def test_no_answer_head_within_the_timeout_is_retryable(fake, keyed):
    fake.script = lambda w, request: w.hang()
    with pytest.raises(RetryableError, match=r"^upstream did not answer within 0\.4 s$"):
        openai.run({"prompt": "hi"}, RecordingContext(config(fake, timeout=0.4)))


def test_a_refused_connection_is_retryable(keyed):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    ctx = RecordingContext({"base_url": f"http://127.0.0.1:{port}/v1", "model": "m"})
    with pytest.raises(RetryableError, match=r"^upstream request failed"):
        openai.run({"prompt": "hi"}, ctx)


def test_progress_follows_tokens_against_max_tokens_without_a_call_per_token(fake, keyed):
    pieces = [f"t{n} " for n in range(200)]
    fake.script = lambda w, request: reply(w, request, pieces)
    ctx = RecordingContext(config(fake))
    output = openai.run({"prompt": "count", "max_tokens": 200}, ctx)
    assert output["message"]["content"] == "".join(pieces) and ctx.emitted == pieces
    assert ctx.percents == sorted(set(ctx.percents))  # only ever up
    # Steps of 5 points (one more each 0.5 s, should the stream be slow), never 100: that is
    # the run's end, set when it succeeds.
    assert 19 <= len(ctx.percents) <= 25 and 95 <= ctx.percents[-1] <= 99

    ctx = RecordingContext(config(fake))  # no budget known: no progress, the tokens still stream
    openai.run({"prompt": "count"}, ctx)
    assert ctx.progressed == [] and len(ctx.emitted) == 200


def test_tool_calls_and_reasoning_are_assembled(fake, keyed):
    def calls_a_tool(w: Writer, request: Request) -> None:
        w.head()
        w.data(chunk({"role": "assistant", "reasoning_content": "Need the weather."}))
        w.data(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            )
        )
        for part in ('{"city": ', '"Paris"}'):
            w.data(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
        w.data(chunk({}, finish="tool_calls"))
        w.data(usage_chunk(20, 9))
        w.data("[DONE]")
        w.end()  # fmt: skip

    fake.script = calls_a_tool
    ctx = RecordingContext(config(fake))
    output = openai.run({"prompt": "weather?", "tools": [{"type": "function"}]}, ctx)
    assert output["message"] == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Need the weather.",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    }  # fmt: skip
    assert output["finish_reason"] == "tool_calls" and ctx.emitted == []


def test_a_server_that_answers_json_instead_of_a_stream(fake, keyed):
    def whole(w: Writer, request: Request) -> None:
        w.json(200, {"id": "chatcmpl-2", "object": "chat.completion", "model": "served-model",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "all at once"}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 3,
                               "total_tokens": 6}})  # fmt: skip

    fake.script = whole
    ctx = RecordingContext(config(fake))
    output = openai.run({"prompt": "hi"}, ctx)
    assert output["message"] == {"role": "assistant", "content": "all at once"}
    assert output["usage"]["total_tokens"] == 6 and ctx.emitted == ["all at once"]


@pytest.mark.parametrize("phase", ["before-the-head", "mid-stream"])
def test_a_cancel_lets_go_of_a_silent_upstream_at_once(fake, keyed, phase):
    """The stream's own mechanics, in process: the upstream sends nothing, the next check
    raises, the connection is closed (the upstream sees it) well within a second."""

    def silent(w: Writer, request: Request) -> None:
        if phase == "mid-stream":
            w.head()
            w.data(chunk({"role": "assistant", "content": "Hel"}))
        w.hang()

    fake.script = silent
    ctx = RecordingContext(config(fake, timeout=60))
    cancelled_at = cancel_later(ctx, 0.6)
    with pytest.raises(TaskCancelled):
        openai.run({"prompt": "hi"}, ctx)
    assert time.monotonic() - cancelled_at[0] < 1.0
    assert fake.wait_for(lambda: fake.disconnects, timeout=2)
    assert fake.disconnects[0] - cancelled_at[0] < 1.0
    assert ctx.checks >= 2  # it kept asking while nothing came


@pytest.mark.django_db
def test_a_deadline_passing_while_the_upstream_is_silent_ends_the_run(make_app, fake, keyed):
    fake.script = lambda w, request: w.hang()
    created = make_app("openai", runner_config=config(fake, timeout=60))
    task = Task.objects.create(application=created.application, inputs={"prompt": "hi"},
                               deadline_at=timezone.now() + timedelta(seconds=1))  # fmt: skip
    started = time.monotonic()
    execute_task(task_id=str(task.id), run=1, worker_name="inline")
    task.refresh_from_db()
    assert (task.status, task.error_code) == ("failed", "deadline_exceeded")
    assert time.monotonic() - started < 2.5  # not the 60 s read timeout
    assert fake.wait_for(lambda: fake.disconnects, timeout=2)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("phase", ["before-the-head", "mid-stream"])
def test_cancelling_the_task_closes_the_upstream_within_a_second(live_worker, make_app, phase):
    fake = FakeOpenAI()  # the shared worker has no key variable: this one asks for none
    answered = threading.Event()

    def silent(w: Writer, request: Request) -> None:
        if phase == "mid-stream":
            w.head()
            w.data(chunk({"role": "assistant", "content": "Hel"}))
        answered.set()
        w.hang()

    fake.script = silent
    try:
        app = make_app("openai", runner_config={"base_url": fake.base_url, "model": "m",
                                                "timeout": 60})  # fmt: skip
        task_id = api_submit(app, {"inputs": {"prompt": "hi"}, "response_mode": "async"})
        assert answered.wait(20), live_worker.output()[-3000:]
        if phase == "mid-stream":
            wait_for(lambda: catalog.OUTPUT_DELTA in [e.event for e in entries(task_id)], timeout=5)
        cancelled_at = time.monotonic()
        response = Client().post(f"/api/tasks/{task_id}/cancel",
                                 HTTP_AUTHORIZATION=f"Bearer {app.api_key}")  # fmt: skip
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert fake.wait_for(lambda: fake.disconnects, timeout=5), "the stream was left open"
        assert fake.disconnects[0] - cancelled_at < 1.0
        wait_for(lambda: "task stopped: cancelled" in live_worker.output(), timeout=5)
        assert wait_for_status(task_id, ("cancelled",)).output is None
    finally:
        fake.close()


@pytest.mark.django_db(transaction=True)
def test_a_task_streams_through_a_real_worker(live_worker, make_app):
    fake = FakeOpenAI()
    fake.script = lambda w, request: reply(w, request, ("Hello", " from", " vLLM"), gap=0.05)
    try:
        app = make_app("openai", runner_config={"base_url": fake.base_url, "model": "m"})
        task_id = api_submit(app, {"inputs": {"prompt": "hi"}, "response_mode": "async"})
        task = wait_for_status(task_id, ("succeeded", "failed"))
        assert task.status == "succeeded", task.error
        assert task.output["message"]["content"] == task.streamed_output == "Hello from vLLM"
        assert task.output["usage"] == {"prompt_tokens": 7, "completion_tokens": 3,
                                        "total_tokens": 10}  # fmt: skip
    finally:
        fake.close()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("runner_config", "error"),
    [
        ({"model": "m"}, "the openai runner needs runner_config.base_url"),
        ({"base_url": "127.0.0.1:8000/v1", "model": "m"}, "must be an http:// or https:// URL"),
        ({"base_url": "http://127.0.0.1:8000/v1"}, "the openai runner needs runner_config.model"),
        ({"base_url": "http://h/v1", "model": "m", "defaults": [1]}, "defaults must be a JSON"),
        ({"base_url": "http://h/v1", "model": "m", "timeout": 0}, "timeout must be seconds"),
        ({"base_url": "http://h/v1", "model": "m", "api_key_env": "sk-123 x"}, "api_key_env"),
    ],
)
def test_the_config_is_checked_when_the_application_is_saved(runner_config, error):
    with pytest.raises(InvalidApplication) as invalid:
        create_application(name="llm", runner="openai", runner_config=runner_config)
    assert invalid.value.field == "runner_config" and error in invalid.value.message


@pytest.mark.django_db
def test_changing_only_the_runner_or_only_the_config_is_checked_too():
    app = create_application(name="llm", runner="echo", runner_config={"model": "m"}).application
    with pytest.raises(InvalidApplication, match=r"needs runner_config\.base_url"):
        update_application(application_id=app.id, runner="openai")
    good = {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}
    update_application(application_id=app.id, runner="openai", runner_config=good)
    with pytest.raises(InvalidApplication, match=r"needs runner_config\.model"):
        update_application(application_id=app.id, runner_config={"base_url": good["base_url"]})
    app.refresh_from_db()
    assert (app.runner, app.runner_config) == ("openai", good)
