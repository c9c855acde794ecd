"""A fake Dify app API, as Dify's service API documents it.

POST /v1/workflows/run and /v1/chat-messages with `response_mode: "streaming"` answer chunked
`text/event-stream`: each event one `data: {...}` line whose JSON names it (`event`) and carries
the run's `task_id` (and `workflow_run_id`, or `message_id` and `conversation_id`); keep-alive
pings are `event: ping` with no data. Errors before the stream are Dify's
`{"code", "message", "status"}`; mid-stream an `error` event. POST
/v1/workflows/tasks/{task_id}/stop and /v1/chat-messages/{task_id}/stop with `{"user"}` answer
`{"result": "success"}` and stop the run when the user is the run's, which then ends its stream
with workflow_finished `stopped` (or message_end), as Dify does.

A test sets `workflow_script` / `chat_script(run)` to write a run's events with a `Run`."""

from __future__ import annotations

import itertools
import re
import select
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.upstreams.base import FakeServer, Request, Writer

WORKFLOW_PATH = "/v1/workflows/run"
CHAT_PATH = "/v1/chat-messages"
STOP_PATH = re.compile(r"^/v1/(workflows/tasks|chat-messages)/([^/]+)/stop$")
USAGE = {
    "prompt_tokens": 1033, "prompt_unit_price": "0.001", "prompt_price_unit": "0.001",
    "prompt_price": "0.0010330", "completion_tokens": 135, "completion_unit_price": "0.002",
    "completion_price_unit": "0.001", "completion_price": "0.0002700", "total_tokens": 1168,
    "total_price": "0.0013030", "currency": "USD", "latency": 1.381760165997548,
}  # fmt: skip


def dify_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "status": status}


@dataclass
class Stop:
    kind: str  # "workflows/tasks" or "chat-messages"
    task_id: str
    user: Any
    at: float
    # Whether the client had already closed the run's stream when the stop came (its end of
    # the connection readable: the EOF is there), None for a run this server does not know.
    stream_gone: bool | None = None


class Run:
    """One streamed run: writes its events with the ids Dify would give them."""

    _node_ids = itertools.count(1745912968134)

    def __init__(self, writer: Writer, request: Request, server: FakeDify) -> None:
        self.w = writer
        self.request = request
        self.server = server
        self.task_id = str(uuid.uuid4())
        self.workflow_run_id = str(uuid.uuid4())
        self.message_id = str(uuid.uuid4())
        self.conversation_id = request.body.get("conversation_id") or str(uuid.uuid4())
        self.chat = request.path == CHAT_PATH
        self.stopped = threading.Event()
        self.index = 0
        self.steps = 0

    def send(self, event: str, **fields: Any) -> None:
        ids: dict[str, Any] = {"task_id": self.task_id}
        if self.chat:
            ids |= {"id": self.message_id, "message_id": self.message_id,
                    "conversation_id": self.conversation_id}  # fmt: skip
        if not self.chat or event.startswith(("workflow_", "node_")):
            ids["workflow_run_id"] = self.workflow_run_id
        self.w.data({"event": event, **ids, **fields, "created_at": int(time.time())})

    def ping(self) -> None:
        self.w.raw(b"event: ping\n\n")

    def workflow_started(self) -> None:
        self.send("workflow_started", data={
            "id": self.workflow_run_id, "workflow_id": "wf-fake",
            "inputs": self.request.body.get("inputs"), "created_at": int(time.time()),
        })  # fmt: skip

    def node_started(self, title: str, node_type: str) -> dict[str, Any]:
        self.index += 1
        node = {"id": str(uuid.uuid4()), "node_id": str(next(self._node_ids)),
                "node_type": node_type, "title": title, "index": self.index,
                "predecessor_node_id": None, "inputs": None,
                "created_at": int(time.time())}  # fmt: skip
        self.send("node_started", data=node)
        return node

    def node_finished(self, node: dict[str, Any], *, outputs: Any = None,
                      status: str = "succeeded", error: str | None = None) -> None:  # fmt: skip
        self.steps += 1
        self.send("node_finished", data={
            **node, "process_data": None, "outputs": outputs, "status": status, "error": error,
            "elapsed_time": 0.324,
            "execution_metadata": {"total_tokens": 63, "total_price": 0.0012, "currency": "USD"},
        })  # fmt: skip

    def node(self, title: str, node_type: str, outputs: Any = None) -> None:
        self.node_finished(self.node_started(title, node_type), outputs=outputs)

    def text_chunk(self, text: str) -> None:
        self.send("text_chunk", data={"text": text, "from_variable_selector": ["1745912968135",
                                                                              "text"]})  # fmt: skip

    def workflow_finished(self, outputs: Any = None, *, status: str = "succeeded",
                          error: str | None = None) -> None:  # fmt: skip
        self.send("workflow_finished", data={
            "id": self.workflow_run_id, "workflow_id": "wf-fake", "status": status,
            "outputs": outputs, "error": error, "elapsed_time": 1.25, "total_tokens": 1168,
            "total_steps": self.steps, "created_at": int(time.time()),
            "finished_at": int(time.time()),
        })  # fmt: skip

    def message(self, answer: str) -> None:
        self.send("message", answer=answer)

    def message_end(self, usage: dict[str, Any] | None = None) -> None:
        self.send("message_end", metadata={"usage": usage or USAGE, "retriever_resources": []})

    def error(self, status: int, code: str, message: str) -> None:
        self.send("error", status=status, code=code, message=message)

    def until_stopped(self, ping_every: float | None = None) -> None:
        """Run on (sending nothing but pings, if any) until stopped through the API, then end
        the stream as Dify does; Disconnected if the client goes first."""
        while not self.stopped.is_set():
            self.w.wait(ping_every or 0.05)
            if ping_every:
                self.ping()
        if self.chat:
            self.message_end()
        else:
            self.workflow_finished(status="stopped", error="stopped by user")
        self.w.end()


def workflow_reply(run: Run) -> None:
    """An ordinary workflow: start, an LLM node streaming its text, end; pings between."""
    run.w.head(content_type="text/event-stream; charset=utf-8")
    run.workflow_started()
    run.node("Start", "start", outputs=run.request.body.get("inputs"))
    llm = run.node_started("LLM", "llm")
    run.ping()
    for piece in ("Dify ", "says ", "hi"):
        run.text_chunk(piece)
    run.node_finished(llm, outputs={"text": "Dify says hi"})
    run.node("End", "end", outputs={"answer": "Dify says hi"})
    run.workflow_finished({"answer": "Dify says hi"})
    run.w.end()


def chat_reply(run: Run) -> None:
    """An ordinary chat app answer: message events, then message_end with the usage."""
    run.w.head(content_type="text/event-stream; charset=utf-8")
    for piece in ("I", " can", " help"):
        run.message(piece)
    run.ping()
    run.message_end()
    run.w.end()


class FakeDify(FakeServer):
    def __init__(self, *, api_key: str | None = "app-fake-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.workflow_script: Callable[[Run], None] = workflow_reply
        self.chat_script: Callable[[Run], None] = chat_reply
        self.runs: dict[str, Run] = {}
        self.stops: list[Stop] = []
        self.base_url = self.origin

    def answer(self, writer: Writer, request: Request) -> None:
        auth = request.headers.get("Authorization") or ""
        if self.api_key and not auth.startswith("Bearer "):
            writer.json(401, dify_error(401, "unauthorized", "Authorization header must be "
                                        "provided and start with 'Bearer'"))  # fmt: skip
            return
        if self.api_key and auth != f"Bearer {self.api_key}":
            writer.json(401, dify_error(401, "unauthorized", "Access token is invalid"))
            return
        if stop := STOP_PATH.match(request.path):
            self._stop(writer, request, stop.group(1), stop.group(2))
            return
        if request.path not in (WORKFLOW_PATH, CHAT_PATH):
            writer.json(404, dify_error(404, "not_found", "The requested URL was not found."))
            return
        problem = self._invalid(request)
        if problem:
            writer.json(400, dify_error(400, "invalid_param", problem))
            return
        run = Run(writer, request, self)
        with self.changed:
            self.runs[run.task_id] = run
            self.changed.notify_all()
        (self.chat_script if run.chat else self.workflow_script)(run)

    def _invalid(self, request: Request) -> str | None:
        body = request.body
        if not isinstance(body, dict):
            return "The browser (or proxy) sent a request that this server could not understand."
        if not isinstance(body.get("inputs"), dict):
            return "inputs is required in input form"
        if body.get("response_mode") not in ("blocking", "streaming"):
            return "response_mode must be blocking or streaming"
        if not body.get("user"):
            return "user is required"
        if request.path == CHAT_PATH and not body.get("query"):
            return "query is required"
        return None

    def _stop(self, writer: Writer, request: Request, kind: str, task_id: str) -> None:
        user = (request.body or {}).get("user")
        if not user:
            writer.json(400, dify_error(400, "invalid_param", "user is required"))
            return
        run = self.runs.get(task_id)
        stream_gone = None
        if run is not None:
            try:  # select, not a peek: the run's own thread owns the socket's timeout
                stream_gone = bool(select.select([run.w.handler.connection], [], [], 0)[0])
            except (OSError, ValueError):  # already closed on this side
                stream_gone = True
        with self.changed:
            self.stops.append(Stop(kind, task_id, user, time.monotonic(), stream_gone))
            self.changed.notify_all()
        if run is not None and run.request.body.get("user") == user:
            run.stopped.set()
        writer.json(200, {"result": "success"})
