"""The event log of a task: one Redis stream per task, and a wake-up channel beside it.

Writers (the submit path, the worker, the finish paths) add an entry and publish an empty
wake-up in one pipelined round trip; readers (the SSE endpoint, tasks.api.events) wait on the
wake-up and read the entries after the last id they sent. Entry ids are Redis stream ids,
`<milliseconds>-<sequence>`: they increase within a task across its runs, which is what makes
`Last-Event-ID` resume exact. Each entry holds the event name (`e`), the run (`r`) and one line
of JSON (`d`).

Kept for replay EVENTS_TTL_HOURS after a task's last event, at most EVENTS_MAX_PER_TASK entries
(older ones are trimmed); retention deletes the stream with its task. The database keeps what
must survive Redis: status, progress, log lines, streamed output and the result. `task.finished`
is a marker here: readers render its body from the database.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable
from typing import Any, NamedTuple

import redis
from django.conf import settings

from tasks.plumbing.queueing import redis_client

logger = logging.getLogger(__name__)

# The braces are a Redis Cluster hash tag: a task's stream and wake-up name share a slot.
STREAM_PREFIX = "taskhook:events:"
WAKE_PREFIX = "taskhook:events-wake:"
_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
COMMANDS = 1  # what `add` queues per event: one script

# XADD (Redis's own id), EXPIRE, and PUBLISH of the whole entry, its id included, in one atomic
# command: a reader that follows the wake-up channel needs no read of the stream for a live
# event. EVAL, not EVALSHA: a pipeline (or a Redis that restarted) never meets NOSCRIPT.
ADD_SCRIPT = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'e', ARGV[3], 'r', ARGV[4], 'd', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], id .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[5])
return id
"""


class Event(NamedTuple):
    id: str
    event: str
    run: int
    data: str  # one line of JSON


def stream_key(task_id: uuid.UUID | str) -> str:
    return f"{STREAM_PREFIX}{{{task_id}}}"


def wake_channel(task_id: uuid.UUID | str) -> str:
    return f"{WAKE_PREFIX}{{{task_id}}}"


def encode_data(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def add(
    pipeline: redis.client.Pipeline,
    *,
    task_id: uuid.UUID | str,
    run: int,
    event: str,
    data: dict[str, Any],
) -> None:
    """Queue one event on `pipeline` (the caller executes it, with its own commands); the
    pipeline's answer for it is the event's id."""
    pipeline.eval(
        ADD_SCRIPT, 2, stream_key(task_id), wake_channel(task_id),
        settings.EVENTS_MAX_PER_TASK, settings.EVENTS_TTL_HOURS * 3600,
        event, run, encode_data({"run": run, **data}),
    )  # fmt: skip


def publish(*, task_id: uuid.UUID | str, run: int, event: str, data: dict[str, Any]) -> str | None:
    """Add one event now; its id. Best effort: while Redis is away the event is not streamed
    (what it reports is in the database, and a stream ends on the database's word when its
    finish marker is missing); None then."""
    pipeline = redis_client().pipeline(transaction=False)
    add(pipeline, task_id=task_id, run=run, event=event, data=data)
    try:
        entry_id, *_ = pipeline.execute()
    except redis.RedisError as exc:
        logger.warning("could not publish %s of task %s: %s", event, task_id, exc)
        return None
    return text(entry_id)


def decode(entry: tuple[Any, dict[Any, Any]]) -> Event:
    entry_id, fields = entry
    values = {text(k): text(v) for k, v in fields.items()}
    return Event(
        id=text(entry_id), event=values["e"], run=int(values.get("r") or 0), data=values["d"]
    )


def decode_message(payload: bytes | str) -> Event:
    """A wake-up message: the entry itself (`id`, event, run and data, one per line)."""
    entry_id, event, run, data = text(payload).split("\n", 3)
    return Event(id=entry_id, event=event, run=int(run), data=data)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_id(value: str) -> tuple[int, int] | None:
    """An event id as a comparable pair; None when it is not one (`0` is the start)."""
    if value == "0":
        return (0, 0)
    match = _ID.match(value)
    return (int(match[1]), int(match[2])) if match else None


def format_id(pair: tuple[int, int]) -> str:
    return f"{pair[0]}-{pair[1]}"


def delete(task_ids: Iterable[uuid.UUID | str]) -> None:
    """Drop the streams of tasks that retention removed (best effort: they expire anyway)."""
    keys = [stream_key(task_id) for task_id in task_ids]
    if not keys:
        return
    try:
        redis_client().unlink(*keys)
    except redis.RedisError:
        logger.warning("could not delete the event streams of %d tasks", len(keys))
