"""Everything the sync and the async client share, written once, free of I/O.

Each operation is a *plan*: a generator that yields what to do next (`Request`: send it and
send the `Response` back; `Sleep`: wait; `Item`: hand this value to the caller of an iterator)
and returns the operation's result. `Taskhook` and `AsyncTaskhook` only drive plans (with
`httpx.Client` / `time.sleep`, or `httpx.AsyncClient` / `asyncio.sleep`), so every rule (the
request's shape, the error mapping, when and how long to retry, how `wait` polls, how results
are paged) lives here once. Event streams cannot be plans (their bodies are read as they come),
so they share `SSEDecoder` and `StreamState` instead.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final
from urllib.parse import parse_qs, quote, urlsplit

import httpx

from taskhook_client import errors
from taskhook_client.models import Event

FINISHED: Final = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_MAX_RETRIES: Final = 3
# A Retry-After longer than this is not waited out by a retry: the caller gets the error.
MAX_RETRY_AFTER: Final = 120.0
DEFAULT_POLL_SECONDS: Final = 1.0  # when an unfinished task's poll has no Retry-After
# An open stream sends a keepalive every 15 s: three missed ones mean the connection is dead.
STREAM_READ_TIMEOUT: Final = 45.0
DEFAULT_RECONNECT_SECONDS: Final = 2.0  # until the stream's `retry:` says otherwise
USER_AGENT: Final = "taskhook-client/0.1.0"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    params: dict[str, str] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # A transport error after the request may have reached the server: retrying is safe only
    # when a repeat cannot do the work twice (a GET, or a submit with an Idempotency-Key).
    replayable: bool = False
    timeout: float | None = None  # overrides the client's, for a request that waits server-side


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Item:
    value: Any


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: httpx.Headers
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


type Step = Request | Sleep | Item
type Plan[T] = Generator[Step, Response | None, T]


# --- requests ------------------------------------------------------------------------------


def segment(value: object) -> str:
    """An id as one path segment (a caller's id cannot add path segments or a query)."""
    return quote(str(value), safe="")


def deadline_seconds(deadline: float | timedelta | None) -> float | None:
    if deadline is None:
        return None
    return deadline.total_seconds() if isinstance(deadline, timedelta) else float(deadline)


def _without_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def submit_request(
    app_id: str,
    inputs: Mapping[str, Any],
    *,
    callback_url: str | None = None,
    callback_events: Iterable[str] | None = None,
    priority: str | None = None,
    idempotency_key: str | None = None,
    deadline: float | timedelta | None = None,
    user: str | None = None,
    prefer_wait: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Request:
    body = {"inputs": dict(inputs), "response_mode": "async"} | _without_none(
        {
            "callback_url": callback_url,
            "callback_events": list(callback_events) if callback_events is not None else None,
            "priority": priority,
            "deadline_seconds": deadline_seconds(deadline),
            "user": user,
        }
    )
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    if prefer_wait is not None:
        headers["Prefer"] = f"wait={prefer_wait}"
    return Request(
        "POST",
        f"/api/applications/{segment(app_id)}/generate",
        json=body,
        headers=headers,
        replayable=bool(idempotency_key),
        # the server holds the answer up to prefer_wait seconds before it starts answering
        timeout=None if prefer_wait is None else timeout + prefer_wait,
    )


def get_request(task_id: str) -> Request:
    return Request("GET", f"/api/tasks/{segment(task_id)}", replayable=True)


def cancel_request(task_id: str) -> Request:
    return Request("POST", f"/api/tasks/{segment(task_id)}/cancel")


def task_events_path(task_id: str) -> str:
    return f"/api/tasks/{segment(task_id)}/events"


def batch_events_path(batch_id: str) -> str:
    return f"/api/batches/{segment(batch_id)}/events"


def events_request(path: str, last_event_id: str | None) -> Request:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return Request("GET", path, headers=headers, replayable=True)


def submit_batch_request(
    app_id: str,
    items: Iterable[Mapping[str, Any]],
    *,
    callback_url: str | None = None,
    callback_events: Iterable[str] | None = None,
    priority: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Request:
    body = {"items": [dict(item) for item in items]} | _without_none(
        {
            "callback_url": callback_url,
            "callback_events": list(callback_events) if callback_events is not None else None,
            "priority": priority,
            "metadata": dict(metadata) if metadata is not None else None,
        }
    )
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return Request(
        "POST",
        f"/api/applications/{segment(app_id)}/batches",
        json=body,
        headers=headers,
        replayable=bool(idempotency_key),
    )


def get_batch_request(batch_id: str) -> Request:
    return Request("GET", f"/api/batches/{segment(batch_id)}", replayable=True)


def cancel_batch_request(batch_id: str) -> Request:
    # Cancelling twice changes nothing (docs/api.md), so a repeat after a lost answer is safe.
    return Request("POST", f"/api/batches/{segment(batch_id)}/cancel", replayable=True)


def batch_results_request(batch_id: str, after: int, limit: int | None) -> Request:
    params = {"after": str(after)} | ({"limit": str(limit)} if limit is not None else {})
    return Request(
        "GET", f"/api/batches/{segment(batch_id)}/results", params=params, replayable=True
    )


def jwks_request() -> Request:
    return Request("GET", "/.well-known/taskhook/jwks.json", replayable=True)


def default_headers(api_key: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {api_key}",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }


# --- answers -------------------------------------------------------------------------------


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """`Retry-After` in seconds (RFC 9110: delay-seconds or an HTTP date); None if absent or
    not either."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from(response: Response) -> errors.TaskhookError:
    """The exception for an error answer: the API's shape, or a generic one for anything else
    (a proxy's HTML page)."""
    kind = errors.BY_STATUS.get(response.status, errors.TaskhookError)
    delay = retry_after(response.headers)
    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
        field_name = detail.get("field")
    except (ValueError, KeyError, TypeError):
        text = response.content[:200].decode("utf-8", "replace").strip()
        code, message, field_name = "http_error", text or f"HTTP {response.status}", None
    return kind(code, message, field_name, response.status, retry_after=delay)


def retry_delay(response: Response) -> float | None:
    """How long to wait before repeating a refused request; None when it must not be repeated.
    429 and 503 mean nothing was accepted; their Retry-After says when to come back."""
    if response.status not in (429, 503):
        return None
    delay = retry_after(response.headers)
    delay = 1.0 if delay is None else delay
    return delay if delay <= MAX_RETRY_AFTER else None


def transport_delay(attempt: int) -> float:
    """Back-off after a connection error: 0.5 s, 1 s, 2 s, ... capped at 8 s."""
    return min(8.0, 0.5 * 2.0**attempt)


def retryable_transport(request: Request, exc: httpx.TransportError) -> bool:
    # A connect error means the request never left: any request may be sent again.
    return request.replayable or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def connection_failed(exc: httpx.TransportError) -> errors.ConnectionFailed:
    return errors.ConnectionFailed("connection_error", f"{type(exc).__name__}: {exc}")


# --- plans ---------------------------------------------------------------------------------


def call(request: Request, max_retries: int) -> Plan[Response]:
    """Send `request`, repeating it after 429/503 (per Retry-After) and after connection errors
    that allow it, at most `max_retries` times; an error answer raises its TaskhookError."""
    attempt = 0
    while True:
        try:
            response = yield request
        except httpx.TransportError as exc:
            if attempt >= max_retries or not retryable_transport(request, exc):
                raise connection_failed(exc) from exc
            delay = transport_delay(attempt)
        else:
            assert response is not None
            if response.status < 400:
                return response
            refused_for = retry_delay(response)
            if refused_for is None or attempt >= max_retries:
                raise error_from(response)
            delay = refused_for
        attempt += 1
        yield Sleep(delay)


def json_call(request: Request, max_retries: int) -> Plan[Any]:
    response = yield from call(request, max_retries)
    return response.json()


def wait_plan(
    task_id: str, timeout: float | None, max_retries: int, *, clock: Any = time.monotonic
) -> Plan[Any]:
    """Poll until the task has finished, sleeping what each poll's Retry-After says (never past
    the timeout); raises WaitTimeout with the last poll when the timeout comes first."""
    deadline = None if timeout is None else clock() + timeout
    while True:
        response = yield from call(get_request(task_id), max_retries)
        task = response.json()
        if task["status"] in FINISHED:
            return task
        delay = retry_after(response.headers) or DEFAULT_POLL_SECONDS
        if deadline is not None:
            remaining = deadline - clock()
            if remaining <= 0:
                raise errors.WaitTimeout(
                    f"task {task_id} is still {task['status']} after {timeout:g} s", task
                )
            delay = min(delay, remaining)
        yield Sleep(delay)


def run_plan(
    request: Request, timeout: float | None, max_retries: int, *, clock: Any = time.monotonic
) -> Plan[Any]:
    """A submit with `Prefer: wait=N`: the server answers 200 with the finished task, or 202
    when the wait ran out first; then poll for the rest of `timeout`."""
    started = clock()
    response = yield from call(request, max_retries)
    body = response.json()
    if response.status == 200 and body.get("status") in FINISHED and "app_id" in body:
        return body
    remaining = None if timeout is None else max(0.0, timeout - (clock() - started))
    return (yield from wait_plan(body["task_id"], remaining, max_retries, clock=clock))


def prefer_wait_seconds(timeout: float | None) -> int:
    """The N of `Prefer: wait=N`: whole seconds, which the server caps at the application's
    blocking timeout; no timeout asks for that whole cap (N larger than any cap)."""
    if timeout is None:
        return 3600
    return max(0, math.floor(timeout))


NEXT_LINK = re.compile(r'<([^>]*)>\s*;(?:[^,]*;)?\s*rel="?next"?', re.IGNORECASE)


def next_cursor(headers: Mapping[str, str]) -> tuple[int, int | None] | None:
    """`after` and `limit` of the results' `Link: <…?after=N&limit=L>; rel="next"`; None when
    there is no next page (every item has been read)."""
    match = NEXT_LINK.search(headers.get("link") or "")
    if match is None:
        return None
    query = parse_qs(urlsplit(match.group(1)).query)
    after = int(query["after"][0])
    limit = int(query["limit"][0]) if "limit" in query else None
    return after, limit


def batch_results_plan(
    batch_id: str,
    *,
    after: int,
    limit: int | None,
    follow: bool,
    poll_seconds: float,
    max_retries: int,
) -> Plan[None]:
    """Every finished item from `after` on, in index order, page by page along the `Link`
    cursor. A page cut short by an unfinished item is followed after `poll_seconds` when
    `follow`, else the iteration ends there (resume it with `after=<last index>`)."""
    while True:
        request = batch_results_request(batch_id, after, limit)
        response = yield from call(request, max_retries)
        count = 0
        for line in response.content.splitlines():
            if not line.strip():
                continue
            result = json.loads(line)
            count += 1
            after = result["index"]
            yield Item(result)
        cursor = next_cursor(response.headers)
        if cursor is None:
            return
        after, limit = cursor
        full = limit is not None and count >= limit
        if not full:  # stopped at an item still running
            if not follow:
                return
            yield Sleep(retry_after(response.headers) or poll_seconds)


# --- Server-Sent Events ---------------------------------------------------------------------


class SSEDecoder:
    """The WHATWG event-stream parser, fed one line (without its end) at a time."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self.alive = False  # an event or a comment came since the owner last looked

    def feed(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.alive = True  # a comment: the keepalive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, name = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        self.alive = True
        raw = "\n".join(data)
        try:
            decoded: Any = json.loads(raw)
        except ValueError:
            decoded = raw
        return Event(event=name or "message", data=decoded, id=self.last_event_id, raw=raw)


@dataclass
class StreamState:
    """One logical event stream over as many connections as it takes: where to resume, when to
    reconnect, when to give up, when it has ended."""

    final_event: str  # the event after which the server closes the stream for good
    max_retries: int
    last_event_id: str | None = None
    reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS  # the stream's `retry:` once it says
    failures: int = 0  # consecutive connections that brought neither an event nor a keepalive
    done: bool = False
    _refused_for: float | None = None

    def opened(self, response: Response) -> bool:
        """Check a connection's answer: True to read its events. False after 204 (resumed after
        the final event: the stream is `done`) and after a 429/503 to retry; other errors
        raise."""
        if response.status == 204:
            self.done = True
            return False
        if response.status >= 400:
            delay = retry_delay(response)
            if delay is None or self.failures >= self.max_retries:
                raise error_from(response)
            self._refused_for = delay
            return False
        return True

    def decoder(self) -> SSEDecoder:
        decoder = SSEDecoder()
        decoder.last_event_id = self.last_event_id
        return decoder

    def received(self, decoder: SSEDecoder, event: Event | None) -> None:
        """Note what a line brought (the server is alive if it was an event or a comment)."""
        if decoder.retry_ms is not None:
            self.reconnect_seconds = decoder.retry_ms / 1000
        if decoder.alive:
            decoder.alive = False
            self.failures = 0
        if event is not None:
            self.last_event_id = event.id
            self.done = event.event == self.final_event

    def next_delay(self, exc: BaseException | None = None) -> float:
        """The connection ended before the final event (the server's STREAM_MAX_SECONDS, a
        network fault, a 429/503): the delay before resuming with Last-Event-ID, or raise once
        `max_retries` connections in a row brought nothing."""
        refused, self._refused_for = self._refused_for, None
        self.failures += 1
        if self.failures > self.max_retries:
            if isinstance(exc, httpx.TransportError):
                raise connection_failed(exc) from exc
            raise errors.ConnectionFailed(
                "stream_dropped", f"the event stream ended {self.failures} times without events"
            )
        return refused if refused is not None else self.reconnect_seconds


def stream_timeout(timeout: float) -> httpx.Timeout:
    return httpx.Timeout(timeout, read=max(timeout, STREAM_READ_TIMEOUT))
