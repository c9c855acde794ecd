"""`GET /api/batches/{batch_id}/events`: a batch's progress as Server-Sent Events (README:
Batches), served by the ASGI web process beside the task events (dashboard.runtime.asgi).

A batch's state is its counts, read from its items (tasks.batches.follow), so the stream is a
state stream rather than a log: `batch.progress` (status, counts, progress) at once and then
whenever the counts change, read at most every POLL_SECONDS (longer for a large batch, so a
watcher costs one indexed aggregate a second or less), a comment every
STREAM_KEEPALIVE_SECONDS, and `batch.finished` (the callback's body) at the end, after which the
stream closes. A resumed stream (`Last-Event-ID` / `?after=`) starts with the current state; one
resumed after the `batch.finished` it already has gets 204, as the task events do.

Errors before the stream are the API's JSON error shape: the method, the API key (of the
batch's application), the batch, a database away (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections

from tasks import credentials
from tasks.api import events
from tasks.api.events import json_error, keepalive_seconds, sse
from tasks.batches import follow
from tasks.models import Batch
from tasks.presenters import batch_callback_body

logger = logging.getLogger(__name__)

PATH = re.compile(r"^/api/batches/(?P<batch_id>[^/]+)/events/?$")
EVENT_ID = re.compile(r"^(progress|finished)-[0-9]{1,20}$")
POLL_SECONDS = 1.0
ITEMS_PER_POLL_SECOND = 20_000  # a larger batch is read less often: one read per this many


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Snapshot:
    status: str
    completions: int
    data: dict[str, Any]  # the `batch.progress` body
    finished: dict[str, Any] | None  # the `batch.finished` body once the batch is not running


def finished_id(completions: int) -> str:
    return f"finished-{completions}"


def open_batch(*, batch_id: str, authorization: str) -> Batch:
    close_old_connections()  # a thread of the pool keeps its connection: drop a broken one
    scheme, _, raw_key = authorization.partition(" ")
    key = credentials.authenticate(raw_key.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        raise Refused(401, "unauthorized", "The API key is missing, wrong or revoked.")
    try:
        batch_uuid = uuid.UUID(batch_id)
    except ValueError:
        raise Refused(404, "not_found", "No such batch.") from None
    batch = Batch.objects.filter(pk=batch_uuid, application_id=key.application_id).first()
    if batch is None:
        raise Refused(404, "not_found", "No such batch.")
    return batch


def snapshot(batch_id: uuid.UUID) -> Snapshot | None:
    """The batch's state now (follow.progress, which also settles a batch whose hook was lost);
    None when the batch is gone (retention)."""
    close_old_connections()
    batch = Batch.objects.filter(pk=batch_id).first()
    if batch is None:
        return None
    progress = follow.progress(batch)
    data = {"batch_id": str(batch.id), "status": batch.status, "counts": progress.counts,
            "progress": progress.percent}  # fmt: skip
    finished = None
    if batch.status != Batch.Status.RUNNING:
        finished = batch_callback_body(batch, counts={
            name: count for name, count in progress.counts.items() if name != "total"
        })  # fmt: skip
    return Snapshot(batch.status, batch.completions, data, finished)


def poll_seconds(total: int) -> float:
    return max(POLL_SECONDS, total / ITEMS_PER_POLL_SECOND)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    match = PATH.match(scope["path"])
    assert match is not None  # dashboard.runtime.asgi routes only this path here
    if await events.refused_method(scope, send):
        return
    headers = events.request_headers(scope)
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    unknown = sorted(set(query) - {"after"})
    if unknown:
        await json_error(send, 400, "invalid_request",
                         f"Unknown query parameter {unknown[0]!r}; this stream takes after.",
                         unknown[0])  # fmt: skip
        return
    if "after" in query and not EVENT_ID.match(query["after"][0].strip()):
        await json_error(
            send, 400, "invalid_request",
            "after must be an event id of this stream, such as finished-1.", "after",
        )  # fmt: skip
        return
    # Last-Event-ID (what EventSource sends) wins; any id that is not the end's starts the
    # stream at the current state.
    after = (headers.get("last-event-id") or "").strip() or query.get("after", [""])[0].strip()
    try:
        batch = await sync_to_async(open_batch, thread_sensitive=False)(
            batch_id=match["batch_id"], authorization=headers.get("authorization", "")
        )
        state = await sync_to_async(snapshot, thread_sensitive=False)(batch.pk)
    except Refused as exc:
        await json_error(send, exc.status, exc.code, exc.message)
        return
    except (OperationalError, InterfaceError):
        await events.database_unavailable(send, "a batch event stream")
        return
    if state is None:
        await json_error(send, 404, "not_found", "No such batch.")
        return
    if state.finished is not None and after == finished_id(state.completions):
        await events.nothing_more(send)
        return
    try:
        await events.start_stream(send)
        await follow_batch(batch, state, receive, send)
    finally:
        await events.end_stream(send)


async def follow_batch(batch: Batch, state: Snapshot, receive: Any, send: Any) -> None:
    disconnected = asyncio.Event()

    async def body(chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    watcher = events.watch_disconnect(receive, disconnected)
    interval = poll_seconds(batch.total)
    now = time.monotonic()
    ends_at = now + settings.STREAM_MAX_SECONDS
    keepalive_at = now + keepalive_seconds()
    sent: dict[str, Any] | None = None
    try:
        while not disconnected.is_set():
            if state.data != sent:
                event_id = f"progress-{int(time.time() * 1000)}"
                await body(sse(event_id, "batch.progress", _encode(state.data)))
                sent = state.data
            if state.finished is not None:
                await body(sse(finished_id(state.completions), "batch.finished",
                               _encode(state.finished)))  # fmt: skip
                return
            now = time.monotonic()
            if now >= ends_at:
                return  # the client resumes with Last-Event-ID
            if now >= keepalive_at:
                await body(b": keepalive\n\n")
                keepalive_at = now + keepalive_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(disconnected.wait(), timeout=interval)
            if disconnected.is_set():
                return
            try:
                fresh = await sync_to_async(snapshot, thread_sensitive=False)(batch.pk)
            except (OperationalError, InterfaceError):
                logger.warning("database unavailable following batch %s", batch.pk)
                continue  # keepalives go on; the next poll tries again
            if fresh is None:
                return  # removed by retention while followed
            state = fresh
    finally:
        watcher.cancel()


def _encode(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
