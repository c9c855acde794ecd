"""dashboard/runtime/sqlite3: a write transaction waits for SQLite's write lock by trying
BEGIN IMMEDIATE again every LOCK_POLL_SECONDS, not by SQLite's busy handler (which tries once
more after 1, 2, 5, 10, ... ms), gives up after the connection's timeout with Django's error,
and puts the busy handler back for every other statement."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from django.db import OperationalError, connection

from dashboard.runtime.sqlite3.base import DatabaseWrapper


def wrapper(path, *, timeout: float) -> DatabaseWrapper:
    settings_dict = {
        **connection.settings_dict,
        "ENGINE": "dashboard.runtime.sqlite3",
        "NAME": str(path),
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": timeout},
    }
    db = DatabaseWrapper(settings_dict, alias="lock-wait-probe")
    db.ensure_connection()
    return db


@pytest.fixture(autouse=True)
def own_files_only(django_db_blocker):
    """These tests open their own database files, never the test database."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def holder(tmp_path):
    """Another connection to the same file, holding the write lock until released."""
    path = tmp_path / "lock.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("CREATE TABLE t (x integer)")
    other.execute("BEGIN IMMEDIATE")
    yield path, other
    if other.in_transaction:
        other.execute("ROLLBACK")
    other.close()


def begins_tried(db: DatabaseWrapper) -> list[str]:
    tried: list[str] = []
    db.connection.set_trace_callback(
        lambda statement: tried.append(statement) if statement.startswith("BEGIN") else None
    )
    return tried


def test_the_transaction_begins_once_the_holder_commits_after_many_tries(holder):
    path, other = holder
    db = wrapper(path, timeout=10)
    tried = begins_tried(db)
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        db._start_transaction_under_autocommit()
    finally:
        release.join()
    assert db.connection.in_transaction
    # SQLite's busy handler would run BEGIN once and retry inside it: one trace.
    assert len(tried) >= 10, len(tried)
    db.connection.execute("INSERT INTO t VALUES (1)")
    db.connection.execute("COMMIT")
    assert db.connection.execute("PRAGMA busy_timeout").fetchone() == (10_000,)
    db.close()


def test_it_gives_up_after_the_timeout_with_djangos_error_and_the_busy_handler_back(holder):
    path, _ = holder
    db = wrapper(path, timeout=0.05)
    began = time.monotonic()
    with pytest.raises(OperationalError, match="locked"):
        db._start_transaction_under_autocommit()
    assert time.monotonic() - began >= 0.05
    assert not db.connection.in_transaction
    assert db.connection.execute("PRAGMA busy_timeout").fetchone() == (50,)
    db.close()


def test_a_free_lock_is_taken_at_the_first_try(tmp_path):
    db = wrapper(tmp_path / "free.sqlite3", timeout=5)
    tried = begins_tried(db)
    db._start_transaction_under_autocommit()
    assert db.connection.in_transaction and tried == ["BEGIN IMMEDIATE"]
    db.connection.execute("ROLLBACK")
    db.close()
