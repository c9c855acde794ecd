"""Batches (tasks.batches, README: Batches): validation of the whole batch before anything is
stored, idempotency, items as ordinary tasks in their lanes and under the per-key cap as one
key, counts and progress, the results NDJSON and its cursor, cancel; a 1,000-item batch through
a real worker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.utils import timezone
from rq.queue import Queue

from tasks.models import Batch, Task
from tasks.plumbing.queueing import redis_client, task_job_id
from tasks.scheduling import fairness, lanes
from tests.conftest import clean_redis, wait_for


def post_batch(client, app, body: Any, **headers):
    return client.post(
        f"/api/applications/{app.application.id}/batches",
        json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
        **{f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()},
    )


def submit_batch(client, app, items: list[dict], **fields) -> dict:
    response = post_batch(client, app, {"items": items, **fields})
    assert response.status_code == 200, response.content
    return response.json()


def get(client, app, path: str):
    return client.get(path, HTTP_AUTHORIZATION=f"Bearer {app.api_key}")


def results(client, app, batch_id: str, query: str = "") -> tuple[list[dict], str | None]:
    response = get(client, app, f"/api/batches/{batch_id}/results{query}")
    assert response.status_code == 200, response
    assert response["Content-Type"] == "application/x-ndjson"
    body = b"".join(response.streaming_content).decode()
    lines = [json.loads(line) for line in body.splitlines()]
    return lines, response.headers.get("Link")


def lane_ids(priority: str) -> list[str]:
    return Queue(lanes.queue_name(priority), connection=redis_client()).get_job_ids()


@pytest.fixture
def _clean(private_queues, transactional_db):
    clean_redis()
    yield
    clean_redis()


# --- validation: the whole batch or nothing ------------------------------------------------------

ITEMS = [{"inputs": {"n": n}} for n in range(5)]


def with_item(index: int, item: Any) -> list[Any]:
    return [*ITEMS[:index], item, *ITEMS[index + 1 :]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": with_item(3, {"inputs": [1]})}, "items[3].inputs"),
        ({"items": with_item(2, {})}, "items[2].inputs"),
        ({"items": with_item(1, {"inputs": {}, "user": 7})}, "items[1].user"),
        ({"items": with_item(4, "text")}, "items[4]"),
        ({"items": with_item(0, {"inputs": {}, "priority": "high"})}, "items[0].priority"),
        ({"items": with_item(2, {"inputs": {}, "idempotency_key": 5})}, "items[2].idempotency_key"),
        ({"items": with_item(3, {"inputs": {}, "concurrency_key": "k" * 256})},
         "items[3].concurrency_key"),
        ({"items": [{"inputs": {}, "idempotency_key": "a"}] * 2}, "items[1].idempotency_key"),
        ({"items": []}, "items"),
        ({"items": [{"inputs": {}}] * 10_001}, "items"),
        ({"items": ITEMS, "priority": "urgent"}, "priority"),
        ({"items": ITEMS, "metadata": [1]}, "metadata"),
        ({"items": ITEMS, "callback_events": ["started"]}, "callback_events"),
        ({"items": ITEMS, "callback_url": "file:///etc/passwd"}, "callback_url"),
        ([1, 2], None),
    ],
)  # fmt: skip
def test_an_invalid_item_refuses_the_batch_and_nothing_is_stored(make_app, client, body, field):
    app = make_app("echo")
    response = post_batch(client, app, body)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field
    assert not Batch.objects.exists() and not Task.objects.exists()


def test_a_batch_of_another_application_or_none_is_404(make_app, client, _clean):
    app, other = make_app("echo"), make_app("echo")
    response = post_batch(client, other, {"items": ITEMS})
    batch_id = response.json()["batch_id"]
    wrong_app = client.post(
        f"/api/applications/{app.application.id}/batches", "{}", content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {other.api_key}",
    )  # fmt: skip
    assert wrong_app.status_code == 404
    for path in (f"/api/batches/{batch_id}", f"/api/batches/{batch_id}/results",
                 "/api/batches/nope"):  # fmt: skip
        assert get(client, app, path).json()["error"]["code"] == "not_found"


# --- idempotency ----------------------------------------------------------------------------


def test_the_same_idempotency_key_and_body_answer_the_first_batch(make_app, client, _clean):
    app = make_app("echo")
    body = {"items": ITEMS, "metadata": {"run": "morning"}}
    first = post_batch(client, app, body, **{"Idempotency-Key": "daily-1"}).json()
    again = post_batch(client, app, body, **{"Idempotency-Key": "daily-1"}).json()
    assert again["batch_id"] == first["batch_id"]
    assert Batch.objects.count() == 1 and Task.objects.count() == len(ITEMS)
    changed = post_batch(client, app, {**body, "metadata": {}}, **{"Idempotency-Key": "daily-1"})
    assert changed.status_code == 409
    assert changed.json()["error"] == {
        "code": "idempotency_conflict",
        "message": "This Idempotency-Key was used with a different request body.",
        "field": "Idempotency-Key",
    }
    assert Batch.objects.count() == 1 and Task.objects.count() == len(ITEMS)


def test_an_items_key_that_names_a_task_refuses_the_batch(make_app, client, _clean):
    app = make_app("echo")
    submit_batch(client, app, [{"inputs": {}, "idempotency_key": "report-7"}])
    items = [{"inputs": {}, "idempotency_key": "report-6"}, *with_item(0, {"inputs": {},
             "idempotency_key": "report-7"})]  # fmt: skip
    response = post_batch(client, app, {"items": items})
    assert response.status_code == 409
    assert response.json()["error"]["field"] == "items[1].idempotency_key"
    assert Batch.objects.count() == 1 and Task.objects.count() == 1


def test_a_batch_is_decoded_checked_and_stored_as_a_burst_with_the_collector_paused(
    make_app, client, _clean, monkeypatch
):
    import gc

    from tasks.batches import ingest

    seen: list[bool] = []
    parse, store = ingest.parse_batch_body, ingest.submit_batch

    def parse_seen(*args, **kwargs):
        seen.append(gc.isenabled())
        return parse(*args, **kwargs)

    def store_seen(*args, **kwargs):
        seen.append(gc.isenabled())
        return store(*args, **kwargs)

    monkeypatch.setattr(ingest, "parse_batch_body", parse_seen)
    monkeypatch.setattr(ingest, "submit_batch", store_seen)
    assert gc.isenabled()
    submit_batch(client, make_app("echo"), ITEMS)
    assert seen == [False, False]  # tasks.plumbing.bursts, around the whole request
    assert gc.isenabled()


# --- items are tasks --------------------------------------------------------------------------


def test_items_are_tasks_in_the_batchs_lane_with_the_batch_as_their_key(make_app, client, _clean):
    app = make_app("echo")
    items = [*ITEMS, {"inputs": {"own": True}, "concurrency_key": "tenant-9", "user": "u"}]
    answer = submit_batch(client, app, items, priority="high", metadata={"a": 1})
    batch_id = answer["batch_id"]
    assert list(answer) == ["batch_id", "status", "counts", "poll_url", "results_url",
                            "created_at"]  # fmt: skip
    assert answer["status"] == "running"
    assert answer["counts"] == {"total": 6, "pending": 6, "running": 0, "succeeded": 0,
                                "failed": 0, "cancelled": 0}  # fmt: skip
    assert answer["poll_url"] == f"http://testserver/api/batches/{batch_id}"
    assert answer["results_url"] == f"http://testserver/api/batches/{batch_id}/results"
    tasks = list(Task.objects.filter(batch_id=batch_id).order_by("batch_index"))
    assert [t.batch_index for t in tasks] == list(range(6))
    assert [t.inputs for t in tasks] == [item["inputs"] for item in items]
    assert {t.priority for t in tasks} == {"high"} and {t.response_mode for t in tasks} == {"async"}
    assert [t.concurrency_key for t in tasks] == [f"batch:{batch_id}"] * 5 + ["tenant-9"]
    # Every item is in the high lane, in index order, each with its ticket.
    assert lane_ids("high") == [task_job_id(t.id, 1) for t in tasks]
    tickets = [int(redis_client().hget(f"rq:job:{task_job_id(t.id, 1)}", "th_ticket"))
               for t in tasks]  # fmt: skip
    assert tickets == sorted(tickets) and len(set(tickets)) == 6
    poll = get(client, app, f"/api/tasks/{tasks[0].id}").json()
    assert list(poll)[-1] == "batch_id" and poll["batch_id"] == batch_id
    single = client.post(
        f"/api/applications/{app.application.id}/generate",
        {"inputs": {}, "response_mode": "async"},
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    ).json()  # fmt: skip
    assert get(client, app, f"/api/tasks/{single['task_id']}").json()["batch_id"] is None


def test_the_per_key_cap_holds_a_batch_as_one_user(make_app, client, _clean):
    app = make_app("echo", max_concurrency_per_key=2)
    batch_id = submit_batch(client, app, [{"inputs": {"n": n}, "user": f"u{n}"}
                                          for n in range(40)])["batch_id"]  # fmt: skip
    items = list(Task.objects.filter(batch_id=batch_id).order_by("batch_index"))
    assert lane_ids("normal") == [task_job_id(t.id, 1) for t in items[:2]]
    key = fairness.key_of(items[0])
    assert key is not None and redis_client().zcard(key.line) == 38
    # Another user's task is not behind the batch: it enters the lane at once.
    other = client.post(
        f"/api/applications/{app.application.id}/generate",
        {"inputs": {}, "response_mode": "async", "user": "bob"},
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    ).json()["task_id"]  # fmt: skip
    assert lane_ids("normal")[-1] == task_job_id(other, 1)


def test_without_a_cap_a_batch_holds_batch_concurrency_runs_and_lines_the_rest_in_order(
    make_app, client, settings, _clean
):
    from tasks.events import stream as event_stream
    from tasks.scheduling import dispatch

    settings.BATCH_CONCURRENCY = 3
    app = make_app("echo")  # no max_concurrency_per_key
    batch_id = submit_batch(client, app, [{"inputs": {"n": n}} for n in range(30)])["batch_id"]
    items = list(Task.objects.filter(batch_id=batch_id).order_by("batch_index"))
    assert lane_ids("normal") == [task_job_id(t.id, 1) for t in items[:3]]
    key = fairness.key_of(items[0])
    assert key is not None and key.is_batch
    lined = [job.decode() for job in redis_client().zrange(key.line, 0, -1)]
    assert lined == [task_job_id(t.id, 1) for t in items[3:]]  # index order

    # A lined item has announced nothing yet; a granted one has its task.queued.
    def announced(task) -> bool:
        return bool(redis_client().xlen(event_stream.stream_key(task.id)))

    assert announced(items[0]) and not announced(items[3])
    # Another client's task enters the lane at once: behind 3 of the batch's, not 30.
    other = client.post(
        f"/api/applications/{app.application.id}/generate",
        {"inputs": {}, "response_mode": "async"},
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    ).json()["task_id"]  # fmt: skip
    assert lane_ids("normal")[3:] == [task_job_id(other, 1)]
    # A run's end passes its slot to the next item in index order, which announces itself.
    Task.objects.filter(pk=items[0].pk).update(status="succeeded")
    dispatch._pass_on(key, [task_job_id(items[0].id, 1)])
    assert lane_ids("normal")[-1] == task_job_id(items[3].id, 1)
    assert announced(items[3])


# --- following a batch ------------------------------------------------------------------------


def test_counts_progress_and_results_never_pass_an_unfinished_item(make_app, client, _clean):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS, metadata={"dept": "finance"})["batch_id"]
    now = timezone.now()
    items = Task.objects.filter(batch_id=batch_id)
    items.filter(batch_index__in=[0, 1, 3]).update(status="succeeded", output={"ok": 1},
                                                   finished_at=now)  # fmt: skip
    items.filter(batch_index=2).update(status="running")
    detail = get(client, app, f"/api/batches/{batch_id}").json()
    assert list(detail)[-3:] == ["progress", "metadata", "finished_at"]
    assert detail["counts"] == {"total": 5, "pending": 1, "running": 1, "succeeded": 3,
                                "failed": 0, "cancelled": 0}  # fmt: skip
    assert (detail["status"], detail["progress"], detail["finished_at"]) == ("running", 60, None)
    assert detail["metadata"] == {"dept": "finance"}
    lines, link = results(client, app, batch_id)
    assert [line["index"] for line in lines] == [0, 1]  # item 3 waits for item 2
    assert lines[0] == {"task_id": str(items.get(batch_index=0).id), "index": 0,
                        "status": "succeeded", "output": {"ok": 1}, "error": None,
                        "error_code": None}  # fmt: skip
    assert (
        link == f'<http://testserver/api/batches/{batch_id}/results?after=1&limit=1000>; rel="next"'
    )
    items.filter(batch_index__in=[2, 4]).update(status="failed", error="boom", finished_at=now)
    lines, link = results(client, app, batch_id, "?after=1")
    assert [(line["index"], line["status"], line["error"]) for line in lines] == [
        (2, "failed", "boom"), (3, "succeeded", None), (4, "failed", "boom"),
    ]  # fmt: skip
    assert link is None
    detail = get(client, app, f"/api/batches/{batch_id}").json()
    assert (detail["status"], detail["progress"]) == ("finished", 100)
    assert detail["finished_at"] is not None


@pytest.mark.parametrize(
    "query", ["?limit=0", "?limit=10001", "?after=x", "?after=-2", "?cursor=5", "?after=1&x=1"]
)
def test_a_bad_results_cursor_is_refused(make_app, client, _clean, query):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS)["batch_id"]
    response = get(client, app, f"/api/batches/{batch_id}/results{query}")
    assert response.status_code == 400
    assert (
        response.json()["error"]["field"] == query.rpartition("&")[2].lstrip("?").partition("=")[0]
    )


def test_cancel_cancels_every_unfinished_item_and_empties_the_keys_line(make_app, client, _clean):
    app = make_app("echo", max_concurrency_per_key=2)
    batch_id = submit_batch(client, app, [{"inputs": {"n": n}} for n in range(30)])["batch_id"]
    items = Task.objects.filter(batch_id=batch_id)
    items.filter(batch_index=0).update(status="succeeded", finished_at=timezone.now())
    items.filter(batch_index=1).update(status="running")
    key = fairness.key_of(items.select_related("application").first())
    assert key is not None
    response = client.post(f"/api/batches/{batch_id}/cancel",
                           HTTP_AUTHORIZATION=f"Bearer {app.api_key}")  # fmt: skip
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "cancelled" and body["progress"] == 100
    assert body["counts"] == {"total": 30, "pending": 0, "running": 0, "succeeded": 1,
                              "failed": 0, "cancelled": 29}  # fmt: skip
    assert items.filter(status="cancelled", cancel_requested=True).count() == 29
    assert redis_client().zcard(key.line) == 0  # nothing of the batch waits for a slot
    again = client.post(f"/api/batches/{batch_id}/cancel",
                        HTTP_AUTHORIZATION=f"Bearer {app.api_key}")  # fmt: skip
    assert again.json()["counts"] == body["counts"]


# --- with a real worker ---------------------------------------------------------------------


@pytest.mark.processes
def test_a_thousand_item_batch_runs_to_the_end_and_pages_its_results(make_app, client, live_worker):
    app = make_app("echo", rate_limit_per_second=0)
    items = [{"inputs": {"n": n}} for n in range(1000)]
    batch_id = submit_batch(client, app, items)["batch_id"]
    wait_for(
        lambda: get(client, app, f"/api/batches/{batch_id}").json()["status"] == "finished",
        timeout=180, interval=0.5,
    )  # fmt: skip
    detail = get(client, app, f"/api/batches/{batch_id}").json()
    assert detail["counts"]["succeeded"] == 1000 and detail["progress"] == 100
    read: list[dict] = []
    query = "?limit=400"
    pages = 0
    while True:
        lines, link = results(client, app, batch_id, query)
        read += lines
        pages += 1
        if link is None:
            break
        query = "?" + link.split("?", 1)[1].split(">", 1)[0]
    assert pages == 3
    assert [line["index"] for line in read] == list(range(1000))
    assert [line["output"] for line in read] == [item["inputs"] for item in items]


@pytest.mark.processes
def test_an_items_callback_names_its_batch(make_app, client, live_worker, receiver):
    app = make_app("echo")
    batch_id = submit_batch(
        client, app, ITEMS[:2], callback_url=receiver.url, callback_events=["finished"]
    )["batch_id"]
    wait_for(lambda: len(receiver.received) == 3, timeout=60)  # two items, then the batch
    bodies = [request.json() for request in receiver.received if request.json()["event"]
              == "task.finished"]  # fmt: skip
    assert len(bodies) == 2
    assert {body["batch_id"] for body in bodies} == {batch_id}
    assert all(list(body)[-1] == "batch_id" for body in bodies)


def test_without_an_idempotency_key_the_body_is_not_hashed(make_app, client, _clean, monkeypatch):
    """The request hash only serves a repeated Idempotency-Key: a batch without one skips it,
    in the JSON and the NDJSON form."""
    from tasks.batches import ingest

    asked: list[bool] = []
    for name in ("parse_batch_body", "parse_ndjson_batch"):
        real = getattr(ingest, name)

        def spy(*args, _real=real, **kwargs):
            asked.append(kwargs["hashed"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(ingest, name, spy)
    app = make_app("echo")
    answer = submit_batch(client, app, ITEMS)
    assert Batch.objects.get(pk=answer["batch_id"]).request_hash == ""
    ndjson = "\n".join(json.dumps(item) for item in ITEMS)
    response = client.post(f"/api/applications/{app.application.id}/batches", ndjson,
                           content_type="application/x-ndjson",
                           HTTP_AUTHORIZATION=f"Bearer {app.api_key}")  # fmt: skip
    assert response.status_code == 200, response.content
    keyed = post_batch(client, app, {"items": ITEMS}, idempotency_key="hash-me")
    assert keyed.status_code == 200, keyed.content
    assert len(Batch.objects.get(pk=keyed.json()["batch_id"]).request_hash) == 64
    assert asked == [False, False, True]
    monkeypatch.undo()
    assert ingest.parse_batch_body({"items": ITEMS}, hashed=False).request_hash == ""
    assert len(ingest.parse_batch_body({"items": ITEMS}).request_hash) == 64
