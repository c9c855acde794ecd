"""The http runner's streaming mode against real upstreams on 127.0.0.1 that write their answer
piece by piece: SSE (OpenAI-compatible) and NDJSON, chunked and close-delimited."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tasks.execution import runners
from tasks.execution.executor import execute_task
from tasks.execution.runners import RunnerError, TaskCancelled
from tasks.models import Task


class Caller:
    """The runner's caller (as the executor is): its config, and what the runner reported."""

    def __init__(self, config: dict[str, Any], *, cancel_at: int | None = None) -> None:
        self.config = config
        self.emitted: list[tuple[float, str]] = []
        self.logs: list[str] = []
        self.cancel_at = cancel_at  # emit raises TaskCancelled at this piece, as when cancelled
        self.changed = threading.Condition()

    def emit(self, text: str) -> None:
        with self.changed:
            self.emitted.append((time.monotonic(), text))
            self.changed.notify_all()
        if self.cancel_at is not None and len(self.emitted) >= self.cancel_at:
            raise TaskCancelled("cancelled")

    def progress(self, percent: int, message: str | None = None) -> None:
        pass

    def log(self, message: str, level: str = "info") -> None:
        self.logs.append(message)

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.emitted]

    def wait_for_pieces(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.emitted) >= count, timeout=10)


class Answer:
    """One upstream answer being written, a write at a time, flushed."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self.handler = handler
        self.chunked = True

    def head(self, content_type: str = "text/event-stream", status: int = 200, *,
             chunked: bool = True) -> None:  # fmt: skip
        self.chunked = chunked
        self.handler.send_response(status)
        self.handler.send_header("Content-Type", content_type)
        if chunked:
            self.handler.send_header("Transfer-Encoding", "chunked")
        else:  # the body ends when the connection closes
            self.handler.send_header("Connection", "close")
            self.handler.close_connection = True
        self.handler.end_headers()

    def send(self, data: bytes) -> None:
        self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        self.handler.wfile.flush()
        time.sleep(0.005)  # apart on the wire, as a model's tokens are

    def end(self) -> None:
        if self.chunked:
            self.handler.wfile.write(b"0\r\n\r\n")


class Upstream:
    """A real HTTP server on 127.0.0.1 answering every POST with `answer(Answer)`."""

    def __init__(self, answer: Callable[[Answer], None]) -> None:
        self.bodies: list[Any] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                upstream.bodies.append(json.loads(self.rfile.read(length)))
                try:
                    answer(Answer(self))
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        serve = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        serve.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"


class Upstreams:
    """The upstreams a test started; `released` is set when the test is over, ending those that
    stall."""

    def __init__(self) -> None:
        self.started: list[Upstream] = []
        self.released = threading.Event()

    def start(self, answer: Callable[[Answer], None]) -> Upstream:
        self.started.append(Upstream(answer))
        return self.started[-1]


@pytest.fixture
def upstream() -> Iterator[Upstreams]:
    upstreams = Upstreams()
    yield upstreams
    upstreams.released.set()
    for server in upstreams.started:
        server.server.shutdown()
        server.server.server_close()


def chat_chunk(content: str | None = None, *, role: str | None = None,
               finish: str | None = None) -> dict[str, Any]:  # fmt: skip
    delta = {key: value for key, value in (("role", role), ("content", content)) if value}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "object": "chat.completion.chunk",
        "model": "tiny-llm",
        "choices": [choice],
        "usage": None,
    }


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def sse(value: Any) -> bytes:
    return b"data: %s\n\n" % json.dumps(value).encode()


def ndjson(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


def run(
    config: dict[str, Any], inputs: dict[str, Any] | None = None, **caller
) -> tuple[Any, Caller]:
    ctx = Caller({"timeout": 5, **config}, **caller)
    return runners.http(inputs or {}, ctx), ctx


def test_openai_stream_gives_a_completion_shaped_output(upstream):
    def answer(w: Answer) -> None:
        w.head()
        usage_chunk = {**chat_chunk(), "choices": [], "usage": USAGE}
        for chunk in (chat_chunk(role="assistant"), chat_chunk("Hello"), chat_chunk(" world"),
                      chat_chunk(finish="stop"), usage_chunk):  # fmt: skip
            w.send(sse(chunk))
        w.send(b"data: [DONE]\n\n")
        w.end()

    server = upstream.start(answer)
    inputs = {"model": "tiny-llm", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    output, ctx = run({"url": server.url, "stream": "sse"}, inputs)
    assert output == {"text": "Hello world", "chunks": 5, "finish_reason": "stop",
                      "usage": USAGE, "model": "tiny-llm"}  # fmt: skip
    assert ctx.texts == ["Hello", " world"]  # chunks without text emit nothing
    assert server.bodies == [inputs]


FRAMINGS = {
    "sse-chunked": ("text/event-stream", True, lambda text: sse(chat_chunk(text)), {}),
    "ndjson-close-delimited": (
        "application/x-ndjson",
        False,
        lambda text: ndjson({"model": "llama", "message": {"content": text}, "done": False}),
        {"stream_text": "message.content"},
    ),
}


@pytest.mark.parametrize("framing", FRAMINGS)
def test_pieces_are_emitted_while_the_rest_is_still_coming(upstream, framing):
    content_type, chunked, encode, config = FRAMINGS[framing]
    last_chunk_allowed = threading.Event()

    def answer(w: Answer) -> None:
        w.head(content_type, chunked=chunked)
        w.send(encode("Hel"))
        w.send(encode("lo"))
        last_chunk_allowed.wait(10)
        w.send(encode(" world"))
        w.end()

    ctx = Caller({"url": upstream.start(answer).url, "stream": "auto", "timeout": 20, **config})
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(runners.http, {}, ctx)
        # The upstream holds its last chunk back until the first two were emitted.
        assert ctx.wait_for_pieces(2), "nothing was emitted before the answer was complete"
        assert ctx.texts == ["Hel", "lo"]
        last_chunk_allowed.set()
        output = running.result(timeout=20)
    assert ctx.texts == ["Hel", "lo", " world"]
    assert output["text"] == "Hello world" and output["chunks"] == 3


def test_done_ends_the_stream_even_if_the_upstream_keeps_it_open(upstream):
    def answer(w: Answer) -> None:
        w.head()
        w.send(sse(chat_chunk("only this")))
        w.send(b"data: [DONE]\n\n" + sse(chat_chunk("never read")))
        upstream.released.wait(
            30
        )  # the connection stays open: only [DONE] ends the runner's reading

    output, ctx = run({"url": upstream.start(answer).url, "stream": "sse"})
    assert ctx.texts == ["only this"] and output["chunks"] == 1


def test_sse_is_parsed_as_the_spec_says(upstream):
    def answer(w: Answer) -> None:
        w.head("text/event-stream; charset=utf-8")
        w.send(b": keep-alive comment\r\nevent: token\r\nid: 1\r\nretry: 100\r\n")
        w.send(b"data: first line\r\ndata:second line\r\n\r\n")
        w.send(b'data: {"choices": [{"text":\r\ndata: "legacy"}]}\r\n\r\n')  # JSON over 2 lines
        w.send(b"data: a\r")  # a CRLF split across two writes
        w.send(b"\ndata: b\r\n\r\n\n\n")  # blank lines without data are no event
        w.send(b"data: cut off by the end of the body\r\n")
        w.end()

    output, ctx = run({"url": upstream.start(answer).url, "stream": "auto"})
    assert ctx.texts == ["first line\nsecond line", "legacy", "a\nb"]
    assert output == {"text": "first line\nsecond linelegacya\nb", "chunks": 3,
                      "finish_reason": None, "usage": None, "model": None}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "body", "error"),
    [
        ("ndjson", b'"one"\n\n"two"\n{"message": \n"never"\n',
         "upstream sent invalid JSON on line 4: '{\"message\": '"),
        ("sse", b'data: one\n\ndata: two\n\ndata: {"choices": [\n\n' + sse("never"),
         "upstream sent invalid JSON in the event at line 5: '{\"choices\": ['"),
    ],
    ids=["ndjson", "sse"],
)  # fmt: skip
def test_invalid_json_names_its_line(upstream, kind, body, error):
    def answer(w: Answer) -> None:
        w.head("application/octet-stream")  # the configured kind wins over the type
        w.send(body)
        w.end()

    ctx = Caller({"url": upstream.start(answer).url, "stream": kind, "timeout": 5})
    with pytest.raises(RunnerError) as failed:
        runners.http({}, ctx)
    assert str(failed.value) == error
    assert ctx.texts == ["one", "two"]


def test_an_error_answer_is_reported_without_reading_it_all(upstream):
    def answer(w: Answer) -> None:
        w.head("text/plain", status=500)
        w.send(b"model overloaded " + b"x" * 2000)
        upstream.released.wait(30)  # the rest never comes: the runner must not wait for it

    with pytest.raises(RunnerError) as failed:
        run({"url": upstream.start(answer).url, "stream": "sse"})
    message = str(failed.value)
    assert message.startswith("upstream answered HTTP 500: model overloaded xxx")
    assert len(message.split(": ", 1)[1]) == 500


def test_an_upstream_stalling_mid_stream_times_out(upstream):
    def answer(w: Answer) -> None:
        w.head()
        w.send(sse(chat_chunk("Hel")))
        upstream.released.wait(30)

    with pytest.raises(RunnerError, match=r"^upstream sent nothing for 0\.5 s mid-answer$"):
        run({"url": upstream.start(answer).url, "stream": "sse", "timeout": 0.5})


def test_a_refused_connection_is_clear():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RunnerError, match=r"^upstream request failed"):
        run({"url": f"http://127.0.0.1:{port}/", "stream": "sse"})


def test_a_cancelled_task_stops_reading_and_closes_the_upstream_connection(upstream):
    upstream_saw_close = threading.Event()

    def answer(w: Answer) -> None:
        w.head()
        w.send(sse(chat_chunk("Hel")))
        w.handler.connection.settimeout(10)
        try:
            closed = w.handler.connection.recv(1) == b""
        except ConnectionResetError:  # closed with bytes it had not read
            closed = True
        if closed:
            upstream_saw_close.set()

    with pytest.raises(TaskCancelled) as cancelled:
        run({"url": upstream.start(answer).url, "stream": "sse"}, cancel_at=1)
    assert upstream_saw_close.wait(10), "the runner left the upstream connection open"
    assert cancelled.value.args == ("cancelled",)


def test_limits_on_a_line_an_event_and_the_whole_text(upstream):
    def answer_with(body_parts: list[bytes]) -> Callable[[Answer], None]:
        def answer(w: Answer) -> None:
            w.head()
            for part in body_parts:
                w.send(part)
            w.end()

        return answer

    long_line = [b'"' + b"x" * 600_000, b"x" * 600_000 + b'"\n']  # one line in two writes
    with pytest.raises(RunnerError, match=r"a line longer than 1,000,000 bytes"):
        run({"url": upstream.start(answer_with(long_line)).url, "stream": "ndjson"})

    long_event = [b"data: %s\n" % (b"x" * 600_000)] * 2 + [b"\n"]
    with pytest.raises(RunnerError, match=r"an event longer than 1,000,000 bytes"):
        run({"url": upstream.start(answer_with(long_event)).url, "stream": "sse"})

    piece = "y" * 950_000
    too_much = [ndjson(piece)] * 11
    ctx = Caller(
        {"url": upstream.start(answer_with(too_much)).url, "stream": "ndjson", "timeout": 5}
    )
    with pytest.raises(RunnerError, match=r"more than 10,000,000 characters"):
        runners.http({}, ctx)
    assert ctx.texts == [piece] * 10


@pytest.mark.parametrize("stream", ["auto", True])
def test_auto_reads_a_plain_json_answer_as_before(upstream, stream):
    def answer(w: Answer) -> None:
        body = b'{"choices": [{"message": {"content": "whole"}}]}'
        w.handler.send_response(200)
        w.handler.send_header("Content-Type", "application/json")
        w.handler.send_header("Content-Length", str(len(body)))
        w.handler.end_headers()
        w.handler.wfile.write(body)

    output, ctx = run({"url": upstream.start(answer).url, "stream": stream})
    assert output == {"choices": [{"message": {"content": "whole"}}]} and ctx.texts == []


def test_an_unknown_stream_mode_is_refused():
    with pytest.raises(
        RunnerError, match=r"^runner_config\.stream must be one of sse, ndjson, auto"
    ):
        run({"url": "http://127.0.0.1:9/", "stream": "websocket"})


@pytest.mark.parametrize(
    ("value", "path", "text"),
    [
        (chat_chunk("hi"), None, "hi"),
        ({"choices": [{"text": "legacy"}]}, None, "legacy"),
        ({"message": {"content": "ollama"}}, "message.content", "ollama"),
        ({"token": {"text": "tgi"}}, "token.text", "tgi"),
        ({"output": [{"content": [{"text": "nested"}]}]}, "output.0.content.0.text", "nested"),
        ({"output": []}, "output.0.content", ""),
        ({"token": {"text": 7}}, "token.text", ""),  # not text: nothing
        (chat_chunk("hi"), "message.content", ""),  # a configured path replaces OpenAI's
        ("a JSON string", "message.content", "a JSON string"),
        ([1, 2], None, ""),
    ],
)
def test_chunk_text(value, path, text):
    assert runners._chunk_text(value, path) == text


def test_lines_do_not_depend_on_where_the_body_is_cut():
    body = b"a\r\nb\n\nc\rd\r\n\re"
    for cut in range(len(body) + 1):
        for second_cut in range(cut, len(body) + 1):
            chunks = [body[:cut], body[cut:second_cut], body[second_cut:]]
            assert list(runners._lines(chunks, 100)) == [b"a", b"b", b"", b"c", b"d", b"", b"e"]


def test_sse_events_field_rules():
    lines = [b"\xef\xbb\xbfdata:  two spaces", b"data", b"id: 3", b":data: comment", b"",
             b"event: only", b"", b"data: last"]  # fmt: skip
    assert list(runners._sse_events(lines)) == [(1, " two spaces\n")]


@pytest.mark.django_db
def test_a_streamed_task_succeeds_through_the_executor(make_app, upstream):
    def answer(w: Answer) -> None:
        w.head()
        for text in ("Stream", "ed ", "answer"):
            w.send(sse(chat_chunk(text)))
        w.send(sse(chat_chunk(finish="stop")) + b"data: [DONE]\n\n")
        w.end()

    app = make_app("http", runner_config={"url": upstream.start(answer).url, "stream": "sse"})
    task = Task.objects.create(application=app.application, inputs={"stream": True})
    execute_task(task_id=str(task.id), run=1, worker_name="inline")
    task.refresh_from_db()
    assert task.status == "succeeded", task.error
    assert task.output == {"text": "Streamed answer", "chunks": 4, "finish_reason": "stop",
                           "usage": None, "model": "tiny-llm"}  # fmt: skip
