"""Counters bound for Redis (charts and /metrics), batched per process inside workers.

A worker finishes hundreds of tasks a second; a Redis round trip per task only to bump the
charts' and the metrics' counters was a visible share of a task's time in the worker
(docs/benchmarks.md, "Measurements behind design choices"). Inside
a worker (`start_batching()`, called by tasks.execution.worker) increments collect here and the
worker's background thread writes them in one pipeline every FLUSH_SECONDS and on shutdown.
Everywhere else (web, management commands) each increment is written at once.

Counts never decide anything, they only feed charts and metrics: a worker killed with -9 loses at
most FLUSH_SECONDS of them, and increments that could not be written (Redis away) are kept and
retried with the next flush.
"""

from __future__ import annotations

import logging
import threading

import redis

from tasks.plumbing.queueing import redis_client

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0

# (key, hash field or None) -> amount; key -> expiry in seconds
_pending: dict[tuple[str, str | None], int | float] = {}
_expiry: dict[str, int] = {}
_lock = threading.Lock()
_batching = False


def start_batching() -> None:
    """From now on this process's increments wait for `flush()` (the worker calls it)."""
    global _batching
    _batching = True


def add(key: str, amount: int | float = 1, *, field: str | None = None,
        expire: int | None = None) -> None:  # fmt: skip
    """INCRBY / HINCRBY (…FLOAT for a float amount) `key` [`field`] by `amount`."""
    with _lock:
        slot = (key, field)
        _pending[slot] = _pending.get(slot, 0) + amount
        if expire:
            _expiry[key] = expire
    if not _batching:
        flush()


def flush() -> bool:
    """Write every pending increment in one pipeline; False (and kept) if Redis failed."""
    with _lock:
        if not _pending:
            return True
        pending, expiry = dict(_pending), dict(_expiry)
        _pending.clear()
        _expiry.clear()
    try:
        pipeline = redis_client().pipeline(transaction=False)
        for (key, field), amount in pending.items():
            if field is None:
                if isinstance(amount, float):
                    pipeline.incrbyfloat(key, amount)
                else:
                    pipeline.incrby(key, amount)
            elif isinstance(amount, float):
                pipeline.hincrbyfloat(key, field, amount)
            else:
                pipeline.hincrby(key, field, amount)
        for key, seconds in expiry.items():
            pipeline.expire(key, seconds)
        pipeline.execute()
    except redis.RedisError:
        logger.warning("could not write %d counters to Redis; will retry", len(pending))
        with _lock:
            for slot, amount in pending.items():
                _pending[slot] = _pending.get(slot, 0) + amount
            for key, seconds in expiry.items():
                _expiry.setdefault(key, seconds)
        return False
    return True
