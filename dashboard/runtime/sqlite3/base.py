"""Django's SQLite backend whose write transactions wait for the lock by polling, not by
SQLite's busy handler.

SQLite has one writer. A `BEGIN IMMEDIATE` that finds the write lock taken is put to sleep by
the busy handler for 1, 2, 5, 10, 15, 20, 25 ms and so on, and tries again only then: a wait
for a lock held a few milliseconds becomes a wait for the next try, and a writer that takes
the lock for many short transactions in a row (a batch's chunks) takes it again before the
sleeper wakes (docs/benchmarks.md, "Batches"). A `BEGIN IMMEDIATE` that fails has done
nothing, so this backend tries it with the busy handler off and sleeps LOCK_POLL_SECONDS
between tries (LOCK_POLL_SLOW_SECONDS once a wait is long), up to the connection's `timeout`.
Statements outside a transaction keep SQLite's busy handler.
"""

from __future__ import annotations

import sqlite3
import time

from django.db.backends.sqlite3 import base

LOCK_POLL_SECONDS = 0.0005
LOCK_POLL_SLOW_AFTER_SECONDS = 0.1  # a wait this long is not a short chunk's: poll less often
LOCK_POLL_SLOW_SECONDS = 0.005
DEFAULT_TIMEOUT_SECONDS = 5.0  # sqlite3.connect's own default


class DatabaseWrapper(base.DatabaseWrapper):
    transaction_mode: str | None  # set by get_connection_params; django-stubs does not declare it

    def _start_transaction_under_autocommit(self) -> None:
        if self.transaction_mode != "IMMEDIATE":
            super()._start_transaction_under_autocommit()  # type: ignore[misc]
            return
        raw = self.connection
        timeout = float(self.settings_dict["OPTIONS"].get("timeout", DEFAULT_TIMEOUT_SECONDS))
        began = time.monotonic()
        raw.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    raw.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as error:
                    waited = time.monotonic() - began
                    if not _is_busy(error) or waited >= timeout:
                        with self.wrap_database_errors:
                            raise
                time.sleep(
                    LOCK_POLL_SECONDS
                    if waited < LOCK_POLL_SLOW_AFTER_SECONDS
                    else LOCK_POLL_SLOW_SECONDS
                )
        finally:
            raw.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")


def _is_busy(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", None) is not None and (
        error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
    )
