"""How many blocking submits may wait at once: the cap that keeps them from starving the server.

A blocking submit holds a web thread for up to its timeout. Without a cap, a burst of them takes
every thread of every process, and health checks and polls queue behind them. Each web process
lets at most BLOCKING_MAX_WAITS requests wait at once, and at most BLOCKING_MAX_WAITS_PER_KEY of
one API key; a blocking submit past either cap answers 202 with its task at once, as one whose
wait ran out does (the client polls). The counts are per process: that is what a thread is.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings

_lock = threading.Lock()
_waiting = 0
_waiting_by_key: Counter[int] = Counter()


@contextmanager
def wait_slot(*, key_id: int) -> Iterator[bool]:
    """Yields True when this request may wait for its task, False when it must answer now."""
    global _waiting
    with _lock:
        granted = (
            _waiting < settings.BLOCKING_MAX_WAITS
            and _waiting_by_key[key_id] < settings.BLOCKING_MAX_WAITS_PER_KEY
        )
        if granted:
            _waiting += 1
            _waiting_by_key[key_id] += 1
    try:
        yield granted
    finally:
        if granted:
            with _lock:
                _waiting -= 1
                _waiting_by_key[key_id] -= 1
                if not _waiting_by_key[key_id]:
                    del _waiting_by_key[key_id]
