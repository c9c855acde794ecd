"""The reconciler's pass lock cannot outlive a dead pass by more than one rule's worth of time.

A pass cut off by a Redis outage never releases its lock, and Redis keeps the key with its TTL
across a restart. With the former 300 s TTL every pass after the outage skipped for up to five
minutes while the tasks submitted during the outage stayed pending."""

from __future__ import annotations

import pytest

from tasks.plumbing.queueing import redis_client
from tasks.upkeep import reconciler

pytestmark = pytest.mark.django_db


def test_a_lock_left_by_a_dead_pass_expires_within_the_short_ttl():
    client = redis_client()
    client.delete(reconciler.LOCK_KEY)
    dead_pass = client.lock(reconciler.LOCK_KEY, timeout=reconciler.LOCK_TTL)
    assert dead_pass.acquire(blocking=False)  # never released, like a pass Redis cut off
    try:
        assert reconciler.reconcile().skipped
        assert 0 < client.pttl(reconciler.LOCK_KEY) <= reconciler.LOCK_TTL * 1000
        assert reconciler.LOCK_TTL <= 30
    finally:
        client.delete(reconciler.LOCK_KEY)
    assert not reconciler.reconcile().skipped  # gone: the next pass runs


def test_the_lock_is_renewed_before_each_rule(monkeypatch):
    client = redis_client()
    client.delete(reconciler.LOCK_KEY)
    seen: dict[str, int] = {}

    def recording(name, rule):
        def run(*args, **kwargs):
            seen[name] = client.pttl(reconciler.LOCK_KEY)
            client.pexpire(reconciler.LOCK_KEY, 1000)  # as if the rule had used most of the TTL
            return rule(*args, **kwargs)

        return run

    for name in ("_recover_lost_running", "_reschedule_callbacks"):
        monkeypatch.setattr(reconciler, name, recording(name, getattr(reconciler, name)))
    report = reconciler.reconcile()
    assert not report.skipped
    # Each later rule found the TTL back near LOCK_TTL, not the 1 s the rule before left.
    assert all(ttl > (reconciler.LOCK_TTL - 5) * 1000 for ttl in seen.values()), seen
    assert client.exists(reconciler.LOCK_KEY) == 0  # released at the end
