"""A batch's progress as Server-Sent Events (tasks.api.batch_events), from the web process as
deployed (gunicorn with uvicorn workers) with a real RQ worker and a real SSE client: progress
as the items finish, `batch.finished` at the end, 204 for a resume after it, and the JSON
errors before the stream."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import connect_sse

from tests.test_events import web_process

pytestmark = pytest.mark.processes


@pytest.fixture
def web(live_worker, tmp_path) -> Iterator[str]:
    with web_process(tmp_path / "web.log") as base:
        yield base


def submit_batch(base: str, app, items: list[dict]) -> str:
    response = httpx.post(
        f"{base}/api/applications/{app.application.id}/batches",
        json={"items": items},
        headers={"Authorization": f"Bearer {app.api_key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["batch_id"]


def read_events(base: str, app, batch_id: str, **headers: str) -> list[tuple[str, str, dict]]:
    received = []
    with (
        httpx.Client(timeout=60) as client,
        connect_sse(
            client, "GET", f"{base}/api/batches/{batch_id}/events",
            headers={"Authorization": f"Bearer {app.api_key}", **headers},
        ) as source,
    ):  # fmt: skip
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            if event.data:
                received.append((event.id, event.event, json.loads(event.data)))
    return received


def test_progress_follows_the_items_then_finished_ends_the_stream(make_app, web):
    app = make_app("sleep")
    batch_id = submit_batch(web, app, [{"inputs": {"seconds": 0.6}} for _ in range(4)])
    events = read_events(web, app, batch_id)
    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "batch.finished" and set(kinds[:-1]) == {"batch.progress"}
    finished_counts = [data["counts"]["succeeded"] for _, kind, data in events[:-1]]
    assert finished_counts == sorted(finished_counts)  # never backwards
    assert len(set(finished_counts)) >= 2  # it moved while the stream was open
    assert events[-2][2]["status"] == "finished" and events[-2][2]["progress"] == 100
    last_id, _, finished = events[-1]
    assert finished["event"] == "batch.finished" and finished["counts"]["succeeded"] == 4
    assert finished["results_url"] == f"{web}/api/batches/{batch_id}/results"
    # A client that resumes after the end it has: 204, so EventSource stops reconnecting.
    resumed = httpx.get(
        f"{web}/api/batches/{batch_id}/events",
        headers={"Authorization": f"Bearer {app.api_key}", "Last-Event-ID": last_id},
        timeout=10,
    )
    assert resumed.status_code == 204
    # One that resumes from a progress event gets the current state, then the end.
    again = read_events(web, app, batch_id, **{"Last-Event-ID": events[0][0]})
    assert [kind for _, kind, _ in again] == ["batch.progress", "batch.finished"]


@pytest.mark.parametrize(
    ("method", "who", "batch", "status", "code"),
    [
        ("GET", "none", "real", 401, "unauthorized"),
        ("GET", "stranger", "real", 404, "not_found"),
        ("GET", "owner", "not-a-uuid", 404, "not_found"),
        ("GET", "owner", "00000000-0000-0000-0000-000000000000", 404, "not_found"),
        ("POST", "owner", "real", 405, "method_not_allowed"),
    ],
)
def test_errors_come_before_the_stream_in_the_json_shape(
    make_app, web, method, who, batch, status, code
):
    owner, stranger = make_app("echo"), make_app("echo")
    batch_id = submit_batch(web, owner, [{"inputs": {}}]) if batch == "real" else batch
    keys = {"owner": owner.api_key, "stranger": stranger.api_key}
    headers = {"Authorization": f"Bearer {keys[who]}"} if who in keys else {}
    response = httpx.request(
        method, f"{web}/api/batches/{batch_id}/events", headers=headers, timeout=10
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code


def test_an_after_that_is_no_event_id_of_the_stream_is_400(make_app, web):
    app = make_app("echo")
    batch_id = submit_batch(web, app, [{"inputs": {}}])
    for after in ("", "nope", "finished-" + "9" * 21):
        response = httpx.get(
            f"{web}/api/batches/{batch_id}/events", params={"after": after},
            headers={"Authorization": f"Bearer {app.api_key}"}, timeout=10,
        )  # fmt: skip
        assert response.status_code == 400, after
        assert response.json()["error"]["field"] == "after"
