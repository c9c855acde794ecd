"""Runners: the code a worker calls to do a task's work, `run(inputs, ctx) -> dict`.

Built-ins are named (`echo`, `sleep`, `fail`, `http`; `openai` and `dify`, whose code is in
tasks.execution.upstreams); any other runner is a dotted path to a callable. `ctx.progress(n)`,
`ctx.log(msg)` and `ctx.emit(text)` (a piece of streamed output) report to the task's event
stream and dashboard, and raise `TaskCancelled` once the task was cancelled, which is how a
cooperative runner stops early; `ctx.check()` does only that, for a runner waiting on something
between those calls. A runner raises `RunnerError` for a clear failure, and `RetryableError` for
one that may go away by itself (an upstream down or overloaded): the application's automatic
retries (tasks.execution.auto_retry) then run the task again. The `http` runner raises it for a
connection error, a timeout, a 5xx or a 429.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import urllib3
from django.utils.module_loading import import_string

from tasks.delivery import retry_policy


class RunnerError(Exception):
    """A runner's clear, expected failure (bad upstream answer, bad input)."""


class RetryableError(RunnerError):
    """A failure that may go away by itself (an upstream down, overloaded, slow): with automatic
    retries on (`auto_retry`), the task runs again after a backoff instead of failing.
    `retry_after`: the least wait in seconds the upstream asked for (its Retry-After), if any."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TaskCancelled(Exception):
    """Raised inside a runner when its task was cancelled or its run is no longer current."""


class RunContext(Protocol):
    config: dict[str, Any]

    def progress(self, percent: int, message: str | None = None) -> None: ...

    def log(self, message: str, level: str = "info") -> None: ...

    def emit(self, text: str) -> None: ...

    def check(self) -> None:
        """Raise TaskCancelled when the run is no longer current: for a runner that waits on
        something (an upstream's silence) between the calls above."""


Runner = Callable[[dict[str, Any], RunContext], Any]


def echo(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    return inputs


def sleep(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Sleep `inputs.seconds` (default 1), reporting progress about ten times along the way."""
    try:
        seconds = float(inputs.get("seconds", 1))
    except (TypeError, ValueError) as exc:
        raise RunnerError("inputs.seconds must be a number") from exc
    if not 0 <= seconds <= 24 * 3600:
        raise RunnerError("inputs.seconds must be between 0 and 86400")
    steps = max(1, min(10, int(seconds * 10)))
    ctx.log(f"sleeping {seconds:g} s")
    for step in range(1, steps + 1):
        time.sleep(seconds / steps)
        ctx.progress(step * 100 // steps)
    return {"slept": seconds}


def fail(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    raise RunnerError(str(inputs.get("message") or "fail runner raised as asked"))


STREAM_MODES = ("sse", "ndjson", "auto")
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")
MAX_STREAM_TEXT = 10_000_000  # characters of joined text one streamed answer may produce
MAX_STREAM_EVENT = 1_000_000  # bytes of one NDJSON line or SSE event
READ_SIZE = 65536
OPENAI_TEXT_PATHS = ("choices.0.delta.content", "choices.0.text")  # chat, legacy completions


def http(inputs: dict[str, Any], ctx: RunContext) -> Any:
    """POST the inputs as JSON to `runner_config.url` and return the JSON it answers.

    `runner_config.stream` ("sse", "ndjson", or "auto": by the answer's Content-Type, reading any
    other type as plain JSON; `true` means "auto") reads the answer as it arrives and sends each
    chunk's text to `ctx.emit` at once; the inputs must ask the upstream for a stream themselves
    (`"stream": true` for OpenAI-compatible servers). A chunk's text is at
    `runner_config.stream_text` (a dotted path, list indices as numbers: "message.content"), else
    at OpenAI's `choices.0.delta.content` (chat) or `choices.0.text` (completions); SSE data that
    is not JSON, and a chunk that is a JSON string, is text itself; `data: [DONE]` ends an SSE
    stream. A stream's output is `{"text": the pieces joined, "chunks": SSE events or NDJSON
    values received, "finish_reason", "usage", "model"}`, each of the last three from the last
    chunk that had it (else null). Text is capped at MAX_STREAM_TEXT characters, one line or
    event at MAX_STREAM_EVENT bytes. `runner_config.timeout` bounds connecting and each wait for
    the next bytes.

    A connection error, a timeout (connecting, waiting, mid-stream), a 5xx or a 429 raises
    RetryableError (with the answer's Retry-After as its hint); any other failure, a 4xx
    included, is a plain RunnerError.
    """
    url = ctx.config.get("url")
    if not url:
        raise RunnerError("the http runner needs runner_config.url")
    stream = ctx.config.get("stream") or False
    stream = "auto" if stream is True else stream
    if stream and stream not in STREAM_MODES:
        raise RunnerError(
            f"runner_config.stream must be one of {', '.join(STREAM_MODES)}, not {stream!r}"
        )
    text_path = ctx.config.get("stream_text")
    if text_path is not None and not isinstance(text_path, str):
        raise RunnerError("runner_config.stream_text must be a dotted path such as message.content")
    timeout = float(ctx.config.get("timeout", 300))
    headers = {str(k): str(v) for k, v in (ctx.config.get("headers") or {}).items()}
    ctx.log(f"POST {url}")
    response = _post(url, inputs, headers, timeout, preload=not stream)
    if not stream:
        return _json_answer(response, response.data)
    try:
        if not 200 <= response.status < 300:
            _check_status(response, _read_at_most(response, 500, timeout))
        kind = stream if stream != "auto" else _stream_kind(response.headers.get("Content-Type"))
        if kind is None:
            return _json_answer(response, b"".join(_body_chunks(response, timeout)))
        lines = _lines(_body_chunks(response, timeout), MAX_STREAM_EVENT)
        values = _sse_values(lines) if kind == "sse" else _ndjson_values(lines)
        return _emit_stream(values, ctx, text_path)
    finally:
        # Closed, not kept alive: a stream left unread (cancelled, failed) must not be reused.
        response.close()
        response.release_conn()


def _post(
    url: str, inputs: dict[str, Any], headers: dict[str, str], timeout: float, *, preload: bool
) -> urllib3.BaseHTTPResponse:
    try:
        return urllib3.request(
            "POST",
            url,
            json=inputs,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=False,
            redirect=False,
            preload_content=preload,
        )
    except urllib3.exceptions.NewConnectionError as exc:  # before TimeoutError: a subclass
        raise RetryableError(f"upstream request failed: {exc}") from exc
    except urllib3.exceptions.TimeoutError as exc:
        raise RetryableError(f"upstream did not answer within {timeout:g} s") from exc
    except urllib3.exceptions.ProtocolError as exc:  # the connection dropped mid-request
        raise RetryableError(f"upstream request failed: {exc}") from exc
    except urllib3.exceptions.HTTPError as exc:  # a bad URL, TLS refused: trying again won't do
        raise RunnerError(f"upstream request failed: {exc}") from exc


def _check_status(response: urllib3.BaseHTTPResponse, body: bytes) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    message = f"upstream answered HTTP {status}: {body.decode('utf-8', errors='replace')[:500]}"
    if status >= 500 or status == 429:  # down or overloaded: may pass; any other 4xx will not
        hint = retry_policy.parse_retry_after(response.headers.get("Retry-After"))
        raise RetryableError(message, retry_after=hint)
    raise RunnerError(message)


def _json_answer(response: urllib3.BaseHTTPResponse, body: bytes) -> Any:
    _check_status(response, body)
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError as exc:
        text = body.decode("utf-8", errors="replace")
        raise RunnerError(f"upstream answered invalid JSON: {text[:200]!r}") from exc


def _stream_kind(content_type: str | None) -> str | None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return "sse" if media == "text/event-stream" else "ndjson" if media in NDJSON_TYPES else None


def _body_chunks(response: urllib3.BaseHTTPResponse, timeout: float) -> Iterator[bytes]:
    """The body as it arrives: `read1` returns what has come, chunked or not, without waiting
    for a full buffer."""
    try:
        while chunk := response.read1(READ_SIZE):
            yield chunk
    except urllib3.exceptions.TimeoutError as exc:
        raise RetryableError(f"upstream sent nothing for {timeout:g} s mid-answer") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise RetryableError(f"upstream answer broke off: {exc}") from exc


def _read_at_most(response: urllib3.BaseHTTPResponse, limit: int, timeout: float) -> bytes:
    body = b""
    for chunk in _body_chunks(response, timeout):
        body += chunk
        if len(body) >= limit:
            break
    return body[:limit]


def _lines(chunks: Iterable[bytes], limit: int) -> Iterator[bytes]:
    """The lines of a body arriving in chunks (ended by CRLF, LF or CR), without their ends."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        # A CR at the end may be half of a CRLF: it waits for the next chunk.
        end = len(pending) - 1 if pending.endswith(b"\r") else len(pending)
        complete = max(pending.rfind(b"\n", 0, end), pending.rfind(b"\r", 0, end)) + 1
        if complete:
            yield from pending[:complete].splitlines()
            pending = pending[complete:]
        if len(pending) > limit:
            raise RunnerError(f"upstream sent a line longer than {limit:,} bytes")
    yield from pending.splitlines()


def _sse_events(lines: Iterable[bytes]) -> Iterator[tuple[int, str]]:
    """(line number, data) of each server-sent event with data, as the SSE spec parses them:
    `data:` lines joined by newlines, a blank line ends the event, comments and other fields
    ignored, an event cut off by the end of the body dropped."""
    data: list[str] = []
    size = start = 0
    for number, raw in enumerate(lines, 1):
        line = raw.decode("utf-8", errors="replace")
        if number == 1:
            line = line.removeprefix("\ufeff")  # the spec's optional byte order mark
        if not line:
            if data:
                yield start, "\n".join(data)
            data, size = [], 0
            continue
        name, _, value = line.partition(":")
        if name != "data":  # "" is a comment; event, id and retry do not change the text
            continue
        value = value.removeprefix(" ")
        start = start if data else number
        data.append(value)
        size += len(raw)
        if size > MAX_STREAM_EVENT:
            raise RunnerError(f"upstream sent an event longer than {MAX_STREAM_EVENT:,} bytes")


def _sse_values(lines: Iterable[bytes]) -> Iterator[Any]:
    """Each event's data, parsed when it is JSON (it starts with `{` or `[`), else the text."""
    for number, data in _sse_events(lines):
        if data.strip() == "[DONE]":
            return
        if data.lstrip()[:1] not in ("{", "["):
            yield data
            continue
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise RunnerError(
                f"upstream sent invalid JSON in the event at line {number}: {data[:200]!r}"
            ) from exc
        yield value


def _ndjson_values(lines: Iterable[bytes]) -> Iterator[Any]:
    """The JSON value of each line that is not blank."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            text = line[:200].decode(errors="replace")
            raise RunnerError(f"upstream sent invalid JSON on line {number}: {text!r}") from exc
        yield value


def _chunk_text(value: Any, path: str | None) -> str:
    """The text piece of one chunk ("" when it has none): see `http`."""
    if isinstance(value, str):
        return value
    for candidate in (path,) if path else OPENAI_TEXT_PATHS:
        found = _at_path(value, candidate)
        if isinstance(found, str):
            return found
    return ""


def _at_path(value: Any, path: str) -> Any:
    for key in path.split("."):
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isascii() and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _emit_stream(values: Iterable[Any], ctx: RunContext, path: str | None) -> dict[str, Any]:
    pieces: list[str] = []
    chunks = size = 0
    output: dict[str, Any] = {"finish_reason": None, "usage": None, "model": None}
    for value in values:
        chunks += 1
        piece = _chunk_text(value, path)
        if piece:
            size += len(piece)
            if size > MAX_STREAM_TEXT:
                raise RunnerError(f"upstream streamed more than {MAX_STREAM_TEXT:,} characters")
            ctx.emit(piece)
            pieces.append(piece)
        if isinstance(value, dict):
            seen = {
                "finish_reason": _at_path(value, "choices.0.finish_reason"),
                "usage": value.get("usage"),
                "model": value.get("model"),
            }
            output.update({key: found for key, found in seen.items() if found is not None})
    return {"text": "".join(pieces), "chunks": chunks, **output}


def openai(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """A chat completion from an OpenAI-compatible server: tasks.execution.upstreams.openai."""
    from tasks.execution.upstreams import openai as upstream  # it imports this module

    return upstream.run(inputs, ctx)


def dify(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """A run of a Dify workflow or chat app: tasks.execution.upstreams.dify."""
    from tasks.execution.upstreams import dify as upstream  # it imports this module

    return upstream.run(inputs, ctx)


BUILTIN_RUNNERS: dict[str, Runner] = {
    "echo": echo, "sleep": sleep, "fail": fail, "http": http, "openai": openai, "dify": dify,
}  # fmt: skip


def resolve_runner(name: str) -> Runner:
    """The callable behind a runner name; raises RunnerError when there is none."""
    if name in BUILTIN_RUNNERS:
        return BUILTIN_RUNNERS[name]
    if "." not in name:
        raise RunnerError(
            f"unknown runner {name!r}: use one of {', '.join(BUILTIN_RUNNERS)} or a dotted path"
        )
    try:
        runner = import_string(name)
    except ImportError as exc:
        raise RunnerError(f"cannot import runner {name!r}: {exc}") from exc
    if not callable(runner):
        raise RunnerError(f"runner {name!r} is not callable")
    return runner
