"""The shared rules without the stack: the SSE parser, Retry-After, the results cursor, and
503 / non-JSON errors / connection errors against a small real HTTP server started here."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from taskhook_client import (
    AsyncTaskhook,
    ConnectionFailed,
    Taskhook,
    TaskhookError,
    Unavailable,
)
from taskhook_client._core import SSEDecoder, next_cursor, retry_after

from .conftest import free_port


def test_sse_decoder() -> None:
    decoder = SSEDecoder()
    lines = [
        "retry: 2000", "", ": keepalive", "id: 1-0", "event: task.progress",
        'data: {"progress": 40}', "", "data: first", "data:second", "", "id: 2-0",
        "event: task.finished", "data: {}", "",
    ]  # fmt: skip
    events = [event for line in lines if (event := decoder.feed(line)) is not None]
    assert decoder.retry_ms == 2000
    assert [(e.id, e.event, e.data) for e in events] == [
        ("1-0", "task.progress", {"progress": 40}),
        ("1-0", "message", "first\nsecond"),  # the id carries over; data that is not JSON
        ("2-0", "task.finished", {}),
    ]


def test_retry_after_forms() -> None:
    assert retry_after(httpx.Headers({"Retry-After": "3"})) == 3
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    delay = retry_after(httpx.Headers({"Retry-After": in_ten}))
    assert delay is not None and 8 <= delay <= 10
    assert retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after(httpx.Headers({})) is None


def test_next_cursor() -> None:
    link = '<http://h/api/batches/b/results?after=41&limit=10>; rel="next"'
    assert next_cursor(httpx.Headers({"Link": link})) == (41, 10)
    assert next_cursor(httpx.Headers({})) is None


class Scripted:
    """An HTTP server that answers each request with the next (status, headers, body)."""

    def __init__(self, answers: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.answers = answers
        self.times: list[float] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                script.times.append(time.monotonic())
                status, headers, body = script.answers.pop(0)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    servers: list[Scripted] = []

    def make(answers: list[tuple[int, dict[str, str], bytes]]) -> Scripted:
        server = Scripted(answers)
        servers.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in servers:
        server.server.shutdown()
        server.server.server_close()


UNAVAILABLE = (
    503,
    {"Retry-After": "1", "Content-Type": "application/json"},
    json.dumps({"error": {"code": "unavailable", "message": "db away", "field": None}}).encode(),
)
TASK = {"task_id": "t", "status": "succeeded", "output": {}}


def test_503_retried_after_retry_after_then_given_up(scripted: Any) -> None:
    server = scripted([UNAVAILABLE, (200, {}, json.dumps(TASK).encode())])
    with Taskhook(server.url, "thk_x", max_retries=2) as client:
        assert client.get("t")["status"] == "succeeded"
    assert server.times[1] - server.times[0] >= 0.95
    server = scripted([UNAVAILABLE, UNAVAILABLE])
    with (
        Taskhook(server.url, "thk_x", max_retries=1) as client,
        pytest.raises(Unavailable) as raised,
    ):
        client.get("t")
    assert (raised.value.code, raised.value.status, raised.value.retry_after) == (
        "unavailable", 503, 1
    )  # fmt: skip


def test_an_error_page_that_is_not_json(scripted: Any) -> None:
    server = scripted([(502, {"Content-Type": "text/html"}, b"<h1>Bad gateway</h1>")])
    with Taskhook(server.url, "thk_x") as client, pytest.raises(TaskhookError) as raised:
        client.get("t")
    assert (raised.value.status, raised.value.code) == (502, "http_error")
    assert "Bad gateway" in raised.value.message


def test_connection_refused_is_retried_then_raised() -> None:
    port = free_port()  # nothing listens there
    with Taskhook(f"http://127.0.0.1:{port}", "thk_x", max_retries=1) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionFailed):
            client.submit("a", {})
        assert time.monotonic() - started >= 0.45  # one back-off of 0.5 s


def test_a_submit_whose_connection_broke_is_not_repeated_without_a_key() -> None:
    """The request may have reached the server: without an Idempotency-Key a repeat could
    create a second task, so the client raises instead."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.recv(65536)
            conn.close()  # read the request, answer nothing

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with Taskhook(url, "thk_x", max_retries=2) as client:
        with pytest.raises(ConnectionFailed):
            client.submit("a", {})
        assert len(accepted) == 1
        with pytest.raises(ConnectionFailed):
            client.submit("a", {}, idempotency_key="k")  # replayable: tried 1 + 2 times
        assert len(accepted) == 4
    listener.close()


def test_async_503_retry(scripted: Any) -> None:
    server = scripted([UNAVAILABLE, (200, {}, json.dumps(TASK).encode())])

    async def scenario() -> dict[str, Any]:
        async with AsyncTaskhook(server.url, "thk_x") as client:
            return dict(await client.get("t"))

    assert asyncio.run(scenario())["status"] == "succeeded"
    assert len(server.times) == 2


def test_a_stream_that_cannot_connect_gives_up_after_max_retries() -> None:
    port = free_port()
    with Taskhook(f"http://127.0.0.1:{port}", "thk_x", max_retries=1) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionFailed):
            list(client.stream("t"))
    assert time.monotonic() - started >= 1.9  # one reconnect, after the default 2 s


def test_a_stream_refused_with_429_is_retried_then_read(scripted: Any) -> None:
    body = b'retry: 100\n\nid: 5-0\nevent: task.finished\ndata: {"status": "succeeded"}\n\n'
    server = scripted(
        [
            (429, {"Retry-After": "1", "Content-Type": "application/json"}, b"{}"),
            (200, {"Content-Type": "text/event-stream"}, body),
        ]
    )
    with Taskhook(server.url, "thk_x") as client:
        events = list(client.stream("t"))
    assert [(event.id, event.event, event.data) for event in events] == [
        ("5-0", "task.finished", {"status": "succeeded"})
    ]
    assert server.times[1] - server.times[0] >= 0.95
