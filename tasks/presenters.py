"""How tasks look on the wire: the poll body and the async submit answer (README: API)."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from typing import Any

from django.urls import reverse
from django.utils import timezone

from tasks.events import catalog, tokens
from tasks.models import Batch, IdempotencyRecord, Task


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@functools.cache
def _task_path_template() -> str:
    """The poll path with a `{}` for the id: `reverse()` walks the URL resolver on every call,
    a twelfth of a submit's CPU, for a path that only differs by the id."""
    placeholder = "00000000-0000-0000-0000-000000000000"
    return reverse("api:task", args=[placeholder]).replace(placeholder, "{}")


def poll_url(request, task: Task) -> str:
    return request.build_absolute_uri(_task_path_template().format(task.id))


@functools.cache
def _events_path_template() -> str:
    placeholder = "00000000-0000-0000-0000-000000000000"
    return reverse("api:task-events", args=[placeholder]).replace(placeholder, "{}")


def stream_path(task_id: uuid.UUID | str) -> str:
    """The task's event stream with a token bound to it (tasks.events.tokens): what a browser's
    EventSource follows without the API key; the same token reads the poll URL."""
    return f"{_events_path_template().format(task_id)}?token={tokens.issue(task_id)}"


def stream_url(request, task: Task) -> str:
    return request.build_absolute_uri(stream_path(task.id))


def removed_task_body(request, record: IdempotencyRecord) -> dict[str, Any]:
    """A repeated Idempotency-Key whose task retention already removed (its poll is 404)."""
    return {
        "task_id": str(record.task_id),
        "status": record.status,
        "poll_url": request.build_absolute_uri(_task_path_template().format(record.task_id)),
        "created_at": iso(record.created_at),
    }


def elapsed_ms(task: Task, now: datetime | None = None) -> int:
    """Run time so far: from start to finish (or now); 0 before the task started."""
    if task.started_at is None:
        return 0
    end = task.finished_at or now or timezone.now()
    return max(0, int((end - task.started_at).total_seconds() * 1000))


def retry_after_seconds(task: Task, now: datetime | None = None) -> int:
    """Seconds a poller should wait: 1 for a young task, growing to 5 as it ages."""
    age = ((now or timezone.now()) - task.created_at).total_seconds()
    for limit, seconds in ((2, 1), (5, 2), (15, 3), (60, 4)):
        if age < limit:
            return seconds
    return 5


def result_fields(task: Task) -> dict[str, Any]:
    """What a task ended with: shared by the poll body and the callback body."""
    return {
        "output": task.output,
        "error": task.error or None,
        "error_code": task.error_code,  # for machines: "deadline_exceeded", else null
        "user": task.user or None,
        "created_at": iso(task.created_at),
        "started_at": iso(task.started_at),
        "finished_at": iso(task.finished_at),
    }


def _batch_id(task: Task) -> str | None:
    return str(task.batch_id) if task.batch_id else None


def callback_body(task: Task) -> dict[str, Any]:
    """The webhook payload (README: Callbacks), in its documented key order."""
    return {
        "event": "task.finished",
        "task_id": str(task.id),
        "run": task.run,
        "app_id": str(task.application_id),
        "status": task.status,
        **result_fields(task),
        "queue": None,  # a finished run waits nowhere (the poll's field, for one shape)
        "batch_id": _batch_id(task),
    }


def task_body(task: Task, *, queue: dict[str, Any] | None = None) -> dict[str, Any]:
    """The poll body; `queue` is a waiting run's place (tasks.scheduling.estimates)."""
    return {
        "task_id": str(task.id),
        "app_id": str(task.application_id),
        "status": task.status,
        "run": task.run,
        "progress": task.progress,
        **result_fields(task),
        "elapsed_ms": elapsed_ms(task),
        "priority": task.priority,
        "queue": queue,
        "callback": {
            "url": task.callback_url or None,
            "status": task.callback_status,
            "attempts": task.callback_attempts,
            "last_status_code": task.callback_last_status_code,
            "next_attempt_at": iso(task.callback_next_attempt_at),
            "events": catalog.listed_kinds(task.callback_events) if task.callback_url else [],
        },
        "batch_id": _batch_id(task),
    }


def accepted_body(request, task: Task) -> dict[str, Any]:
    return {
        "task_id": str(task.id),
        "status": task.status,
        "poll_url": poll_url(request, task),
        "stream_url": stream_url(request, task),
        "created_at": iso(task.created_at),
    }


@functools.cache
def _batch_path_template(name: str) -> str:
    placeholder = "00000000-0000-0000-0000-000000000000"
    return reverse(name, args=[placeholder]).replace(placeholder, "{}")


def batch_body(request, batch: Batch, *, counts: dict[str, int]) -> dict[str, Any]:
    """The batch submit's answer (README: Batches)."""
    return {
        "batch_id": str(batch.id),
        "status": batch.status,
        "counts": counts,
        "poll_url": request.build_absolute_uri(_batch_path_template("api:batch").format(batch.id)),
        "results_url": request.build_absolute_uri(
            _batch_path_template("api:batch-results").format(batch.id)
        ),
        "created_at": iso(batch.created_at),
    }


def batch_detail_body(
    request, batch: Batch, *, counts: dict[str, int], progress: int
) -> dict[str, Any]:
    """The batch's poll body: the submit's answer, then its progress."""
    return batch_body(request, batch, counts=counts) | {
        "progress": progress,
        "metadata": batch.metadata,
        "finished_at": iso(batch.finished_at),
    }


def batch_callback_body(batch: Batch, *, counts: dict[str, int]) -> dict[str, Any]:
    """The `batch.finished` callback payload (README: Batches), in its documented key order;
    `counts` per status (tasks.batches.follow.counts_of)."""
    results_path = _batch_path_template("api:batch-results").format(batch.id)
    return {
        "event": "batch.finished",
        "batch_id": str(batch.id),
        "app_id": str(batch.application_id),
        "status": batch.status,
        "counts": {"total": batch.total, **counts},
        "results_url": batch.base_url.rstrip("/") + results_path,
        "created_at": iso(batch.created_at),
        "finished_at": iso(batch.finished_at),
        "metadata": batch.metadata,
    }


def batch_result_line(
    task_id: uuid.UUID, index: int, status: str, output: Any, error: str, error_code: str | None
) -> dict[str, Any]:
    """One line of a batch's results NDJSON."""
    return {"task_id": str(task_id), "index": index, "status": status, "output": output,
            "error": error or None, "error_code": error_code}  # fmt: skip
