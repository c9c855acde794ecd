"""The `openai` runner: one chat completion from an OpenAI-compatible server, streamed.

runner_config: `base_url` (the API root, e.g. http://127.0.0.1:8000/v1; the runner POSTs to
`{base_url}/chat/completions`), `model`, `api_key_env` (the worker's environment variable
holding the key, sent as `Authorization: Bearer`), `timeout` (seconds for connecting and for
each wait for the next bytes, default 300), `defaults` (request fields the inputs may override,
e.g. `{"temperature": 0.2, "max_tokens": 512}`), `headers` (extra request headers).

inputs: a chat-completions body (`messages` and any of `temperature`, `max_tokens`, `tools`,
...), or `{"prompt": "..."}` for one user message. The configured model always wins; `stream`
is always on, with `stream_options.include_usage`.

output: `{"message": {"role", "content"[, "reasoning_content"][, "tool_calls"]}, "finish_reason",
"usage", "model", "id"}`. Each content delta goes to `ctx.emit`; progress follows the streamed
tokens against `max_completion_tokens`/`max_tokens` when the request has one; usage is logged.

Errors: 429, 5xx, timeouts and broken connections are RetryableError (429's Retry-After kept);
any other HTTP error fails with the upstream's `error.message`; an error event or chunk in the
stream fails the task; a stream that ends before a finish reason or `[DONE]` is retryable.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from tasks.execution import upstreams
from tasks.execution.runners import MAX_STREAM_TEXT, RetryableError, RunContext, RunnerError
from tasks.execution.upstreams import sse

# Progress is reported when it grew this many points, or grew at all and this long passed.
PROGRESS_STEP = 5
PROGRESS_SECONDS = 0.5


@dataclass(frozen=True)
class Config:
    url: str
    model: str
    timeout: float
    defaults: dict[str, Any]
    headers: dict[str, str]

    @classmethod
    def of(cls, config: dict[str, Any]) -> Config:
        base = upstreams.base_url(config, "openai")
        model = config.get("model")
        if not isinstance(model, str) or not model.strip():
            raise RunnerError("the openai runner needs runner_config.model (the model's name)")
        defaults = config.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise RunnerError("runner_config.defaults must be a JSON object of request fields")
        upstreams.api_key_env(config)  # its form; the value is read in the worker
        return cls(
            url=f"{base}/chat/completions",
            model=model.strip(),
            timeout=upstreams.timeout(config),
            defaults=defaults,
            headers=upstreams.extra_headers(config),
        )


def request_body(inputs: dict[str, Any], config: Config) -> dict[str, Any]:
    body = dict(inputs)
    if "prompt" in body:
        if "messages" in body:
            raise RunnerError("inputs take messages or a prompt, not both")
        prompt = body.pop("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RunnerError("inputs.prompt must be a non-empty string")
        body["messages"] = [{"role": "user", "content": prompt}]
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise RunnerError("inputs need messages (a non-empty list of message objects) or a prompt")
    if body.get("n", 1) != 1:
        raise RunnerError("inputs.n must be 1: the runner returns one choice")
    options = body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    return {
        **config.defaults,
        **body,
        "model": config.model,
        "stream": True,
        "stream_options": {**options, "include_usage": True},
    }


def run(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    config = Config.of(ctx.config)
    body = request_body(inputs, config)
    headers = {**config.headers, **upstreams.auth_headers(ctx.config),
               "Accept": "text/event-stream"}  # fmt: skip
    answer = Answer(progress=TokenProgress(ctx, _token_budget(body)))
    ctx.log(f"POST {config.url} (model {config.model})")
    with sse.Stream(config.url, body, headers, timeout=config.timeout, check=ctx.check) as stream:
        status = stream.open()
        if not 200 <= status < 300:
            message = f"upstream answered HTTP {status}: {sse.error_message(stream.read_error())}"
            if status >= 500 or status == 429:
                raise RetryableError(message, retry_after=stream.retry_after())
            raise RunnerError(message)
        media = stream.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media == "text/event-stream":
            _read_stream(stream, answer, ctx)
        else:  # a server that ignored `stream: true` and answered one JSON completion
            _read_whole(stream, answer, ctx)
    if answer.usage:
        ctx.log("usage: " + ", ".join(f"{k} {v}" for k, v in answer.usage.items()
                                      if isinstance(v, int)))  # fmt: skip
    return answer.output()


def _token_budget(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class TokenProgress:
    """Progress by streamed tokens (one delta is one token, as servers stream them) against the
    request's budget; never per token, never 100 (that is the run's end)."""

    def __init__(self, ctx: RunContext, budget: int | None) -> None:
        self.ctx = ctx
        self.budget = budget
        self.tokens = 0
        self.reported = 0
        self.reported_at = time.monotonic()

    def token(self) -> None:
        self.tokens += 1
        if not self.budget:
            return
        percent = min(99, self.tokens * 100 // self.budget)
        grown = percent - self.reported
        waited = time.monotonic() - self.reported_at >= PROGRESS_SECONDS
        if grown >= PROGRESS_STEP or (grown > 0 and waited):
            self.ctx.progress(percent)
            self.reported, self.reported_at = percent, time.monotonic()


@dataclass
class Answer:
    progress: TokenProgress
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    role: str = "assistant"
    size: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    id: str | None = None

    def add(self, chunk: Any, ctx: RunContext) -> None:
        if not isinstance(chunk, dict):
            raise RunnerError(f"upstream sent a chunk that is not an object: {str(chunk)[:200]!r}")
        if chunk.get("error"):  # vLLM, OpenAI and others report a failure mid-stream so
            raise RunnerError(f"upstream failed mid-stream: {_error_text(chunk)}")
        self.model = chunk.get("model") or self.model
        self.id = chunk.get("id") or self.id
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._add_choice(choice, ctx)

    def _add_choice(self, choice: dict[str, Any], ctx: RunContext) -> None:
        delta = choice.get("delta") or choice.get("message") or {}
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._grow(len(content))
            self.content.append(content)
            ctx.emit(content)
            self.progress.token()
        # vLLM and DeepSeek stream a reasoning model's thinking as reasoning_content, Ollama
        # as reasoning: kept in the output, not emitted as the answer.
        for name in ("reasoning_content", "reasoning"):
            thought = delta.get(name)
            if isinstance(thought, str) and thought:
                self._grow(len(thought))
                self.reasoning.append(thought)
                self.progress.token()
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._add_tool_call(call)
                self.progress.token()
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def _add_tool_call(self, call: dict[str, Any]) -> None:
        """A tool call arrives in pieces: its id, type and name once, its arguments in parts."""
        index = call.get("index", 0) if isinstance(call.get("index", 0), int) else 0
        known = self.tool_calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        known["id"] = call.get("id") or known["id"]
        known["type"] = call.get("type") or known["type"]
        function = call.get("function")
        if isinstance(function, dict):
            for name in ("name", "arguments"):
                part = function.get(name)
                if isinstance(part, str):
                    self._grow(len(part))
                    known["function"][name] += part

    def _grow(self, size: int) -> None:
        self.size += size
        if self.size > MAX_STREAM_TEXT:
            raise RunnerError(f"upstream streamed more than {MAX_STREAM_TEXT:,} characters")

    def output(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.content)}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return {
            "message": message,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "model": self.model,
            "id": self.id,
        }


def _error_text(value: Any) -> str:
    return sse.error_message(json.dumps(value).encode()) if not isinstance(value, str) else value


def _read_stream(stream: sse.Stream, answer: Answer, ctx: RunContext) -> None:
    for event in stream.events():
        if event.data.strip() == "[DONE]":
            return  # the end, even if the upstream keeps the connection open
        if event.name == "error":
            text = event.data
            if text.lstrip().startswith("{"):
                text = _error_text(sse.json_data(event))
            raise RunnerError(f"upstream failed mid-stream: {text}")
        answer.add(sse.json_data(event), ctx)
    if answer.finish_reason is None:
        raise RetryableError("upstream stream ended before the answer was finished")


def _read_whole(stream: sse.Stream, answer: Answer, ctx: RunContext) -> None:
    body = b""
    for chunk in stream.chunks():
        body += chunk
        if len(body) > MAX_STREAM_TEXT:
            raise RunnerError(f"upstream answered more than {MAX_STREAM_TEXT:,} bytes")
    try:
        completion = json.loads(body)
    except ValueError as exc:
        raise RunnerError(f"upstream answered invalid JSON: {body[:200]!r}") from exc
    answer.add(completion, ctx)
