"""Batches against the live stack: submit, follow (events), results across cursors, cancel,
errors, with the sync and the async client."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from taskhook_client import AsyncTaskhook, InvalidRequest, NotFound, Taskhook

from .conftest import Application, LiveStack


def test_batch_results_across_cursors_and_events(stack: LiveStack, app: Application) -> None:
    pages: list[httpx.Response] = []

    def record(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/results"):
            pages.append(response)

    http = httpx.Client(event_hooks={"response": [record]})
    with Taskhook(stack.base_url, app.api_key, http_client=http) as client:
        items = [{"inputs": {"n": n}, "user": f"u{n}"} for n in range(5)]
        accepted = client.submit_batch(app.app_id, items, metadata={"run": "test"})
        assert accepted["counts"]["total"] == 5
        events = list(client.stream_batch(accepted["batch_id"]))
        assert events[0].event == "batch.progress"
        assert events[-1].event == "batch.finished"
        assert events[-1].data["counts"]["succeeded"] == 5
        results = list(client.batch_results(accepted["batch_id"], limit=2))
        batch = client.get_batch(accepted["batch_id"])
    http.close()
    assert [result["index"] for result in results] == [0, 1, 2, 3, 4]
    assert [result["output"] for result in results] == [{"n": n} for n in range(5)]
    assert {result["status"] for result in results} == {"succeeded"}
    assert len(pages) == 3 and "link" not in pages[-1].headers  # 2 + 2 + 1, then no Link
    assert pages[1].request.url.params["after"] == "1"
    assert batch["status"] == "finished" and batch["progress"] == 100
    assert batch["metadata"] == {"run": "test"}


def test_batch_results_follow_unfinished_items(stack: LiveStack, sleeper: Application) -> None:
    with Taskhook(stack.base_url, sleeper.api_key) as client:
        items = [{"inputs": {"seconds": seconds}} for seconds in (1.5, 0.1, 0.1)]
        accepted = client.submit_batch(sleeper.app_id, items)
        # without follow: stops at the first unfinished item (index 0 sleeps longest)
        started = time.monotonic()
        early = list(client.batch_results(accepted["batch_id"], follow=False))
        assert early == [] and time.monotonic() - started < 1
        results = list(client.batch_results(accepted["batch_id"], poll_seconds=0.2))
        assert [result["index"] for result in results] == [0, 1, 2]
        assert results[0]["output"] == {"slept": 1.5}
        # resuming after the last index read yields nothing more
        assert list(client.batch_results(accepted["batch_id"], after=2)) == []


def test_cancel_batch(stack: LiveStack, sleeper: Application) -> None:
    with Taskhook(stack.base_url, sleeper.api_key) as client:
        accepted = client.submit_batch(sleeper.app_id, [{"inputs": {"seconds": 30}}] * 3)
        client.cancel_batch(accepted["batch_id"])
        events = list(client.stream_batch(accepted["batch_id"]))
        assert events[-1].event == "batch.finished"
        assert events[-1].data["status"] == "cancelled"
        batch = client.get_batch(accepted["batch_id"])
        results = list(client.batch_results(accepted["batch_id"]))
    assert batch["status"] == "cancelled" and batch["counts"]["cancelled"] == 3
    assert [result["status"] for result in results] == ["cancelled"] * 3


def test_batch_errors(stack: LiveStack, app: Application) -> None:
    with Taskhook(stack.base_url, app.api_key) as client:
        with pytest.raises(InvalidRequest) as invalid:
            client.submit_batch(app.app_id, [{"inputs": {}}, {"user": "no inputs"}])
        assert invalid.value.field == "items[1].inputs"
        with pytest.raises(InvalidRequest) as priority:
            client.submit_batch(app.app_id, [{"inputs": {}}], priority="urgent")
        assert priority.value.field == "priority"
        with pytest.raises(NotFound):
            client.get_batch(str(uuid.uuid4()))
        with pytest.raises(NotFound):
            list(client.batch_results(str(uuid.uuid4())))
        with pytest.raises(NotFound):
            list(client.stream_batch(str(uuid.uuid4())))


def test_async_batches(stack: LiveStack, app: Application, sleeper: Application) -> None:
    async def scenario() -> None:
        async with AsyncTaskhook(stack.base_url, app.api_key) as client:
            accepted = await client.submit_batch(
                app.app_id, [{"inputs": {"n": n}} for n in range(3)], idempotency_key="b-1"
            )
            again = await client.submit_batch(
                app.app_id, [{"inputs": {"n": n}} for n in range(3)], idempotency_key="b-1"
            )
            assert again["batch_id"] == accepted["batch_id"]
            events = [event async for event in client.stream_batch(accepted["batch_id"])]
            assert events[-1].event == "batch.finished"
            results = [r async for r in client.batch_results(accepted["batch_id"], limit=1)]
            assert [result["output"] for result in results] == [{"n": n} for n in range(3)]
            assert (await client.get_batch(accepted["batch_id"]))["status"] == "finished"
            with pytest.raises(InvalidRequest):
                await client.submit_batch(app.app_id, [])
        async with AsyncTaskhook(stack.base_url, sleeper.api_key) as client:
            slow = await client.submit_batch(sleeper.app_id, [{"inputs": {"seconds": 30}}] * 2)
            await client.cancel_batch(slow["batch_id"])
            events = [event async for event in client.stream_batch(slow["batch_id"])]
            assert events[-1].data["status"] == "cancelled"

    asyncio.run(scenario())
