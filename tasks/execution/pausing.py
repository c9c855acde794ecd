"""Pausing a queue: no worker, wherever it runs, takes a job from it until it is resumed.

The database is the record (`PausedQueue`, one row per paused queue): a pause outlives a Redis
restart or flush. The workers read a Redis copy, a set at PAUSED_KEY holding the paused names
plus SENTINEL, a name no queue has. The sentinel makes a lost copy visible: an existing set
always has it, so a worker that finds no set at all knows Redis lost it and rebuilds it from the
table (`paused_names`); the cron process re-asserts it every 10 s anyway
(tasks.upkeep.maintenance.sample_stats_job).

A worker (tasks.execution.worker.LivenessMixin) reads the copy at most once a second, skips the
paused queues when it dequeues, puts a job it popped from a queue paused a moment before back at
the front, and idles while all of its queues are paused. So a pause takes effect within about a
second, and a resume too.

The maintenance queue cannot be paused: it runs the reconciler, the cleanups and the re-assertion
of this very set, and both worker kinds listen on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import redis
from django.conf import settings
from django.db import DatabaseError

from tasks.models import PausedQueue
from tasks.plumbing.lane_names import task_lanes
from tasks.plumbing.queueing import redis_client

logger = logging.getLogger(__name__)

PAUSED_KEY = "taskhook:paused-queues"
SENTINEL = "-"


class PauseRefused(ValueError):
    """The queue is unknown, or is one that may not be paused."""


def pausable_queues() -> tuple[str, ...]:
    return (settings.TASK_QUEUE, settings.CALLBACK_QUEUE)


def known_queues() -> tuple[str, ...]:
    return (settings.TASK_QUEUE, settings.CALLBACK_QUEUE, settings.MAINTENANCE_QUEUE)


@dataclass(frozen=True)
class Pause:
    name: str
    paused_at: datetime
    paused_by: str


def pause_queue(*, name: str, username: str) -> bool:
    """Pause `name` for every worker. True if it was running (False: already paused)."""
    if name == settings.MAINTENANCE_QUEUE:
        raise PauseRefused(
            f"The {name} queue cannot be paused: it runs the reconciler and the cleanups."
        )
    if name not in pausable_queues():
        raise PauseRefused(f"Unknown queue {name!r}.")
    # The row first (committed), then the copy: a re-assertion that read the table before the
    # row existed is aborted by this SADD (see reassert), so it never drops the pause.
    _, created = PausedQueue.objects.get_or_create(name=name, defaults={"paused_by": username})
    redis_client().sadd(PAUSED_KEY, SENTINEL, name)
    return created


def resume_queue(*, name: str, username: str) -> bool:
    """Resume `name`. True if it was paused. `username` is for symmetry with pause (the caller
    audits it)."""
    if name not in known_queues():
        raise PauseRefused(f"Unknown queue {name!r}.")
    deleted, _ = PausedQueue.objects.filter(name=name).delete()
    with redis_client().pipeline() as pipeline:
        pipeline.srem(PAUSED_KEY, name)
        pipeline.sadd(PAUSED_KEY, SENTINEL)
        pipeline.execute()
    return bool(deleted)


def paused_queues() -> dict[str, Pause]:
    """The paused queues, from the table (the record): name -> who paused it and when."""
    return {
        row.name: Pause(row.name, row.paused_at, row.paused_by)
        for row in PausedQueue.objects.order_by("name")
    }


def reassert(client: redis.Redis | None = None) -> set[str]:
    """Make the Redis copy equal the table; returns the paused names.

    WATCH makes it safe against a concurrent pause or resume: each writes the table and then
    the set, so if the set changes between our read of the table and our write, the write is
    aborted and done again from a fresh read."""
    client = client or redis_client()
    with client.pipeline() as pipeline:
        while True:
            try:
                pipeline.watch(PAUSED_KEY)
                names = set(PausedQueue.objects.values_list("name", flat=True))
                pipeline.multi()
                pipeline.delete(PAUSED_KEY)
                pipeline.sadd(PAUSED_KEY, SENTINEL, *sorted(names))
                pipeline.execute()
                return names
            except redis.WatchError:
                continue


def _with_lanes(names: set[str]) -> set[str]:
    """The task queue paused is each of its priority lanes paused."""
    if settings.TASK_QUEUE in names:
        names |= set(task_lanes(settings.TASK_QUEUE))
    return names


def paused_names(
    client: redis.Redis, *, after_rebuild: Callable[[], None] | None = None
) -> set[str]:
    """What a worker reads: the paused names from the Redis copy (one SMEMBERS), rebuilt from
    the table when Redis lost it (then `after_rebuild` runs: a forking worker closes the
    database connection its work horses would inherit). Raises Redis errors; a database that
    cannot be read while the copy is lost leaves nothing paused (logged), as the copy alone
    cannot say more."""
    members = {m.decode() if isinstance(m, bytes) else m for m in client.smembers(PAUSED_KEY)}
    if SENTINEL in members:
        members.discard(SENTINEL)
        return _with_lanes(members)
    try:
        return _with_lanes(reassert(client))
    except DatabaseError as error:
        logger.warning("could not read the paused queues from the database: %s", error)
        return set()
    finally:
        if after_rebuild is not None:
            after_rebuild()
