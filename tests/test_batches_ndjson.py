"""Batches sent as NDJSON (`Content-Type: application/x-ndjson`, tasks.batches.ingest
parse_ndjson_batch): one item per line, the batch's fields as query parameters or a first line
`{"batch": {...}}` (not both), every line validated before anything is stored, the body read in
blocks (with Content-Length or chunked, and through the web process's ASGI bridge), the limits,
idempotency, a large batch."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from a2wsgi import WSGIMiddleware
from django.db import connections
from django.test.client import FakePayload

from dashboard.runtime.handlers import RoutingHandler
from tasks.api.views import BODY_BLOCK
from tasks.batches import ingest
from tasks.models import Batch, Task
from tests.conftest import clean_redis

NDJSON = "application/x-ndjson"
ITEMS = [{"inputs": {"n": n}} for n in range(5)]
HOOK = "http://127.0.0.1:9/hooks/batch"


def ndjson(lines: list[Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def post(client, app, body: bytes, query: str = "", content_type: str = NDJSON, **extra):
    return client.generic(
        "POST",
        f"/api/applications/{app.application.id}/batches{query}",
        body,
        content_type=content_type,
        CONTENT_TYPE=content_type,  # the test client sets it only for a non-empty body
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
        **extra,
    )


def accepted(response) -> Batch:
    assert response.status_code == 200, response.content
    return Batch.objects.get(pk=response.json()["batch_id"])


def items_of(batch: Batch) -> list[Task]:
    return list(Task.objects.filter(batch=batch).order_by("batch_index"))


class BlockReader(FakePayload):
    """A request body with Content-Length that records the reads: none may ask for it whole."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, size=-1, /):
        assert size is not None and 0 < size <= BODY_BLOCK, size
        self.sizes.append(size)
        return super().read(size)


class DechunkedBody:
    """`wsgi.input` for `Transfer-Encoding: chunked`: the de-chunked body, its length unknown (no
    Content-Length), read in blocks as the web process's ASGI bridge (a2wsgi) serves them."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.sizes: list[int] = []

    def read(self, size: int = -1, /) -> bytes:
        assert 0 < size <= BODY_BLOCK, size
        self.sizes.append(size)
        return self._data.read(size)

    def readline(self, size: int = -1, /) -> bytes:
        raise AssertionError("a2wsgi's sized readline returns only what it has buffered yet")


def chunked(body: bytes) -> dict[str, Any]:
    return {
        "wsgi.input": DechunkedBody(body),
        "CONTENT_LENGTH": "",
        "HTTP_TRANSFER_ENCODING": "chunked",
    }


@pytest.fixture
def _clean(private_queues, transactional_db):
    clean_redis()
    yield
    clean_redis()


# --- the two forms of the batch's fields ----------------------------------------------------------

BATCH_FIELDS = {
    "callback_url": HOOK,
    "callback_events": ["started", "finished"],
    "priority": "high",
    "metadata": {"run": "night", "n": 2},
}
QUERY = "?" + urlencode({
    "callback_url": HOOK, "callback_events": "started,finished", "priority": "high",
    "metadata": json.dumps({"run": "night", "n": 2}),
})  # fmt: skip


@pytest.mark.parametrize(
    ("query", "first"),
    [(QUERY, []), ("", [{"batch": BATCH_FIELDS}])],
    ids=["query-parameters", "first-line"],
)
def test_the_batch_fields_come_as_query_parameters_or_a_first_line(
    make_app, client, _clean, query, first
):
    app = make_app("echo")
    lines = [*first, ITEMS[0], {"inputs": {"own": True}, "concurrency_key": "t-9"}, *ITEMS[1:]]
    # Blank lines (and a CRLF line end) are skipped; the last line needs no newline.
    body = (
        ndjson(lines[:2])
        + b"\n  \n"
        + ndjson(lines[2:-1]).replace(b"\n", b"\r\n")
        + (json.dumps(lines[-1]).encode())
    )
    batch = accepted(post(client, app, body, query))
    assert (batch.total, batch.callback_url, batch.priority) == (6, HOOK, "high")
    assert batch.callback_events == "started" and batch.metadata == {"run": "night", "n": 2}
    tasks = items_of(batch)
    assert [t.batch_index for t in tasks] == list(range(6))
    assert [t.inputs for t in tasks] == [item["inputs"] for item in lines[len(first) :]]
    assert {(t.priority, t.callback_url, t.callback_events) for t in tasks} == {
        ("high", HOOK, "started")
    }
    assert [t.concurrency_key for t in tasks].count(f"batch:{batch.id}") == 5


def test_without_batch_fields_the_applications_defaults_apply(make_app, client, _clean):
    app = make_app("echo", default_priority="low")
    batch = accepted(post(client, app, ndjson(ITEMS)))
    assert (batch.priority, batch.callback_url, batch.metadata) == ("low", "", {})
    assert {t.priority for t in items_of(batch)} == {"low"}


@pytest.mark.parametrize(
    ("query", "fields", "field"),
    [
        ("?priority=high", {"priority": "low"}, "priority"),
        ("?priority=high", {"metadata": {"a": 1}}, "metadata"),
        (f"?callback_url={HOOK}", {"priority": "low", "callback_url": HOOK}, "callback_url"),
    ],
)
def test_both_forms_at_once_are_refused(make_app, client, query, fields, field):
    app = make_app("echo")
    response = post(client, app, ndjson([{"batch": fields}, *ITEMS]), query)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_request", field)
    assert "not both" in error["message"]
    assert not Batch.objects.exists() and not Task.objects.exists()


# --- refusals: nothing stored ---------------------------------------------------------------


def lines_with(index: int, line: bytes) -> bytes:
    """ITEMS as NDJSON with line `index` (0-based, of the body) replaced by raw bytes."""
    rows = ndjson(ITEMS).splitlines(keepends=True)
    rows[index] = line + b"\n"
    return b"".join(rows)


@pytest.mark.parametrize(
    ("body", "query", "field", "says"),
    [
        (lines_with(2, b'{"inputs": {'), "", "items[2]", "line 3: items[2] is not valid JSON"),
        (lines_with(3, b"[1, 2]"), "", "items[3]", "line 4: items[3] must be a JSON object"),
        (lines_with(1, b'"text"'), "", "items[1]", "line 2"),
        (lines_with(0, b'{"inputs": {"a": "\xff"}}'), "", "items[0]", "not valid UTF-8"),
        (lines_with(2, b'{"inputs": {"x": 1e999}}'), "", "items[2].inputs", "line 3"),
        # The index counts items, not lines: blank lines and the batch line are not items.
        (b'{"batch": {}}\n\n' + lines_with(1, b'{"inputs": [1]}'), "", "items[1].inputs",
         "line 4: items[1]: inputs must be a JSON object"),
        (lines_with(4, b"{}"), "", "items[4].inputs", "inputs is required"),
        (lines_with(0, b'{"inputs": {}, "user": 7}'), "", "items[0].user", "line 1"),
        (lines_with(3, b'{"inputs": {}, "priority": "high"}'), "", "items[3].priority",
         "set on the batch only"),
        (lines_with(1, b'{"inputs": {}, "response_mode": "async"}'), "",
         "items[1].response_mode", "set on the batch only"),
        (lines_with(2, b'{"inputs": {}, "idempotency_key": 5}'), "",
         "items[2].idempotency_key", "must be a string"),
        (ndjson([{"inputs": {}, "idempotency_key": "k"}] * 2), "", "items[1].idempotency_key",
         "repeats an earlier item"),
        (lines_with(2, b'{"batch": {"priority": "low"}}'), "", "items[2].batch",
         "only the first line"),
        (b"", "", "items", "no items"),
        (b"\n\n  \n", "", "items", "no items"),
        (ndjson([{"batch": {"priority": "low"}}]), "", "items", "no items"),
        (ndjson([{"batch": {"items": []}}, *ITEMS]), "", "batch.items", "not a batch field"),
        (ndjson([{"batch": [1]}, *ITEMS]), "", "batch", "must be a JSON object"),
        (ndjson([{"batch": {}, "inputs": {}}, *ITEMS]), "", "batch", "holds nothing else"),
        (ndjson([{"batch": {"priority": "urgent"}}, *ITEMS]), "", "priority", "priority"),
        (ndjson([{"batch": {"metadata": [1]}}, *ITEMS]), "", "metadata", "JSON object"),
        (ndjson(ITEMS), "?priority=urgent", "priority", "priority"),
        (ndjson(ITEMS), "?callback_url=file:///etc/passwd", "callback_url", ""),
        (ndjson(ITEMS), "?callback_events=started", "callback_events", "needs a callback_url"),
        (ndjson(ITEMS), f"?callback_url={HOOK}&callback_events=sent", "callback_events", "sent"),
        (ndjson(ITEMS), f"?callback_url={HOOK}&callback_events=", "callback_events", "no event"),
        (ndjson(ITEMS), f"?callback_url={HOOK}&callback_events=started,,finished",
         "callback_events", "''"),
        (ndjson(ITEMS), f"?callback_url={HOOK}&callback_events=started,%20finished",
         "callback_events", "' finished'"),
        (ndjson(ITEMS), "?metadata=%7Bnope", "metadata", "JSON object"),
        (ndjson(ITEMS), "?metadata=%5B1%5D", "metadata", "JSON object"),
        (ndjson(ITEMS), "?priorty=high", "priorty", "query parameters"),
        (ndjson(ITEMS), "?priority=high&priority=low", "priority", "more than once"),
    ],
)  # fmt: skip
def test_an_invalid_line_refuses_the_batch_and_nothing_is_stored(
    make_app, client, body, query, field, says
):
    app = make_app("echo")
    response = post(client, app, body, query)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_request", field)
    assert says in error["message"]
    assert not Batch.objects.exists() and not Task.objects.exists()


def test_more_than_the_item_limit_is_refused(make_app, client):
    app = make_app("echo")
    line = b'{"inputs": {}}\n'
    at_most = post(client, app, line * (ingest.MAX_NDJSON_ITEMS + 1))
    assert at_most.status_code == 400
    assert at_most.json()["error"] == {
        "code": "invalid_request",
        "message": f"A batch holds at most {ingest.MAX_NDJSON_ITEMS} items.",
        "field": "items",
    }
    assert not Batch.objects.exists() and not Task.objects.exists()


def test_a_body_over_the_ndjson_limit_is_413(make_app, client, settings, _clean):
    app = make_app("echo", rate_limit_per_second=0)
    body = ndjson(ITEMS)
    settings.BATCH_NDJSON_MAX_BODY_BYTES = len(body) - 1
    expected = {
        "code": "payload_too_large",
        "message": f"The body is larger than {len(body) - 1} bytes.",
        "field": None,
    }
    # Said by Content-Length before reading, and found while reading a chunked body.
    for extra in ({}, chunked(body)):
        response = post(client, app, body, **extra)
        assert response.status_code == 413, response.content
        assert response.json()["error"] == expected
    # The JSON form's smaller limit does not apply to NDJSON.
    settings.BATCH_NDJSON_MAX_BODY_BYTES = len(body)
    settings.BATCH_MAX_BODY_BYTES = 10
    assert post(client, app, body).status_code == 200
    assert Batch.objects.count() == 1


def test_a_line_over_a_single_submits_limit_is_413(make_app, client, settings):
    app = make_app("echo")
    settings.MAX_BODY_BYTES = 200
    big = json.dumps({"inputs": {"text": "x" * 300}}).encode()
    response = post(client, app, ndjson(ITEMS[:2]) + big + b"\n" + ndjson(ITEMS[2:]))
    assert response.status_code == 413
    assert response.json()["error"] == {
        "code": "payload_too_large",
        "message": "Line 3 is larger than 200 bytes (MAX_BODY_BYTES).",
        "field": None,
    }
    assert not Batch.objects.exists() and not Task.objects.exists()


def test_a_json_batch_refuses_query_parameters(make_app, client):
    app = make_app("echo")
    body = json.dumps({"items": ITEMS}).encode()
    response = post(client, app, body, "?priority=high", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "priority"
    assert not Batch.objects.exists()


@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonl", "multipart/form-data"])
def test_another_content_type_is_415_naming_both(make_app, client, content_type):
    app = make_app("echo")
    response = post(client, app, ndjson(ITEMS), content_type=content_type)
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"] and NDJSON in error["message"]
    assert not Batch.objects.exists()


# --- idempotency ---------------------------------------------------------------------------------


def test_the_same_idempotency_key_and_body_answer_the_first_batch(make_app, client, _clean):
    app = make_app("echo", rate_limit_per_second=0)
    key = {"HTTP_IDEMPOTENCY_KEY": "nightly-1"}
    body = ndjson([{"batch": {"metadata": {"run": 1}}}, *ITEMS])
    first = accepted(post(client, app, body, **key))
    # The same lines, sent chunked and with blank lines and other spacing, are the same body.
    spaced = b"\n".join(
        json.dumps(json.loads(line), indent=None, separators=(" ,", " : ")).encode()
        for line in body.splitlines()
    )
    variant = b"\n" + spaced + b"\n\n"
    again = post(client, app, b"", **key, **chunked(variant))
    assert accepted(again).pk == first.pk
    # ... and so are the same batch fields as query parameters.
    as_query = post(client, app, ndjson(ITEMS), "?metadata=%7B%22run%22%3A1%7D", **key)
    assert accepted(as_query).pk == first.pk
    assert Batch.objects.count() == 1 and Task.objects.count() == len(ITEMS)
    for other in (
        ndjson([{"batch": {"metadata": {"run": 2}}}, *ITEMS]),  # a batch field
        ndjson([{"batch": {"metadata": {"run": 1}}}, *ITEMS[:4]]),  # an item fewer
        ndjson([{"batch": {"metadata": {"run": 1}}}, *ITEMS[1:], ITEMS[0]]),  # another order
        ndjson(ITEMS),  # the batch fields dropped
    ):
        changed = post(client, app, other, **key)
        assert changed.status_code == 409, changed.content
        assert changed.json()["error"] == {
            "code": "idempotency_conflict",
            "message": "This Idempotency-Key was used with a different request body.",
            "field": "Idempotency-Key",
        }
    assert Batch.objects.count() == 1 and Task.objects.count() == len(ITEMS)


# --- reading the body --------------------------------------------------------------------------


# Longer than a few read blocks, its lines falling across their edges.
MANY = [{"inputs": {"n": n, "text": "x" * (n % 97)}} for n in range(3000)]


def test_a_chunked_body_is_read_in_blocks(make_app, client, _clean):
    app = make_app("echo")
    body = ndjson([{"batch": {"priority": "low"}}, *MANY])
    extra = chunked(body)
    batch = accepted(post(client, app, b"", **extra))
    assert batch.priority == "low"
    assert [t.inputs for t in items_of(batch)] == [item["inputs"] for item in MANY]
    assert len(extra["wsgi.input"].sizes) > len(body) // BODY_BLOCK


def test_a_body_with_content_length_is_read_in_blocks(make_app, client, _clean):
    app = make_app("echo")
    body = ndjson(MANY)
    reader = BlockReader(body)
    batch = accepted(post(client, app, body, **{"wsgi.input": reader}))
    assert [t.inputs for t in items_of(batch)] == [item["inputs"] for item in MANY]
    assert len(reader.sizes) > len(body) // BODY_BLOCK


@pytest.fixture
def asgi_bridge() -> Iterator[WSGIMiddleware]:
    """The API as the web process serves it (dashboard.runtime.asgi: a2wsgi in front of the
    WSGI handler), on one thread whose database connection is closed afterwards."""
    bridge = WSGIMiddleware(RoutingHandler(), workers=1)  # type: ignore[arg-type]
    yield bridge
    bridge.executor.submit(connections.close_all).result()
    bridge.executor.shutdown()


def asgi_post(bridge, app, body: Iterable[bytes] | bytes, query: str = "") -> httpx.Response:
    """POST through `bridge`, the body streamed as the given pieces (chunked) or whole."""

    async def pieces() -> AsyncIterator[bytes]:
        for piece in body:
            yield piece

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=bridge)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            return await http.post(
                f"/api/applications/{app.application.id}/batches{query}",
                content=body if isinstance(body, bytes) else pieces(),
                headers={"Authorization": f"Bearer {app.api_key}", "Content-Type": NDJSON},
            )

    return asyncio.run(send())


def test_through_the_web_processs_asgi_bridge(make_app, _clean, settings, asgi_bridge):
    app = make_app("echo", rate_limit_per_second=0)
    body = ndjson(MANY)
    pieces = [body[start : start + 777] for start in range(0, len(body), 777)]
    chunked_answer = asgi_post(asgi_bridge, app, pieces, "?priority=low")
    assert chunked_answer.status_code == 200, chunked_answer.text
    whole = asgi_post(asgi_bridge, app, body)
    assert whole.status_code == 200, whole.text
    for answer in (chunked_answer, whole):
        stored = Task.objects.filter(batch_id=answer.json()["batch_id"]).order_by("batch_index")
        assert [t.inputs for t in stored] == [item["inputs"] for item in MANY]
    broken = body[:5000] + b"{oops\n" + body[5000:]
    refused = asgi_post(
        asgi_bridge, app, [broken[start : start + 777] for start in range(0, len(broken), 777)]
    )
    assert refused.status_code == 400 and refused.json()["error"]["field"].startswith("items[")
    settings.BATCH_NDJSON_MAX_BODY_BYTES = len(body) - 1
    assert asgi_post(asgi_bridge, app, pieces).status_code == 413
    assert Batch.objects.count() == 2


def test_a_large_batch_is_stored_and_its_results_page_past_the_json_limit(make_app, client, _clean):
    app = make_app("echo")
    count = ingest.MAX_ITEMS + 2_000  # past the JSON form's limit, short enough for this layer
    body = b"".join(b'{"inputs": {"n": %d}}\n' % n for n in range(count))
    batch = accepted(post(client, app, body, "?priority=low"))
    assert batch.total == count
    stored = Task.objects.filter(batch=batch)
    assert stored.count() == count
    assert stored.filter(priority="low").count() == count
    last = stored.get(batch_index=count - 1)
    assert last.inputs == {"n": count - 1}
    stored.filter(batch_index__gte=count - 3).update(status="succeeded", output={"ok": 1})
    stored.filter(batch_index=count - 4).update(status="failed", error="boom")
    response = client.get(
        f"/api/batches/{batch.id}/results?after={count - 5}",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )
    assert response.status_code == 200, response.content
    lines = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert [(line["index"], line["status"]) for line in lines] == [
        (count - 4, "failed"), (count - 3, "succeeded"), (count - 2, "succeeded"),
        (count - 1, "succeeded"),
    ]  # fmt: skip
