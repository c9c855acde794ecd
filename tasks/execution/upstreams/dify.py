"""The `dify` runner: one run of a Dify workflow or chat app through Dify's streaming API.

runner_config: `base_url` (Dify's API root, e.g. https://api.dify.ai, with or without the
trailing /v1 that Dify's API page shows), `api_key_env` (the worker's environment variable
holding the app's API key), `app_type` (`workflow`: POST /v1/workflows/run; `chat`: POST
/v1/chat-messages, for chat, agent and chatflow apps), `timeout` (seconds for connecting and
for each wait for the next bytes, default 300; Dify pings every 10 s), `user` (the Dify user of
tasks submitted without one, default "taskhook"), `nodes` (the workflow's node count, which
makes progress exact), `headers` (extra request headers).

inputs: for a workflow, Dify's `inputs` as they are. For a chat app, `query` (the message),
optional `conversation_id` and `files`; every other key is one of the app's `inputs`.

Events: node_started -> progress with the node's title; node_finished -> a log line and
progress (finished / `nodes`, else the estimate n / (n + 4)); text_chunk, message and
agent_message -> ctx.emit; workflow_finished ends a workflow (failed or stopped: the task fails
with Dify's error); message_end ends a chat; error fails the task; ping and the rest are skipped.

output: workflow -> `{"outputs", "status", "workflow_run_id", "task_id", "elapsed_time",
"total_tokens", "total_steps"}`; chat -> `{"answer", "conversation_id", "message_id", "usage"}`.

Stopping: when the runner lets go of a run Dify is still running (the task was cancelled or
passed its deadline, the stream stalled or broke off, the job timed out), it closes the stream
and then calls Dify's stop endpoint for the stream's task_id, so the work stops there too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import urllib3

from tasks.execution import upstreams
from tasks.execution.runners import MAX_STREAM_TEXT, RetryableError, RunContext, RunnerError
from tasks.execution.upstreams import sse
from tasks.models import Task

logger = logging.getLogger(__name__)

APP_TYPES = ("workflow", "chat")
DEFAULT_USER = "taskhook"
STOP_TIMEOUT = 5.0
CHAT_FIELDS = ("query", "conversation_id", "files")


@dataclass(frozen=True)
class Config:
    base: str
    app_type: str
    timeout: float
    user: str
    nodes: int | None
    headers: dict[str, str]

    @classmethod
    def of(cls, config: dict[str, Any]) -> Config:
        base = upstreams.base_url(config, "dify").removesuffix("/v1")
        app_type = config.get("app_type")
        if app_type not in APP_TYPES:
            raise RunnerError(
                f"the dify runner needs runner_config.app_type: one of {', '.join(APP_TYPES)}"
                + ("" if app_type is None else f", not {app_type!r}")
            )
        user = config.get("user", DEFAULT_USER)
        if not isinstance(user, str) or not user:
            raise RunnerError("runner_config.user must be a non-empty string")
        nodes = config.get("nodes")
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int)
                                  or nodes < 1):  # fmt: skip
            raise RunnerError("runner_config.nodes must be a whole number of nodes (1 or more)")
        upstreams.api_key_env(config)  # its form; the value is read in the worker
        return cls(
            base=base,
            app_type=app_type,
            timeout=upstreams.timeout(config),
            user=user,
            nodes=nodes,
            headers=upstreams.extra_headers(config),
        )

    @property
    def run_url(self) -> str:
        return self.base + ("/v1/workflows/run" if self.app_type == "workflow"
                            else "/v1/chat-messages")  # fmt: skip

    def stop_url(self, task_id: str) -> str:
        kind = "workflows/tasks" if self.app_type == "workflow" else "chat-messages"
        return f"{self.base}/v1/{kind}/{task_id}/stop"


def request_body(inputs: dict[str, Any], config: Config, user: str) -> dict[str, Any]:
    body: dict[str, Any] = {"response_mode": "streaming", "user": user}
    if config.app_type == "workflow":
        return {"inputs": inputs, **body}
    query = inputs.get("query")
    if not isinstance(query, str) or not query:
        raise RunnerError("inputs.query must be the chat message (a non-empty string)")
    conversation = inputs.get("conversation_id") or ""
    if not isinstance(conversation, str):
        raise RunnerError("inputs.conversation_id must be a string")
    body |= {"query": query, "conversation_id": conversation,
             "inputs": {k: v for k, v in inputs.items() if k not in CHAT_FIELDS}}  # fmt: skip
    if "files" in inputs:
        if not isinstance(inputs["files"], list):
            raise RunnerError("inputs.files must be a list of Dify file objects")
        body["files"] = inputs["files"]
    return body


def task_user(ctx: RunContext, config: Config) -> str:
    """The submit's `user` (Dify keys conversations and stops by it), else the configured one."""
    task_id = getattr(ctx, "task_id", None)  # a TaskContext has it; a test double may not
    found = (
        Task.objects.filter(pk=task_id).values_list("user", flat=True).first() if task_id else None
    )
    return found or config.user


def run(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    config = Config.of(ctx.config)
    user = task_user(ctx, config)
    body = request_body(inputs, config, user)
    headers = {**config.headers, **upstreams.auth_headers(ctx.config),
               "Accept": "text/event-stream"}  # fmt: skip
    run = DifyRun(config, ctx)
    ctx.log(f"POST {config.run_url} (Dify {config.app_type} app, user {user})")
    with sse.Stream(config.run_url, body, headers, timeout=config.timeout, check=ctx.check) as s:
        try:
            status = s.open()
            if not 200 <= status < 300:
                raise _status_error(status, s)
            media = s.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if media != "text/event-stream":
                raise RunnerError(f"Dify answered {media or 'no content type'}, not a stream")
            for event in s.events():
                if run.handle(sse.json_data(event), event.name):
                    break
            else:
                raise RetryableError("Dify's stream ended before the run finished")
        except BaseException:
            if run.task_id and not run.ended:
                s.close()  # first: the stream is let go of at once, whatever the stop takes
                _stop(config, run.task_id, user, headers)
            raise
    run.log_usage()
    return run.output()


def _status_error(status: int, stream: sse.Stream) -> RunnerError:
    body = stream.read_error()
    message = f"Dify answered HTTP {status}: {sse.error_message(body)}"
    if status >= 500 or status == 429:
        return RetryableError(message, retry_after=stream.retry_after())
    return RunnerError(message)


def _stop(config: Config, task_id: str, user: str, headers: dict[str, str]) -> None:
    """Dify's stop endpoint for the run; logged, never raised: the task's own end stands (and
    a cancelled run can no longer log through ctx)."""
    url = config.stop_url(task_id)
    try:
        response = urllib3.request(
            "POST", url, json={"user": user}, headers=headers, retries=False, redirect=False,
            timeout=urllib3.Timeout(total=min(STOP_TIMEOUT, config.timeout)),
        )  # fmt: skip
    except urllib3.exceptions.HTTPError as exc:
        logger.warning("could not stop Dify task %s: %s", task_id, exc)
        return
    if 200 <= response.status < 300:
        logger.info("stopped Dify task %s", task_id)
    else:
        logger.warning("Dify refused to stop task %s: HTTP %s %s", task_id, response.status,
                       sse.error_message(response.data))  # fmt: skip


@dataclass
class DifyRun:
    """What the stream said so far, and what each event does to the task."""

    config: Config
    ctx: RunContext
    task_id: str | None = None
    ended: bool = False  # Dify finished the run (well or not): nothing to stop
    answer: list[str] = field(default_factory=list)
    size: int = 0
    nodes_finished: int = 0
    percent: int = 0
    workflow: dict[str, Any] = field(default_factory=dict)
    workflow_run_id: str | None = None
    conversation_id: str | None = None
    message_id: str | None = None
    usage: dict[str, Any] | None = None

    def handle(self, event: Any, sse_name: str) -> bool:
        """Act on one event; True when it was the run's last."""
        if not isinstance(event, dict):
            raise RunnerError(f"Dify sent an event that is not an object: {str(event)[:200]!r}")
        name = event.get("event") or sse_name
        self.task_id = self.task_id or _text(event.get("task_id"))
        self.workflow_run_id = self.workflow_run_id or _text(event.get("workflow_run_id"))
        self.conversation_id = _text(event.get("conversation_id")) or self.conversation_id
        data: dict[str, Any] = event["data"] if isinstance(event.get("data"), dict) else {}
        if name == "error":
            self.ended = True
            code = f" ({event['code']})" if event.get("code") else ""
            raise RunnerError(f"Dify failed: {event.get('message') or 'unknown error'}{code}")
        if name == "workflow_started":
            self.ctx.log(f"Dify workflow run {self.workflow_run_id or data.get('id')} started")
        elif name == "node_started":
            self.ctx.progress(self.percent, f"node {_node(data)} started")
        elif name == "node_finished":
            self._node_finished(data)
        elif name == "text_chunk":
            self._emit(data.get("text"))
        elif name in ("message", "agent_message"):
            self.message_id = _text(event.get("message_id") or event.get("id")) or self.message_id
            self._emit(event.get("answer"))
        elif name == "message_replace":  # moderation replaced the answer streamed so far
            self.answer, self.size = [], 0
            self._emit(event.get("answer"), emit=False)
            self.ctx.log("Dify replaced the answer (content moderation)", level="warning")
        elif name == "workflow_finished":
            return self._workflow_finished(data)
        elif name == "message_end":
            self.ended = True
            self.message_id = _text(event.get("message_id") or event.get("id")) or self.message_id
            metadata = event.get("metadata")
            usage = metadata.get("usage") if isinstance(metadata, dict) else None
            self.usage = usage if isinstance(usage, dict) else None
            return True
        return False  # ping, tts_message, node_retry, iteration_*, loop_*, agent_thought, ...

    def _node_finished(self, data: dict[str, Any]) -> None:
        self.nodes_finished += 1
        done = self.nodes_finished
        nodes = self.config.nodes
        self.percent = max(self.percent, min(99, done * 100 // nodes if nodes else
                                             done * 100 // (done + 4)))  # fmt: skip
        status = data.get("status") or "finished"
        took = data.get("elapsed_time")
        line = f"node {_node(data)} {status}" + (
            f" in {took:.2f} s" if isinstance(took, int | float) else ""
        )
        if data.get("error"):
            line += f": {data['error']}"
        self.ctx.log(line, level="warning" if status == "failed" else "info")
        self.ctx.progress(self.percent, f"node {_node(data)} {status}")

    def _workflow_finished(self, data: dict[str, Any]) -> bool:
        status = data.get("status")
        if status in ("failed", "stopped"):
            self.ended = True
            reason = data.get("error") or ("stopped in Dify" if status == "stopped" else "")
            raise RunnerError(f"Dify workflow {status}: {reason or 'no error given'}")
        self.workflow = data
        if self.config.app_type == "chat":  # a chatflow: its message_end comes next
            return False
        self.ended = True
        return True

    def _emit(self, text: Any, *, emit: bool = True) -> None:
        if not isinstance(text, str) or not text:
            return
        self.size += len(text)
        if self.size > MAX_STREAM_TEXT:
            raise RunnerError(f"Dify streamed more than {MAX_STREAM_TEXT:,} characters")
        self.answer.append(text)
        if emit:
            self.ctx.emit(text)

    def log_usage(self) -> None:
        if self.usage:
            parts = [f"{k} {v}" for k, v in self.usage.items() if k.endswith("_tokens")]
            if parts:
                self.ctx.log("usage: " + ", ".join(parts))
        elif isinstance(self.workflow.get("total_tokens"), int):
            self.ctx.log(f"usage: total_tokens {self.workflow['total_tokens']}")

    def output(self) -> dict[str, Any]:
        if self.config.app_type == "chat":
            return {
                "answer": "".join(self.answer),
                "conversation_id": self.conversation_id,
                "message_id": self.message_id,
                "usage": self.usage,
            }
        return {
            "outputs": self.workflow.get("outputs"),
            "status": self.workflow.get("status"),
            "workflow_run_id": self.workflow_run_id or self.workflow.get("id"),
            "task_id": self.task_id,
            "elapsed_time": self.workflow.get("elapsed_time"),
            "total_tokens": self.workflow.get("total_tokens"),
            "total_steps": self.workflow.get("total_steps"),
        }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _node(data: dict[str, Any]) -> str:
    title = data.get("title") or data.get("node_id") or "?"
    kind = data.get("node_type")
    return f"{title!r}" + (f" ({kind})" if kind else "")
