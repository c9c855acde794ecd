"""A fake OpenAI-compatible server: POST /v1/chat/completions as OpenAI, vLLM and Ollama's
/v1 answer it. A streamed answer is chunked SSE of `chat.completion.chunk` objects (the role
first, then content deltas, the finish reason, with `include_usage` a last chunk with empty
choices and the usage), ended by `data: [DONE]`. Errors are OpenAI's
`{"error": {"message", "type", "param", "code"}}`, mid-stream as a `data:` chunk of that shape.

A test sets `script(writer, request)` to write the answer; `reply(...)` is the ordinary one."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tests.upstreams.base import FakeServer, Request, Script, Writer

PATH = "/v1/chat/completions"
MODEL = "fake-llm"


def chunk(delta: dict[str, Any] | None = None, *, finish: str | None = None,
          model: str = MODEL, usage: bool = True) -> dict[str, Any]:  # fmt: skip
    value: dict[str, Any] = {
        "id": "chatcmpl-fake1",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }
    if usage:  # with stream_options.include_usage every chunk has it, null until the last
        value["usage"] = None
    return value


def usage_chunk(prompt: int, completion: int, model: str = MODEL) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake1", "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model, "system_fingerprint": None, "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }  # fmt: skip


def error_body(message: str, kind: str = "invalid_request_error", *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def reply(w: Writer, request: Request, pieces: Sequence[str] = ("Hello", ",", " world"), *,
          finish: str = "stop", gap: float = 0.0, done: bool = True,
          head: bool = True) -> None:  # fmt: skip
    """The ordinary streamed answer: each piece a delta, `gap` seconds apart (`head=False`:
    the answer's head was written already)."""
    body = request.body or {}
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    model = body.get("model") or MODEL
    if head:
        w.head()
    w.data(chunk({"role": "assistant", "content": ""}, model=model, usage=include_usage))
    for piece in pieces:
        if gap:
            w.wait(gap)
        w.data(chunk({"content": piece}, model=model, usage=include_usage))
    w.data(chunk({}, finish=finish, model=model, usage=include_usage))
    if include_usage:
        w.data(usage_chunk(len(body.get("messages") or ()) * 7, len(pieces), model))
    if done:
        w.data("[DONE]")
    w.end()


class FakeOpenAI(FakeServer):
    """`api_key`: the Bearer key it wants (401 in OpenAI's words without it)."""

    def __init__(self, *, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.script: Script = reply
        self.base_url = f"{self.origin}/v1"

    def answer(self, writer: Writer, request: Request) -> None:
        if request.path != PATH:
            writer.json(404, error_body(f"Unknown request URL: POST {request.path}.",
                                        code="unknown_url"))  # fmt: skip
            return
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            writer.json(401, error_body("Incorrect API key provided.", code="invalid_api_key"))
            return
        body = request.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            writer.json(400, error_body("'messages' is a required property", param="messages"))
            return
        self.script(writer, request)
