"""Tasks against the live stack: submit, get, wait, run, stream (and its resume), cancel,
errors and retries, with the sync and the async client."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid

import httpx
import pytest
from taskhook_client import (
    AsyncTaskhook,
    Conflict,
    Event,
    InvalidRequest,
    NotFound,
    RateLimited,
    Taskhook,
    Unauthorized,
    WaitTimeout,
)

from .conftest import Application, LiveStack, Relay


def test_submit_get_and_wait(stack: LiveStack, app: Application) -> None:
    with Taskhook(stack.base_url, app.api_key) as client:
        accepted = client.submit(app.app_id, {"query": "hello"}, user="u1", priority="high")
        assert accepted["status"] == "pending"
        assert accepted["poll_url"].endswith(f"/api/tasks/{accepted['task_id']}")
        task = client.wait(accepted["task_id"], timeout=30)
        assert task["status"] == "succeeded"
        assert task["output"] == {"query": "hello"}
        assert task["user"] == "u1" and task["priority"] == "high"
        assert client.get(accepted["task_id"]) == task


def test_wait_sleeps_what_retry_after_says(stack: LiveStack, sleeper: Application) -> None:
    polls: list[tuple[float, str | None]] = []

    def record(response: httpx.Response) -> None:
        if response.request.method == "GET":
            polls.append((time.monotonic(), response.headers.get("Retry-After")))

    http = httpx.Client(event_hooks={"response": [record]})
    with Taskhook(stack.base_url, sleeper.api_key, http_client=http) as client:
        accepted = client.submit(sleeper.app_id, {"seconds": 2.5})
        task = client.wait(accepted["task_id"], timeout=60)
    http.close()
    assert task["status"] == "succeeded" and task["output"] == {"slept": 2.5}
    assert len(polls) >= 2
    assert polls[-1][1] is None  # a finished task's poll has no Retry-After
    for (at, retry_after), (next_at, _) in itertools.pairwise(polls):
        assert retry_after is not None
        assert next_at - at >= float(retry_after) - 0.05  # never sooner than asked


def test_wait_times_out_with_the_last_poll(stack: LiveStack, sleeper: Application) -> None:
    with Taskhook(stack.base_url, sleeper.api_key) as client:
        accepted = client.submit(sleeper.app_id, {"seconds": 30})
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as raised:
            client.wait(accepted["task_id"], timeout=1.5)
        assert 1.4 <= time.monotonic() - started < 4
        assert raised.value.task["status"] in ("pending", "running")
        assert raised.value.code == "wait_timeout"
        assert client.cancel(accepted["task_id"])["status"] == "cancelled"


def test_run_uses_prefer_wait(stack: LiveStack, app: Application) -> None:
    seen: list[httpx.Response] = []
    http = httpx.Client(event_hooks={"response": [seen.append]})
    with Taskhook(stack.base_url, app.api_key, http_client=http) as client:
        task = client.run(app.app_id, {"n": 1}, timeout=20)
    http.close()
    assert task["status"] == "succeeded" and task["output"] == {"n": 1}
    assert len(seen) == 1  # answered by the submit itself, no poll
    assert seen[0].request.headers["Prefer"] == "wait=20"
    assert seen[0].headers["Preference-Applied"].startswith("wait=")


def test_run_falls_back_to_polling(stack: LiveStack, sleeper: Application) -> None:
    """A server wait shorter than the task (Prefer: wait=1, answered 202) goes on by polling
    for the rest of the timeout."""
    short = stack.create_application("--rate-limit", "0", "--blocking-timeout", "1", runner="sleep")
    seen: list[httpx.Response] = []
    http = httpx.Client(event_hooks={"response": [seen.append]})
    with Taskhook(stack.base_url, short.api_key, http_client=http) as client:
        task = client.run(short.app_id, {"seconds": 2.5}, timeout=30)
        assert task["status"] == "succeeded" and task["output"] == {"slept": 2.5}
        with pytest.raises(WaitTimeout):
            client.run(short.app_id, {"seconds": 5}, timeout=2)
    http.close()
    assert seen[0].status_code == 202 and seen[0].headers["Preference-Applied"] == "wait=1"
    assert seen[1].request.method == "GET"


def test_stream_yields_every_event_and_resumes_from_an_id(
    stack: LiveStack, sleeper: Application
) -> None:
    with Taskhook(stack.base_url, sleeper.api_key) as client:
        accepted = client.submit(sleeper.app_id, {"seconds": 1})
        events = list(client.stream(accepted["task_id"]))
        names = [event.event for event in events]
        assert names[-1] == "task.finished" and names.count("task.finished") == 1
        assert "task.started" in names and "task.progress" in names
        assert events[-1].data["status"] == "succeeded"
        assert events[-1].data["task_id"] == accepted["task_id"]
        _assert_increasing(events)
        middle = events[len(events) // 2]
        rest = list(client.stream(accepted["task_id"], last_event_id=middle.id))
        assert [event.id for event in rest] == [event.id for event in events][
            len(events) // 2 + 1 :
        ]
        # resuming after task.finished: the server answers 204 and the stream is empty
        assert list(client.stream(accepted["task_id"], last_event_id=events[-1].id)) == []


def _assert_increasing(events: list[Event]) -> None:
    ids = [tuple(int(part) for part in str(event.id).split("-")) for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids


def _assert_resumed_from_a_received_event(request: bytes, events: list[Event]) -> None:
    """The reconnect sent Last-Event-ID: the id of an event received before the cut (the
    client may have read an event or two past the one the cut followed)."""
    header = re.search(rb"(?im)^last-event-id: *(\S+)\r$", request)
    assert header is not None, request
    assert [event.id for event in events].index(header.group(1).decode()) >= 1


def test_stream_resumes_after_a_disconnect(
    stack: LiveStack, sleeper: Application, relay: Relay
) -> None:
    with Taskhook(stack.base_url, sleeper.api_key) as direct:
        accepted = direct.submit(sleeper.app_id, {"seconds": 3})
    events: list[Event] = []
    with Taskhook(f"http://127.0.0.1:{relay.port}", sleeper.api_key) as client:
        for event in client.stream(accepted["task_id"]):
            events.append(event)
            if len(events) == 2:
                relay.cut()  # the connection drops mid-stream
    assert events[-1].event == "task.finished"
    _assert_increasing(events)
    assert len(relay.requests) >= 2
    _assert_resumed_from_a_received_event(relay.requests[1], events)
    # nothing was missed: the same events as a replay of everything kept
    with Taskhook(stack.base_url, sleeper.api_key) as direct:
        replay = list(direct.stream(accepted["task_id"], last_event_id="0"))
    assert [event.id for event in events] == [event.id for event in replay[-len(events) :]]
    assert replay[-len(events)].event in ("task.queued", "task.started")


def test_cancel_and_cancel_again(stack: LiveStack, sleeper: Application) -> None:
    with Taskhook(stack.base_url, sleeper.api_key) as client:
        accepted = client.submit(sleeper.app_id, {"seconds": 30})
        assert client.cancel(accepted["task_id"])["status"] == "cancelled"
        with pytest.raises(Conflict) as raised:
            client.cancel(accepted["task_id"])
    assert raised.value.code == "task_finished" and raised.value.status == 409
    assert "cancelled" in raised.value.message


def test_errors_carry_code_message_field_and_status(stack: LiveStack, app: Application) -> None:
    with Taskhook(stack.base_url, app.api_key) as client:
        with pytest.raises(InvalidRequest) as invalid:
            client.submit(app.app_id, {}, priority="urgent")
        assert (invalid.value.status, invalid.value.code) == (400, "invalid_request")
        assert invalid.value.field == "priority" and invalid.value.message
        with pytest.raises(InvalidRequest) as deadline:
            client.submit(app.app_id, {}, deadline=-1)
        assert deadline.value.field == "deadline_seconds"
        with pytest.raises(NotFound) as missing:
            client.get(str(uuid.uuid4()))
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        with pytest.raises(NotFound):
            client.submit(str(uuid.uuid4()), {})  # another application's id
    with (
        Taskhook(stack.base_url, "thk_wrong") as client,
        pytest.raises(Unauthorized) as unauthorized,
    ):
        client.get(str(uuid.uuid4()))
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")


def test_429_is_retried_per_retry_after(stack: LiveStack) -> None:
    limited = stack.create_application("--rate-limit", "1/1")
    with Taskhook(stack.base_url, limited.api_key, max_retries=0) as client:
        client.submit(limited.app_id, {})
        with pytest.raises(RateLimited) as raised:
            client.submit(limited.app_id, {})
    assert (raised.value.status, raised.value.code) == (429, "rate_limited")
    assert raised.value.retry_after is not None and raised.value.retry_after >= 1
    statuses: list[tuple[float, int]] = []
    http = httpx.Client(
        event_hooks={"response": [lambda r: statuses.append((time.monotonic(), r.status_code))]}
    )
    with Taskhook(stack.base_url, limited.api_key, max_retries=5, http_client=http) as client:
        first = client.submit(limited.app_id, {"n": 1})
        second = client.submit(limited.app_id, {"n": 2})
    http.close()
    assert first["task_id"] != second["task_id"]
    codes = [code for _, code in statuses]
    assert 429 in codes and codes[-1] == 200 and codes.count(200) == 2
    refused = codes.index(429)
    assert statuses[refused + 1][0] - statuses[refused][0] >= 0.95  # waited Retry-After (1 s)


def test_async_client(stack: LiveStack, app: Application, sleeper: Application) -> None:
    async def scenario() -> None:
        async with AsyncTaskhook(stack.base_url, app.api_key) as client:
            accepted = await client.submit(app.app_id, {"query": "async"})
            task = await client.wait(accepted["task_id"], timeout=30)
            assert task["output"] == {"query": "async"}
            assert await client.get(accepted["task_id"]) == task
            ran = await client.run(app.app_id, {"n": 2}, timeout=20)
            assert ran["status"] == "succeeded" and ran["output"] == {"n": 2}
            with pytest.raises(InvalidRequest) as invalid:
                await client.submit(app.app_id, {}, callback_events=["nope"])
            assert invalid.value.field == "callback_events"
            with pytest.raises(NotFound):
                await client.cancel(str(uuid.uuid4()))
        async with AsyncTaskhook(stack.base_url, sleeper.api_key) as client:
            accepted = await client.submit(sleeper.app_id, {"seconds": 1})
            events = [event async for event in client.stream(accepted["task_id"])]
            assert events[-1].event == "task.finished"
            _assert_increasing(events)
            slow = await client.submit(sleeper.app_id, {"seconds": 30})
            with pytest.raises(WaitTimeout):
                await client.wait(slow["task_id"], timeout=1)
            assert (await client.cancel(slow["task_id"]))["status"] == "cancelled"
            with pytest.raises(Conflict):
                await client.cancel(slow["task_id"])

    asyncio.run(scenario())


def test_async_stream_resumes_after_a_disconnect(
    stack: LiveStack, sleeper: Application, relay: Relay
) -> None:
    async def scenario() -> list[Event]:
        async with AsyncTaskhook(stack.base_url, sleeper.api_key) as direct:
            accepted = await direct.submit(sleeper.app_id, {"seconds": 3})
        events: list[Event] = []
        async with AsyncTaskhook(f"http://127.0.0.1:{relay.port}", sleeper.api_key) as client:
            async for event in client.stream(accepted["task_id"]):
                events.append(event)
                if len(events) == 2:
                    relay.cut()
        return events

    events = asyncio.run(scenario())
    assert events[-1].event == "task.finished"
    _assert_increasing(events)
    _assert_resumed_from_a_received_event(relay.requests[1], events)
