"""A streamed upstream answer that a cancelled task lets go of at once, and its SSE events.

`Stream` sends one POST and reads the answer on a thread of its own; the runner's thread waits
for each piece in slices of CHECK_SECONDS and calls `check` (the run's `ctx.check`) at least
that often, so a cancelled (or deadline-passed) run stops within a fraction of a second even
while the upstream sends nothing at all. Stopping shuts the socket down, which the upstream sees
as a closed connection and which wakes the reader thread from its blocked read. (A read timeout
on the runner's own thread would not do: after one, Python's socket file refuses every further
read, so the stream could not go on.) `timeout` bounds connecting and each wait for the next
bytes, as the `http` runner's does; a keep-alive comment or ping counts as bytes.

`events` parses server-sent events as the WHATWG spec says, keeping each event's name (Dify
sends `event: ping`; OpenAI-compatible servers only `data:` lines). Lines are split, and
limited, by the `http` runner's `_lines`, so every runner reads a body alike.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from tasks.delivery import retry_policy
from tasks.execution.runners import MAX_STREAM_EVENT, RetryableError, RunnerError, _lines

# How often a waiting runner asks whether its run is still current (one indexed read each).
CHECK_SECONDS = 0.25
READ_SIZE = 65536
MAX_ERROR_BODY = 65536  # bytes of an error answer read for its message
QUEUED_PIECES = 64  # pieces the reader may be ahead of the runner before it waits


@dataclass(frozen=True)
class Event:
    name: str  # "message" unless the event had an `event:` field
    data: str
    line: int  # where it started, for error messages


def events(lines: Iterable[bytes]) -> Iterator[Event]:
    """Each event with data: `data:` lines joined by newlines, `event:` its name, a blank line
    ends it; comments, `id:` and `retry:` are ignored, and an event without data (Dify's
    `event: ping`) or cut off by the end of the body is not dispatched."""
    data: list[str] = []
    name = ""
    size = start = 0
    for number, raw in enumerate(lines, 1):
        line = raw.decode("utf-8", errors="replace")
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line:
            if data:
                yield Event(name or "message", "\n".join(data), start)
            data, name, size = [], "", 0
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            start = start if data else number
            data.append(value)
            size += len(raw)
            if size > MAX_STREAM_EVENT:
                raise RunnerError(f"upstream sent an event longer than {MAX_STREAM_EVENT:,} bytes")


def json_data(event: Event) -> Any:
    """An event's data as JSON; RunnerError naming the line when it is not."""
    try:
        return json.loads(event.data)
    except ValueError as exc:
        raise RunnerError(
            f"upstream sent invalid JSON in the event at line {event.line}: {event.data[:200]!r}"
        ) from exc


class Stream:
    """One POST of a JSON body and its answer, read on a reader thread (see the module).

    Use as a context manager: `open()` waits for the answer's head and returns its status,
    `chunks()` yields the body as it arrives, `read_error()` the start of an error answer;
    leaving the block closes the connection (never kept alive: a stream left unread must not be
    reused)."""

    def __init__(
        self,
        url: str,
        body: Any,
        headers: dict[str, str],
        *,
        timeout: float,
        check: Callable[[], None],
    ) -> None:
        parsed = urllib3.util.parse_url(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise RunnerError(f"not an http(s) URL: {url!r}")
        connection_class = HTTPSConnection if parsed.scheme == "https" else HTTPConnection
        self.url = url
        self.timeout = timeout
        self._connection = connection_class(parsed.host, parsed.port, timeout=timeout)
        self._target = parsed.request_uri
        self._payload = json.dumps(body, ensure_ascii=False).encode()
        self._headers = {"Content-Type": "application/json", **headers}
        self._check = check
        self._checked_at = time.monotonic()
        self._pieces: queue.Queue[tuple[str, Any]] = queue.Queue(QUEUED_PIECES)
        self._closed = threading.Event()
        self._lock = threading.Lock()  # orders the reader's connect against close()
        self._answered = False
        self.status = 0
        self.headers: urllib3.HTTPHeaderDict = urllib3.HTTPHeaderDict()
        self._reader = threading.Thread(target=self._read, name="upstream-stream", daemon=True)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> int:
        self._reader.start()
        kind, value = self._next()
        if kind != "head":  # the reader's failure, mapped to the runner's errors
            raise self._failure(value)
        self.status, self.headers = value
        self._answered = True
        return self.status

    def chunks(self) -> Iterator[bytes]:
        while True:
            kind, value = self._next()
            if kind == "end":
                return
            if kind == "error":
                raise self._failure(value)
            yield value

    def lines(self) -> Iterator[bytes]:
        return _lines(self.chunks(), MAX_STREAM_EVENT)

    def events(self) -> Iterator[Event]:
        return events(self.lines())

    def read_error(self) -> bytes:
        """Up to MAX_ERROR_BODY bytes of an error answer (the rest is never waited for)."""
        body = b""
        with contextlib.suppress(RetryableError):  # a broken error body still says its status
            for chunk in self.chunks():
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
        return body[:MAX_ERROR_BODY]

    def retry_after(self) -> float | None:
        return retry_policy.parse_retry_after(self.headers.get("Retry-After"))

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            sock = self._connection.sock
        if sock is not None:
            # Wakes a reader blocked in recv (close alone may not) and sends the upstream a FIN.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # --- the runner's side ---------------------------------------------------------------------

    def _next(self) -> tuple[str, Any]:
        while True:
            wait = self._checked_at + CHECK_SECONDS - time.monotonic()
            if wait <= 0:
                self._check()  # raises TaskCancelled: the caller's `with` closes the stream
                self._checked_at = time.monotonic()
                continue
            try:
                return self._pieces.get(timeout=wait)
            except queue.Empty:
                continue

    def _failure(self, exc: BaseException) -> Exception:
        """The runner's error for what stopped the reader: retryable when trying again may
        help (refused, timed out, broken off), plain when it will not (TLS, a bad URL)."""
        if isinstance(exc, RunnerError):
            return exc
        if isinstance(exc, ssl.SSLError | urllib3.exceptions.SSLError):
            return RunnerError(f"upstream TLS failed: {exc}")
        if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before timeouts: a subclass
            return RetryableError(f"upstream request failed: {exc}")
        if isinstance(exc, TimeoutError | urllib3.exceptions.TimeoutError):
            if self._answered:
                return RetryableError(f"upstream sent nothing for {self.timeout:g} s mid-answer")
            return RetryableError(f"upstream did not answer within {self.timeout:g} s")
        if isinstance(exc, OSError | http.client.HTTPException | urllib3.exceptions.HTTPError):
            return RetryableError(f"upstream answer broke off: {exc}")
        if isinstance(exc, Exception):
            return exc
        return RunnerError(f"upstream reader stopped: {exc!r}")

    # --- the reader thread ---------------------------------------------------------------------

    def _read(self) -> None:
        connection = self._connection
        try:
            connection.connect()
            with self._lock:
                if self._closed.is_set():
                    return
            connection.request(
                "POST", self._target, body=self._payload, headers=self._headers,
                preload_content=False,
            )  # fmt: skip
            response = connection.getresponse()
            if not self._put(("head", (response.status, response.headers))):
                return
            while not self._closed.is_set():
                chunk = response.read1(READ_SIZE)
                if not chunk:
                    self._put(("end", None))
                    return
                if not self._put(("chunk", chunk)):
                    return
        except BaseException as exc:  # every end reaches the runner, which decides
            if not self._closed.is_set():
                self._put(("error", exc))
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def _put(self, piece: tuple[str, Any]) -> bool:
        """Hand a piece to the runner, waiting while it is behind; False once closed."""
        while not self._closed.is_set():
            try:
                self._pieces.put(piece, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def error_message(body: bytes) -> str:
    """The upstream's own words from an error answer: OpenAI's `error.message`, vLLM's and
    Dify's `message`, FastAPI's `detail`, a bare `error` string; else the body's start."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(value, dict):
        error = value.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:2000]
        for candidate in (error, value.get("message"), value.get("detail")):
            if isinstance(candidate, str) and candidate:
                return candidate[:2000]
    return text[:500]
