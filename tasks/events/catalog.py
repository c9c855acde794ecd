"""Event names (the SSE `event:` field and the webhook `event` field) and callback_events."""

from __future__ import annotations

from collections.abc import Iterable

QUEUED = "task.queued"
STARTED = "task.started"
PROGRESS = "task.progress"
LOG = "task.log"
OUTPUT_DELTA = "task.output.delta"
FINISHED = "task.finished"

STREAM_EVENTS = (QUEUED, STARTED, PROGRESS, LOG, OUTPUT_DELTA, FINISHED)

# What a submit's `callback_events` may list, in canonical order; "finished" is always
# delivered when there is a callback_url, listed or not.
CALLBACK_EVENT_KINDS = ("started", "progress", "log", "output", "finished")
INTERMEDIATE_KINDS = ("started", "progress", "log", "output")

# The stream event each intermediate webhook kind follows, and the webhook's own event name.
STREAM_EVENT_OF_KIND = {
    "started": STARTED,
    "progress": PROGRESS,
    "log": LOG,
    "output": OUTPUT_DELTA,
}
WEBHOOK_EVENT_OF_KIND = {
    "started": "task.started",
    "progress": "task.progress",
    "log": "task.log",
    "output": "task.output",
}
KIND_OF_STREAM_EVENT = {event: kind for kind, event in STREAM_EVENT_OF_KIND.items()}


def store_kinds(kinds: Iterable[str]) -> str:
    """The Task.callback_events column: the intermediate kinds asked for, canonical order."""
    wanted = set(kinds)
    return ",".join(kind for kind in INTERMEDIATE_KINDS if kind in wanted)


def stored_kinds(value: str) -> frozenset[str]:
    return frozenset(kind for kind in value.split(",") if kind)


def listed_kinds(value: str) -> list[str]:
    """The poll body's `callback.events`: what will be POSTed, finished included."""
    return [*(kind for kind in INTERMEDIATE_KINDS if kind in stored_kinds(value)), "finished"]
