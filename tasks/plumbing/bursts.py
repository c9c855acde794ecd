"""A burst: a request that computes for seconds in a threaded web process (a batch's thousands
of items decoded, checked, stored and enqueued). Two process-wide settings change while one
runs, and are put back when the last one ends (bursts in overlapping threads are counted):

- Python's cyclic garbage collector is paused. Each full collection walks every tracked object,
  and the burst's survivors (tens of thousands of dicts, lists and model instances, all alive
  until it ends) set off several while they are built: about a fifth of a batch's CPU spent
  finding no garbage (docs/benchmarks.md, "Batches"). Reference counting still frees what has
  no cycles at once; what cycles the burst leaves are collected once it ends.
- The interpreter switches threads every BURST_SWITCH_SECONDS instead of every 5 ms. A short
  request in another thread of the process (another client's submit) waits for the GIL each
  time it comes back from the database or Redis; behind a thread that never blocks, that wait
  is the whole switch interval, a few times per request.
"""

from __future__ import annotations

import functools
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BURST_SWITCH_SECONDS = 0.0005

_lock = threading.Lock()
_holders = 0
_enable_gc_after = False
_switch_after = 0.005


@contextmanager
def burst() -> Iterator[None]:
    """The collector off and threads switched often for the block (and for any other thread's
    block that overlaps it)."""
    global _holders, _enable_gc_after, _switch_after
    with _lock:
        if _holders == 0:
            _enable_gc_after = gc.isenabled()
            _switch_after = sys.getswitchinterval()
            gc.disable()
            sys.setswitchinterval(min(_switch_after, BURST_SWITCH_SECONDS))
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                sys.setswitchinterval(_switch_after)
                if _enable_gc_after:
                    gc.enable()


def during[**P, R](function: Callable[P, R]) -> Callable[P, R]:
    """`function`'s calls run as a burst."""

    @functools.wraps(function)
    def burst_call(*args: P.args, **kwargs: P.kwargs) -> R:
        with burst():
            return function(*args, **kwargs)

    return burst_call
