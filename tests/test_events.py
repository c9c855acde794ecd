"""Live task events for real: the web process as deployed (gunicorn with uvicorn workers, the
ASGI application), a real RQ worker, real SSE clients (httpx-sse), and a real receiver for the
intermediate webhooks, both signatures verified."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from unittest import mock

import httpx
import pytest
import redis
from django.conf import settings
from django.core import signing
from httpx_sse import connect_sse
from standardwebhooks import Webhook

from dashboard.runtime.processes import web_argv
from tasks.events import tokens
from tasks.events.stream import stream_key
from tasks.models import Task
from tests.conftest import BASE_DIR, subprocess_env, wait_for, wait_for_status
from tests.stack import RedisCut, free_port

pytestmark = pytest.mark.processes

GATE = "test-events-gate:"


def gated_runner(inputs, ctx):
    """Streams `inputs.first` pieces, then waits until the test opens its gate (a Redis key),
    then streams `inputs.then` more; logs and reports progress on the way."""
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=60)  # BLPOP waits 30 s
    ctx.log("starting")
    pieces = [f"p{i} " for i in range(inputs["first"] + inputs["then"])]
    for index, piece in enumerate(pieces):
        if index == inputs["first"]:
            ctx.progress(50, "half way")
            if client.blpop([GATE + str(ctx.task_id)], timeout=30) is None:
                raise RuntimeError("the test never opened the gate")
        ctx.emit(piece)
    ctx.log("done")
    return {"pieces": len(pieces)}


@contextlib.contextmanager
def web_process(log_path, **env: str) -> Iterator[str]:
    """The web process exactly as the Procfile runs it, on the test database and Redis."""
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen(
        web_argv(),
        cwd=BASE_DIR,
        env=subprocess_env(GUNICORN_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY="1",
                           STREAM_KEEPALIVE_SECONDS="1", **env),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, interval=0.1)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture
def web(live_worker, tmp_path) -> Iterator[str]:
    with web_process(tmp_path / "web.log") as base:
        yield base


def submit(base: str, app, body: dict) -> dict:
    response = httpx.post(
        f"{base}/api/applications/{app.application.id}/generate",
        json={"response_mode": "async", **body},
        headers={"Authorization": f"Bearer {app.api_key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def read_events(client: httpx.Client, url: str, *, stop_after=None, **kwargs) -> list:
    """(id, event, data) of each event until the stream ends, or until `stop_after(events)`."""
    received = []
    with connect_sse(client, "GET", url, timeout=30, **kwargs) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            if not sse.data:
                continue  # the `retry:` block; an EventSource dispatches nothing for it
            received.append((sse.id, sse.event, json.loads(sse.data)))
            if stop_after and stop_after(received):
                break
    return received


def pair(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def test_a_disconnect_mid_run_then_a_resume_loses_nothing_and_repeats_nothing(make_app, web):
    app = make_app("tests.test_events.gated_runner")
    accepted = submit(web, app, {"inputs": {"first": 4, "then": 6}})
    task_id = accepted["task_id"]
    headers = {"Authorization": f"Bearer {app.api_key}"}
    url = f"{web}/api/tasks/{task_id}/events"
    with httpx.Client(headers=headers) as client:
        # Read until the third streamed piece, then drop the connection.
        first = read_events(
            client,
            url,
            stop_after=lambda got: sum(e == "task.output.delta" for _, e, _ in got) == 3,
        )
    redis.Redis.from_url(settings.REDIS_URL).rpush(GATE + task_id, "go")
    wait_for_status(task_id, ("succeeded",))
    with httpx.Client(headers=headers | {"Last-Event-ID": first[-1][0]}) as client:
        rest = read_events(client, url)

    events = first + rest
    ids = [pair(event_id) for event_id, _, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "ids increase, none repeated"
    names = [name for _, name, _ in events]
    assert names[:3] == ["task.queued", "task.started", "task.log"]
    assert names[-1] == "task.finished" and names.count("task.finished") == 1
    text = "".join(data["text"] for _, name, data in events if name == "task.output.delta")
    assert text == "".join(f"p{i} " for i in range(10))
    progress = [data for _, name, data in events if name == "task.progress"]
    assert progress == [{"run": 1, "progress": 50, "message": "half way"}]
    logs = [data["message"] for _, name, data in events if name == "task.log"]
    assert logs == ["starting", "done"]

    finished = events[-1][2]
    task = Task.objects.get(pk=task_id)
    assert finished["event"] == "task.finished" and finished["status"] == "succeeded"
    assert finished["output"] == {"pieces": 10} and finished["task_id"] == task_id
    assert list(finished) == ["event", "task_id", "run", "app_id", "status", "output", "error",
                              "error_code", "user", "created_at", "started_at",
                              "finished_at", "queue", "batch_id"]  # fmt: skip
    assert finished["error_code"] is None
    # The streamed output is kept with the task, the final output is the runner's return value.
    assert task.streamed_output == text and task.output == {"pieces": 10}


def test_a_stream_cut_off_from_redis_waits_and_then_sends_what_it_missed(
    make_app, live_worker, tmp_path
):
    """The web process's Redis link is cut while the task goes on and finishes (the worker's
    link is not): the open stream sends keepalives, does not end on the database's word while
    Redis cannot say what it holds, and once the link is mended sends every event it missed and
    the run's own `task.finished`."""
    cut = RedisCut(settings.REDIS_URL)
    app = make_app("tests.test_events.gated_runner")
    try:
        with web_process(tmp_path / "web.log", REDIS_URL=cut.url) as base:
            task_id = submit(base, app, {"inputs": {"first": 2, "then": 5}})["task_id"]
            headers = {"Authorization": f"Bearer {app.api_key}"}
            received: list[tuple[str, str, dict]] = []
            with (
                httpx.Client(headers=headers, timeout=30) as client,
                connect_sse(client, "GET", f"{base}/api/tasks/{task_id}/events") as source,
            ):
                events = source.iter_sse()
                for sse in events:
                    if sse.data:
                        received.append((sse.id, sse.event, json.loads(sse.data)))
                    if sum(name == "task.output.delta" for _, name, _ in received) == 2:
                        break
                cut.sever()
                redis.Redis.from_url(settings.REDIS_URL).rpush(GATE + task_id, "go")
                wait_for_status(task_id, ("succeeded",))
                time.sleep(3)  # three keepalives (1 s here) with Redis unreadable
                cut.mend()
                for sse in events:
                    if sse.data:
                        received.append((sse.id, sse.event, json.loads(sse.data)))
                    if sse.event == "task.finished":
                        break
    finally:
        cut.close()

    text = "".join(data["text"] for _, name, data in received if name == "task.output.delta")
    assert text == "".join(f"p{i} " for i in range(7)), "nothing lost"
    ids = [pair(event_id) for event_id, _, _ in received]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "nothing repeated"
    stored = redis.Redis.from_url(settings.REDIS_URL).xrevrange(stream_key(task_id), count=1)
    marker = stored[0][0].decode()
    assert received[-1][:2] == (marker, "task.finished")  # the run's marker, not a made-up one
    assert received[-1][2]["status"] == "succeeded"


def test_after_the_finish_a_client_gets_finished_at_once_and_a_resume_after_it_204(make_app, web):
    app = make_app("echo")
    task_id = submit(web, app, {"inputs": {"q": 1}})["task_id"]
    wait_for_status(task_id, ("succeeded",))
    headers = {"Authorization": f"Bearer {app.api_key}"}
    with httpx.Client(headers=headers) as client:
        events = read_events(client, f"{web}/api/tasks/{task_id}/events")
        assert [name for _, name, _ in events] == ["task.finished"]
        assert events[0][2]["output"] == {"q": 1}
        # Resuming from the start replays the whole run; from the finish, nothing is left.
        replay = read_events(client, f"{web}/api/tasks/{task_id}/events?after=0")
        assert [n for _, n, _ in replay] == ["task.queued", "task.started", "task.finished"]
        done = client.get(
            f"{web}/api/tasks/{task_id}/events", headers={"Last-Event-ID": events[0][0]}
        )
        assert done.status_code == 204


def test_the_stream_url_token_follows_one_task_without_the_api_key(make_app, web):
    app = make_app("echo")
    accepted = submit(web, app, {"inputs": {"q": 2}})
    other = submit(web, app, {"inputs": {"q": 3}})
    stream_url = accepted["stream_url"]
    assert stream_url.startswith(f"{web}/api/tasks/{accepted['task_id']}/events?token=")
    with httpx.Client() as client:
        events = read_events(client, stream_url)
        assert events[-1][1] == "task.finished"
        token = stream_url.split("token=")[1]
        # The same token reads the poll URL, and only this task's.
        poll = client.get(f"{accepted['poll_url']}?token={token}")
        assert poll.status_code == 200 and poll.json()["output"] == {"q": 2}
        for url in (f"{other['poll_url']}?token={token}",
                    f"{web}/api/tasks/{other['task_id']}/events?token={token}"):  # fmt: skip
            refused = client.get(url)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthorized"
        # An expired token (issued longer ago than STREAM_TOKEN_SECONDS) is refused too.
        with mock.patch("time.time", return_value=time.time() - settings.STREAM_TOKEN_SECONDS - 5):
            old = tokens.issue(accepted["task_id"])
        expired = client.get(f"{web}/api/tasks/{accepted['task_id']}/events?token={old}")
        assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]
        assert signing.TimestampSigner  # the tokens are Django's signer's, nothing stored


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("GET", "/api/tasks/{task}/events", {}, 401, "unauthorized"),
        ("GET", "/api/tasks/{task}/events", {"Authorization": "Bearer nope"}, 401, "unauthorized"),
        ("GET", "/api/tasks/{task}/events?after=yesterday", "key", 400, "invalid_request"),
        ("GET", "/api/tasks/{task}/events", {"Last-Event-ID": "12-x"}, 400, "invalid_request"),
        ("GET", "/api/tasks/not-a-uuid/events", "key", 404, "not_found"),
        ("GET", "/api/tasks/00000000-0000-0000-0000-000000000000/events", "key", 404, "not_found"),
        ("POST", "/api/tasks/{task}/events", "key", 405, "method_not_allowed"),
    ],
)
def test_errors_come_before_the_stream_in_the_json_shape(
    make_app, web, method, path, headers, status, code
):
    app = make_app("echo")
    task_id = submit(web, app, {"inputs": {}})["task_id"]
    if headers == "key":
        headers = {"Authorization": f"Bearer {app.api_key}"}
    elif "Last-Event-ID" in headers:
        headers = headers | {"Authorization": f"Bearer {app.api_key}"}
    response = httpx.request(method, web + path.format(task=task_id), headers=headers, timeout=10)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"]["code"] == code and set(body["error"]) == {"code", "message", "field"}


def test_another_applications_key_does_not_see_the_task(make_app, web):
    owner, stranger = make_app("echo"), make_app("echo")
    task_id = submit(web, owner, {"inputs": {}})["task_id"]
    response = httpx.get(
        f"{web}/api/tasks/{task_id}/events",
        headers={"Authorization": f"Bearer {stranger.api_key}"},
        timeout=10,
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_an_idle_stream_is_kept_alive_with_comments(make_app, web):
    app = make_app("tests.test_events.gated_runner")
    task_id = submit(web, app, {"inputs": {"first": 1, "then": 1}})["task_id"]
    lines = []
    with httpx.stream("GET", f"{web}/api/tasks/{task_id}/events", timeout=30,
                      headers={"Authorization": f"Bearer {app.api_key}"}) as response:  # fmt: skip
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith(":"):
                break  # the web process under test sends one every second
    assert ": keepalive" in lines
    redis.Redis.from_url(settings.REDIS_URL).rpush(GATE + task_id, "go")
    wait_for_status(task_id, ("succeeded",))


def test_intermediate_webhooks_are_signed_coalesced_and_in_order(make_app, web, receiver):
    app = make_app("tests.test_events.gated_runner")
    accepted = submit(web, app, {
        "inputs": {"first": 3, "then": 3},
        "callback_url": receiver.url,
        "callback_events": ["started", "progress", "log", "output", "finished"],
    })  # fmt: skip
    task_id = accepted["task_id"]
    poll = httpx.get(accepted["poll_url"], headers={"Authorization": f"Bearer {app.api_key}"})
    assert poll.json()["callback"]["events"] == ["started", "progress", "log", "output", "finished"]
    wait_for(lambda: any(r.json()["event"] == "task.output" for r in receiver.received))
    redis.Redis.from_url(settings.REDIS_URL).rpush(GATE + task_id, "go")
    wait_for_status(task_id, ("succeeded",))
    wait_for(lambda: Task.objects.get(pk=task_id).callback_status == "delivered")
    task = Task.objects.get(pk=task_id)

    # The worker's sender posts what is still waiting after the run, in its next windows.
    def everything_posted() -> bool:
        bodies = [r.json() for r in receiver.received]
        text = "".join(b.get("delta", "") for b in bodies if b["event"] == "task.output")
        logs = [line["message"] for b in bodies if b["event"] == "task.log" for line in b["logs"]]
        return text == task.streamed_output and logs[-1:] == ["done"]

    wait_for(everything_posted)

    secret = app.webhook_secret
    for received in receiver.received:
        headers = {name.lower(): value for name, value in received.headers.items()}
        expected = hmac.new(secret.encode(), received.body, hashlib.sha256).hexdigest()
        assert headers["x-dify-signature-v1"] == expected
        Webhook(secret).verify(received.body, headers)  # raises when the signature is wrong
    bodies = [received.json() for received in receiver.received]
    ids = [received.headers["webhook-id"] for received in receiver.received]
    assert len(set(ids)) == len(ids), "each POST has its own webhook-id"
    intermediate = [body for body in bodies if body["event"] != "task.finished"]
    assert next(b for b in bodies if b["event"] == "task.finished")["status"] == "succeeded"
    assert intermediate[0]["event"] == "task.started"
    assert {body["event"] for body in intermediate} == {
        "task.started", "task.progress", "task.log", "task.output"
    }  # fmt: skip
    progress = [body for body in intermediate if body["event"] == "task.progress"]
    assert progress[-1]["progress"] == 50 and progress[-1]["message"] == "half way"
    logs = [line["message"] for body in intermediate if body["event"] == "task.log"
            for line in body["logs"]]  # fmt: skip
    assert logs == ["starting", "done"]
    # In order per kind (event ids increase), and coalesced: POSTs of one task at least a
    # coalescing window apart, give or take the receiver's own clock.
    event_ids = [pair(body["event_id"]) for body in intermediate]
    for kind in ("task.log", "task.output"):
        of_kind = [pair(b["event_id"]) for b in intermediate if b["event"] == kind]
        assert of_kind == sorted(of_kind)
    assert len(event_ids) == len(intermediate)
    times = [r.at for r in receiver.received if r.json()["event"] != "task.finished"]
    assert all(later - earlier >= 0.4 for earlier, later in itertools.pairwise(times))
    # Intermediate POSTs are not delivery attempts: only task.finished is recorded.
    assert task.callback_attempt_rows.count() == 1 and task.callback_attempts == 1


def test_without_callback_events_only_finished_is_posted(make_app, web, receiver):
    app = make_app("tests.test_events.gated_runner")
    task_id = submit(web, app, {"inputs": {"first": 1, "then": 1}, "callback_url": receiver.url})[
        "task_id"
    ]
    wait_for_status(task_id, ("running",))
    redis.Redis.from_url(settings.REDIS_URL).rpush(GATE + task_id, "go")
    wait_for(lambda: Task.objects.get(pk=task_id).callback_status == "delivered")
    assert [r.json()["event"] for r in receiver.received] == ["task.finished"]
