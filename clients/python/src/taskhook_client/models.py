"""What the client returns: the API's JSON objects as TypedDicts (plain dicts at run time, so a
field the server adds later is kept), and `Event` for a Server-Sent Event.

The fields are those of docs/api.md; `total=False` where the API leaves some out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

TaskStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
Priority = Literal["high", "normal", "low"]
CallbackEvent = Literal["started", "progress", "log", "output", "finished"]


class QueuePlace(TypedDict):
    position: int
    eta_seconds: float | None


class CallbackState(TypedDict):
    url: str | None
    status: str
    attempts: int
    last_status_code: int | None
    next_attempt_at: str | None
    events: NotRequired[list[str]]


class TaskAccepted(TypedDict):
    """The answer to an async submit."""

    task_id: str
    status: TaskStatus
    poll_url: str
    stream_url: NotRequired[str]
    created_at: str


class Task(TypedDict):
    """A poll of a task (also what cancel, a finished `run()` and `wait()` return)."""

    task_id: str
    app_id: str
    status: TaskStatus
    run: int
    progress: int
    output: Any
    error: str | None
    error_code: str | None
    user: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    elapsed_ms: int
    priority: Priority
    queue: QueuePlace | None
    callback: CallbackState | None
    batch_id: NotRequired[str]


class BatchCounts(TypedDict):
    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class BatchAccepted(TypedDict):
    batch_id: str
    status: str
    counts: BatchCounts
    poll_url: str
    results_url: str
    created_at: str


class Batch(BatchAccepted):
    progress: int
    metadata: Any
    finished_at: str | None


class BatchResult(TypedDict):
    """One line of a batch's results."""

    task_id: str
    index: int
    status: TaskStatus
    output: Any
    error: str | None
    error_code: str | None


class BatchItem(TypedDict, total=False):
    """One item of `submit_batch`: `inputs` is required."""

    inputs: dict[str, Any]
    user: str
    concurrency_key: str
    retry: bool
    deadline_seconds: float
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event: `data` is the decoded JSON (`raw` the text as sent)."""

    event: str
    data: Any
    id: str | None = None
    raw: str = ""
