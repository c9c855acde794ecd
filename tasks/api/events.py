"""`GET /api/tasks/{task_id}/events`: the task's live events as Server-Sent Events (README:
Live events). An ASGI application of its own (dashboard.runtime.asgi routes the path here), so
an open stream costs a coroutine, not a thread.

Before the stream starts, everything is checked and any error is the API's JSON error shape:
the method, the credentials (the API key, or a stream token bound to this task), the task, and
`Last-Event-ID` / `?after=`. Then: the events after that id (without one, the current run's
events from its start; a finished task's `task.finished` at once), live events as they come,
a comment every STREAM_KEEPALIVE_SECONDS, and the end after `task.finished`. A client that
resumes after the `task.finished` it already has gets 204 (EventSource stops reconnecting).

Live events come through one Redis pub/sub connection per web process (`WakeHub`): a writer's
wake-up for a task wakes that task's streams, which read the entries after the last id they
sent from the task's stream (tasks.events.stream). So nothing is lost between a replay and the
live events, and nothing is sent twice.

A stream never guesses past what it could not read: while Redis does not answer, it sends
keepalives only and tries its catch-up again every CATCH_UP_RETRY_SECONDS; live entries wait
until a catch-up succeeded, and a finished task's `task.finished` is made from the database
only once Redis answered that the marker is not there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import redis
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections

from tasks import credentials
from tasks.events import catalog, tokens
from tasks.events import stream as event_stream
from tasks.models import Task, TaskRunHistory
from tasks.presenters import callback_body, iso
from tasks.statuses import FINISHED

logger = logging.getLogger(__name__)

PATH = re.compile(r"^/api/tasks/(?P<task_id>[^/]+)/events/?$")
PAGE = 500  # entries read from the stream at a time
RETRY_MS = 2000  # the reconnect delay EventSource is told to use
CATCH_UP_RETRY_SECONDS = 1.0  # after a read of the task's stream failed
# Reads wait this long for a connection of the pool (shared by every stream of the process)
# instead of failing at once when a burst of catch-ups takes them all.
POOL_CONNECTIONS = 64
POOL_WAIT_SECONDS = 5


class StreamUnreadable(Exception):
    """Redis did not answer a read of a task's stream: what it holds is unknown."""


class StreamRefused(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass(frozen=True)
class Opening:
    """What the checks before the stream found."""

    task_id: uuid.UUID
    run: int
    finished_at_ms: int | None  # set when the task is finished
    after: tuple[int, int] | None


# --- the checks before the stream (synchronous: the database) ---------------------------------


def open_stream(
    *, task_id: str, authorization: str, token: str | None, after: str | None
) -> Opening:
    close_old_connections()  # a thread of the pool keeps its connection: drop a broken one
    try:
        task_uuid = uuid.UUID(task_id)
    except ValueError:
        raise StreamRefused(404, "not_found", "No such task.") from None
    application_id = _authorised_application(task_uuid, authorization, token)
    filters: dict[str, Any] = {"pk": task_uuid}
    if application_id is not None:
        filters["application_id"] = application_id
    row = Task.objects.filter(**filters).values("run", "status", "finished_at").first()
    if row is None:
        raise StreamRefused(404, "not_found", "No such task.")
    after_pair = None
    if after is not None:
        after_pair = event_stream.parse_id(after.strip())
        if after_pair is None:
            raise StreamRefused(
                400, "invalid_request", "Last-Event-ID / after must be an event id such as "
                "1733212345678-0.", "after",
            )  # fmt: skip
    finished_at = row["finished_at"] if row["status"] in FINISHED else None
    return Opening(
        task_id=task_uuid,
        run=row["run"],
        finished_at_ms=int(finished_at.timestamp() * 1000) if finished_at else None,
        after=after_pair,
    )


def _authorised_application(task_id: uuid.UUID, authorization: str, token: str | None):
    """The application the API key belongs to; None when a stream token for this task is the
    proof (it is bound to the task itself)."""
    if authorization.strip():
        scheme, _, raw_key = authorization.partition(" ")
        key = credentials.authenticate(raw_key.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise StreamRefused(401, "unauthorized", "The API key is missing, wrong or revoked.")
        return key.application_id
    if token is None:
        raise StreamRefused(
            401, "unauthorized",
            "Send the API key as 'Authorization: Bearer <key>', or the stream_url's token.",
        )  # fmt: skip
    if not tokens.is_valid(task_id, token):
        raise StreamRefused(401, "unauthorized", tokens.REFUSED)
    return None


def finished_state(task_id: uuid.UUID, run: int) -> tuple[dict[str, Any] | None, int | None]:
    """The `task.finished` body of `run` (the callback body), and the current run then: the
    task's own row when `run` is its current run and it is finished, else that run's history
    row (an operator started a new run since). (None, run) while the run has not finished."""
    close_old_connections()
    task = Task.objects.filter(pk=task_id).first()
    if task is None:
        return None, None
    if task.run == run:
        return (callback_body(task) if task.status in FINISHED else None), task.run
    past = TaskRunHistory.objects.filter(task_id=task_id, run=run).first()
    if past is None:
        return None, task.run
    return {
        "event": catalog.FINISHED, "task_id": str(task_id), "run": run,
        "app_id": str(task.application_id), "status": past.status, "output": past.output,
        "error": past.error or None, "error_code": past.error_code,
        "user": task.user or None, "created_at": iso(task.created_at),
        "started_at": iso(past.started_at), "finished_at": iso(past.finished_at),
        "batch_id": str(task.batch_id) if task.batch_id else None,
    }, task.run  # fmt: skip


def current_run(task_id: uuid.UUID) -> tuple[int, bool] | None:
    close_old_connections()
    row = Task.objects.filter(pk=task_id).values_list("run", "status").first()
    return None if row is None else (row[0], row[1] in FINISHED)


# --- the wake-ups ------------------------------------------------------------------------------


def async_redis() -> aioredis.Redis:
    options: dict[str, Any] = {"socket_connect_timeout": 2, "health_check_interval": 30}
    if settings.REDIS_SENTINELS:
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(settings.REDIS_SENTINELS, socket_connect_timeout=2)
        return sentinel.master_for(
            settings.REDIS_SENTINEL_MASTER, db=settings.REDIS_DB,
            password=settings.REDIS_PASSWORD, max_connections=POOL_CONNECTIONS, **options,
        )  # fmt: skip
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.REDIS_URL, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_SECONDS,
        **options,
    )  # fmt: skip
    return aioredis.Redis(connection_pool=pool)


def keepalive_seconds() -> float:
    """Spread over the last tenth of the interval, so that streams opened together (a burst,
    every client reconnecting after a restart) do not all catch up in the same instant."""
    return settings.STREAM_KEEPALIVE_SECONDS * random.uniform(0.9, 1.0)


class Follower:
    """What the hub hands a stream: the live entries of its task, in order, and a flag that
    says the stream must read its task's stream again (the start, a pub/sub interruption, a
    backlog too long to hold, every keepalive)."""

    MAX_PENDING = 10_000

    def __init__(self, task_id: uuid.UUID) -> None:
        self.channel = event_stream.wake_channel(task_id)
        self.pending: collections.deque[tuple[event_stream.Event, bytes]] = collections.deque()
        self.needs_catch_up = True
        self.woken = asyncio.Event()

    def deliver(self, entry: event_stream.Event, encoded: bytes) -> None:
        if len(self.pending) >= self.MAX_PENDING:
            self.resync()  # a client this far behind reads the stream again instead
            return
        self.pending.append((entry, encoded))
        self.woken.set()

    def resync(self) -> None:
        self.pending.clear()
        self.needs_catch_up = True
        self.woken.set()


class WakeHub:
    """One pub/sub connection per web process. Each message on a task's channel is the entry
    itself (tasks.events.stream.ADD_SCRIPT): it is decoded and encoded as SSE once, and handed
    to every stream following that task, which sends it without reading Redis. A stream reads
    the task's stream (XRANGE) only to catch up: at its start, after an interruption of the
    pub/sub connection, and at each keepalive."""

    def __init__(self) -> None:
        self.client = async_redis()
        self._pubsub = self.client.pubsub()
        # One subscribe or unsubscribe at a time: concurrent first calls would each open a
        # connection of their own, and nothing reads those.
        self._lock = asyncio.Lock()
        self._followers: dict[str, set[Follower]] = {}
        self._subscribed: dict[str, asyncio.Event] = {}  # set when Redis confirmed it
        self._reader: asyncio.Task[None] | None = None

    async def watch(self, follower: Follower) -> None:
        """Once Redis confirmed the subscription (or 2 s passed): a stream catches up only
        after it, so an entry written meanwhile is either read or delivered."""
        channel = follower.channel
        followers = self._followers.setdefault(channel, set())
        followers.add(follower)
        if channel not in self._subscribed:
            self._subscribed[channel] = asyncio.Event()
            async with self._lock:
                try:
                    await self._pubsub.subscribe(channel)
                except (redis.RedisError, OSError) as exc:
                    logger.warning("cannot subscribe to %s: %s", channel, exc)
                    self._subscribed[channel].set()  # catch up anyway; keepalives re-read
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed[channel].wait(), timeout=2.0)

    async def unwatch(self, follower: Follower) -> None:
        channel = follower.channel
        followers = self._followers.get(channel, set())
        followers.discard(follower)
        if not followers and channel in self._subscribed:
            self._followers.pop(channel, None)
            self._subscribed.pop(channel, None)
            async with self._lock:
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while True:
            try:
                if not self._pubsub.subscribed:
                    await asyncio.sleep(0.05)
                    continue
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: everyone catches up once it answers again
                logger.warning("event wake-ups interrupted: %s", exc)
                self._resync_all()
                await asyncio.sleep(1.0)
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = event_stream.text(message["channel"])
        if message["type"] == "subscribe":
            if channel in self._subscribed:
                self._subscribed[channel].set()
            return
        if message["type"] != "message":
            return
        followers = self._followers.get(channel)
        if not followers:
            return
        entry = event_stream.decode_message(message["data"])
        encoded = sse(entry.id, entry.event, entry.data)
        for follower in followers:
            follower.deliver(entry, encoded)

    def _resync_all(self) -> None:
        for subscribed in self._subscribed.values():
            subscribed.set()
        for followers in self._followers.values():
            for follower in followers:
                follower.resync()

    @property
    def open_streams(self) -> int:
        return sum(len(followers) for followers in self._followers.values())


_hubs: dict[asyncio.AbstractEventLoop, WakeHub] = {}


def hub() -> WakeHub:
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = WakeHub()
    return _hubs[loop]


# --- the stream --------------------------------------------------------------------------------


def sse(event_id: str, event: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n".encode()


class Stream:
    """One open stream: sends what follows `last`, live, until `task.finished`."""

    def __init__(self, opening: Opening, send: Any, client: aioredis.Redis) -> None:
        self.opening = opening
        self.send = send
        self.client = client
        self.key = event_stream.stream_key(opening.task_id)
        self.last: tuple[int, int] = opening.after or (0, 0)
        self.run = opening.run
        self.ended = False
        self.follower = Follower(opening.task_id)

    async def body(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def entries(self, start: str, *, reverse: bool = False) -> list[event_stream.Event]:
        raw: Any
        try:
            if reverse:
                raw = await self.client.xrevrange(self.key, start, "-", count=PAGE)
            else:
                raw = await self.client.xrange(self.key, start, "+", count=PAGE)
        except (redis.RedisError, OSError) as exc:
            logger.info("event stream of %s unreadable: %s", self.opening.task_id, exc)
            raise StreamUnreadable from exc
        return [event_stream.decode(entry) for entry in raw]

    async def start_of_run(self) -> tuple[int, int]:
        """Where a client without an id starts: just before the current run's first event."""
        start = "+"
        while True:
            page = await self.entries(start, reverse=True)
            for entry in page:
                if entry.run < self.run:
                    return _pair(entry.id)
            if len(page) < PAGE:
                return (0, 0)
            start = f"({page[-1].id}"

    async def finish_marker(self) -> str | None:
        """The id of the current run's `task.finished` marker, if the stream still has it."""
        for entry in await self.entries("+", reverse=True):
            if entry.event == catalog.FINISHED and entry.run == self.run:
                return entry.id
        return None

    async def finished_id(self) -> tuple[int, int]:
        """The current (finished) run's `task.finished` id: its marker's, or one made from the
        finish time when Redis lost the marker (never below what this stream already sent)."""
        with contextlib.suppress(StreamUnreadable):  # the database's answer, then
            marker = await self.finish_marker()
            if marker is not None:
                return _pair(marker)
        assert self.opening.finished_at_ms is not None
        return max((self.opening.finished_at_ms, 0), (self.last[0], self.last[1] + 1))

    async def send_finished(self, event_id: str, run: int) -> bool:
        body, _ = await sync_to_async(finished_state, thread_sensitive=False)(
            self.opening.task_id, run
        )
        if body is None:
            return False
        await self.body(sse(event_id, catalog.FINISHED, json.dumps(body, separators=(",", ":"))))
        self.ended = True
        return True

    async def send_entries(self, entries: list[tuple[event_stream.Event, bytes]]) -> None:
        """Send those after `last`, in one write; stop at a `task.finished`."""
        chunk: list[bytes] = []
        for entry, encoded in entries:
            pair = _pair(entry.id)
            if pair <= self.last:
                continue  # already sent (a catch-up and a live copy of the same entry)
            self.last = pair
            if entry.event == catalog.FINISHED:
                if chunk:
                    await self.body(b"".join(chunk))
                    chunk = []
                if await self.send_finished(entry.id, entry.run):
                    return
                continue  # a marker whose run is not finished in the database: skip it
            chunk.append(encoded)
        if chunk:
            await self.body(b"".join(chunk))

    async def catch_up(self) -> None:
        """Read and send every entry after `last` from the task's stream."""
        self.follower.pending.clear()  # what arrives from here on is newer, or a copy
        while not self.ended:
            page = await self.entries(f"({event_stream.format_id(self.last)}")
            await self.send_entries([(e, sse(e.id, e.event, e.data)) for e in page])
            if len(page) < PAGE:
                return

    async def send_live(self) -> None:
        pending = self.follower.pending
        entries = [pending.popleft() for _ in range(len(pending))]
        await self.send_entries(entries)

    async def end_if_finished_without_marker(self) -> None:
        """A finish whose marker never reached Redis (it was away) still ends the stream; raises
        StreamUnreadable when Redis cannot say whether the marker is there."""
        state = await sync_to_async(current_run, thread_sensitive=False)(self.opening.task_id)
        if state is None:
            self.ended = True  # the task was deleted
            return
        run, finished = state
        if not finished or run != self.run:
            self.run = run
            return
        if await self.finish_marker() is not None:
            return  # the next catch-up sends it
        finished_at = await sync_to_async(_finished_at_ms, thread_sensitive=False)(
            self.opening.task_id
        )
        pair = max((finished_at or 0, 0), (self.last[0], self.last[1] + 1))
        await self.send_finished(event_stream.format_id(pair), run)


def _finished_at_ms(task_id: uuid.UUID) -> int | None:
    value = Task.objects.filter(pk=task_id).values_list("finished_at", flat=True).first()
    return int(value.timestamp() * 1000) if value else None


def _pair(event_id: str) -> tuple[int, int]:
    pair = event_stream.parse_id(event_id)
    assert pair is not None  # Redis's own ids
    return pair


# --- the ASGI application ----------------------------------------------------------------------


# The pieces every event stream's ASGI application shares (this one and the batches',
# tasks.api.batch_events): the API's JSON errors before a stream, its start, its end.


async def json_error(send: Any, status: int, code: str, message: str, field=None, headers=()):
    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def refused_method(scope: dict[str, Any], send: Any) -> bool:
    """Answer 405 to anything but GET; True when it did."""
    if scope["method"] == "GET":
        return False
    await json_error(
        send, 405, "method_not_allowed", f"{scope['method']} is not allowed here; use GET.",
        headers=[(b"allow", b"GET")],
    )  # fmt: skip
    return True


def request_headers(scope: dict[str, Any]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]}  # fmt: skip


async def database_unavailable(send: Any, what: str) -> None:
    logger.warning("database unavailable opening %s", what, exc_info=True)
    await json_error(
        send, 503, "unavailable", "The database is unavailable; retry shortly.",
        headers=[(b"retry-after", b"1")],
    )  # fmt: skip


async def nothing_more(send: Any) -> None:
    """204: the client resumed after the stream's last event."""
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def start_stream(send: Any) -> None:
    await send({
        "type": "http.response.start", "status": 200,
        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": f"retry: {RETRY_MS}\n\n".encode(),
                "more_body": True})  # fmt: skip


async def end_stream(send: Any) -> None:
    with contextlib.suppress(Exception):  # the client may be gone
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def watch_disconnect(receive: Any, *events: asyncio.Event) -> asyncio.Task:
    """A task that sets `events` once the client disconnects (cancel it when done)."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        for event in events:
            event.set()

    return asyncio.create_task(watch())


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    match = PATH.match(scope["path"])
    assert match is not None  # dashboard.runtime.asgi routes only this path here
    if await refused_method(scope, send):
        return
    headers = request_headers(scope)
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    after = headers.get("last-event-id") or (query.get("after") or [None])[0]
    try:
        opening = await sync_to_async(open_stream, thread_sensitive=False)(
            task_id=match["task_id"],
            authorization=headers.get("authorization", ""),
            token=(query.get("token") or [None])[0],
            after=after,
        )
    except StreamRefused as exc:
        await json_error(send, exc.status, exc.code, exc.message, exc.field)
        return
    except (OperationalError, InterfaceError):
        await database_unavailable(send, "an event stream")
        return
    await serve(opening, receive, send)


async def serve(opening: Opening, receive: Any, send: Any) -> None:
    the_hub = hub()
    stream = Stream(opening, send, the_hub.client)
    await the_hub.watch(stream.follower)  # before any read: no entry is missed
    try:
        if opening.finished_at_ms is not None:
            finished = await stream.finished_id()
            if opening.after is not None and opening.after >= finished:
                await nothing_more(send)
                return
        if opening.after is None and opening.finished_at_ms is None:
            try:
                stream.last = await stream.start_of_run()
            except StreamUnreadable:
                await json_error(
                    send, 503, "unavailable", "The event store is unavailable; retry shortly.",
                    headers=[(b"retry-after", b"1")],
                )  # fmt: skip
                return
        await start_stream(send)
        if opening.after is None and opening.finished_at_ms is not None:
            if await stream.send_finished(event_stream.format_id(finished), opening.run):
                return
            with contextlib.suppress(StreamUnreadable):  # else: from the start (a rare race)
                stream.last = await stream.start_of_run()
        await follow(stream, receive)
    finally:
        await the_hub.unwatch(stream.follower)
        await end_stream(send)


async def follow(stream: Stream, receive: Any) -> None:
    follower = stream.follower
    disconnected = asyncio.Event()
    watcher = watch_disconnect(receive, disconnected, follower.woken)
    now = time.monotonic()
    ends_at = now + settings.STREAM_MAX_SECONDS
    keepalive_at = now + keepalive_seconds()
    retry_at: float | None = None  # set while a catch-up waits to be tried again
    try:
        while not stream.ended and not disconnected.is_set():
            follower.woken.clear()
            now = time.monotonic()
            if follower.needs_catch_up and (retry_at is None or now >= retry_at):
                follower.needs_catch_up = False
                try:
                    await stream.catch_up()
                    if not stream.ended and stream.opening.finished_at_ms is not None:
                        await stream.end_if_finished_without_marker()  # finished before it opened
                    retry_at = None
                except StreamUnreadable:
                    follower.needs_catch_up = True
                    retry_at = now + CATCH_UP_RETRY_SECONDS * random.uniform(0.8, 1.2)
            if not stream.ended and not follower.needs_catch_up:
                await stream.send_live()  # never past entries a failed catch-up did not read
            if stream.ended:
                return
            now = time.monotonic()
            if now >= ends_at:
                return  # the client resumes with Last-Event-ID
            if now >= keepalive_at:
                await stream.body(b": keepalive\n\n")
                keepalive_at = now + keepalive_seconds()
                follower.needs_catch_up = True  # a read of the stream, in case
                with contextlib.suppress(StreamUnreadable):
                    await stream.end_if_finished_without_marker()
                continue
            if follower.pending and not follower.needs_catch_up:
                continue
            wake_at = min(ends_at, keepalive_at)
            if follower.needs_catch_up:
                wake_at = min(wake_at, retry_at or now)
                if wake_at <= now:
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(follower.woken.wait(), timeout=wake_at - now)
    finally:
        watcher.cancel()
