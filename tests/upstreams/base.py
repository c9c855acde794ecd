"""A real HTTP/1.1 server on 127.0.0.1 for the fake upstreams: it records each request, answers
it with a test's script, writes SSE as the real servers do (chunked, flushed per event), and
notices when the client lets go of a connection (the disconnect the cancel tests wait for)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tasks.execution.runners import TaskCancelled


class Disconnected(Exception):
    """The client closed the connection while the script was writing or waiting."""


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)


class Writer:
    """One answer being written. Every method raises Disconnected once the client is gone."""

    def __init__(self, handler: BaseHTTPRequestHandler, server: FakeServer) -> None:
        self.handler = handler
        self.server = server
        self.started = False

    def head(self, status: int = 200, content_type: str = "text/event-stream",
             headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.handler.send_response(status)
        self.handler.send_header("Content-Type", content_type)
        self.handler.send_header("Cache-Control", "no-cache")
        self.handler.send_header("Transfer-Encoding", "chunked")
        for name, value in (headers or {}).items():
            self.handler.send_header(name, value)
        self.handler.end_headers()
        self.handler.wfile.flush()
        self.started = True

    def json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        """A whole JSON answer (an error, a stop's result), with a Content-Length."""
        body = json.dumps(value).encode()
        self.handler.send_response(status)
        self.handler.send_header("Content-Type", "application/json")
        self.handler.send_header("Content-Length", str(len(body)))
        for name, value_ in (headers or {}).items():
            self.handler.send_header(name, value_)
        self.handler.end_headers()
        self._write(body)

    def raw(self, data: bytes) -> None:
        """Bytes of the body, as one chunk of the chunked encoding."""
        self._write(b"%x\r\n%s\r\n" % (len(data), data))

    def data(self, value: Any, *, event: str | None = None) -> None:
        """One SSE event: `event:` when named, its JSON (or text) in a `data:` line."""
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        prefix = f"event: {event}\n" if event else ""
        self.raw(f"{prefix}data: {text}\n\n".encode())

    def comment(self, text: str = "keep-alive") -> None:
        self.raw(f": {text}\n\n".encode())

    def end(self) -> None:
        """The chunked body's last chunk: a clean end of the answer."""
        self._write(b"0\r\n\r\n")

    def cut(self) -> None:
        """Drop the connection mid-answer (a crashed or restarted upstream): a reset, no end."""
        sock = self.handler.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        self.handler.close_connection = True

    def wait(self, seconds: float) -> None:
        """Send nothing for `seconds`, watching the connection: Disconnected as soon as the
        client closes it (recv answers b"" at once then; it never sends more itself)."""
        sock = self.handler.connection
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0 and not self.server.released.is_set():
            sock.settimeout(min(left, 0.02))
            try:
                gone = sock.recv(1, socket.MSG_PEEK) == b""
            except TimeoutError:
                continue
            except OSError:
                gone = True
            if gone:
                self.server.disconnected(self)
                raise Disconnected
        sock.settimeout(None)

    def hang(self) -> None:
        """Send nothing until the client goes (or the test ends)."""
        self.wait(60)

    def _write(self, data: bytes) -> None:
        try:
            self.handler.wfile.write(data)
            self.handler.wfile.flush()
        except OSError as exc:
            self.server.disconnected(self)
            raise Disconnected from exc


Script = Callable[[Writer, Request], None]


class FakeServer:
    """Routes (method, path) to scripts; `route_prefix` matches a path's start. Subclasses add
    the protocol (tests/upstreams/fake_openai.py, fake_dify.py)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.disconnects: list[float] = []  # monotonic times the client was seen gone
        self.released = threading.Event()
        self.changed = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                request = Request("POST", self.path, dict(self.headers.items()), body)
                with fake.changed:
                    fake.requests.append(request)
                    fake.changed.notify_all()
                writer = Writer(self, fake)
                try:
                    fake.answer(writer, request)
                except Disconnected:
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, writer: Writer, request: Request) -> None:
        raise NotImplementedError

    def disconnected(self, writer: Writer) -> None:
        with self.changed:
            self.disconnects.append(time.monotonic())
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout: float = 20) -> object:
        with self.changed:
            return self.changed.wait_for(predicate, timeout=timeout)

    def requests_to(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


class RecordingContext:
    """A runner's caller for tests that need what it was told exactly (emits, log lines,
    progress with its message, checks) or the exception itself; `cancel` makes the next check
    raise, as a cancelled run's does."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.emitted: list[str] = []
        self.logs: list[str] = []
        self.progressed: list[tuple[int, str | None]] = []
        self.checks = 0
        self.cancel = threading.Event()

    def emit(self, text: str) -> None:
        self.emitted.append(text)

    def log(self, message: str, level: str = "info") -> None:
        self.logs.append(message)

    def progress(self, percent: int, message: str | None = None) -> None:
        self.progressed.append((percent, message))

    @property
    def percents(self) -> list[int]:
        return [percent for percent, _ in self.progressed]

    def check(self) -> None:
        self.checks += 1
        if self.cancel.is_set():
            raise TaskCancelled("cancelled")


def cancel_later(ctx: RecordingContext, seconds: float) -> list[float]:
    """Cancel `ctx` after `seconds` (as a client would); the list gets the time it happened."""
    at: list[float] = []

    def cancel() -> None:
        at.append(time.monotonic())
        ctx.cancel.set()

    threading.Timer(seconds, cancel).start()
    return at
