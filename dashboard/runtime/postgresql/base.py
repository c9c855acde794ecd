"""Django's PostgreSQL backend with a health check that skips connections in steady use.

With CONN_HEALTH_CHECKS, Django pings the server (`SELECT 1`) before the first query of every
request: on a busy web process that is one more round trip on every submit and every poll
(docs/benchmarks.md). Connections die mostly while they sit idle (a server restart, an idle
timeout in a proxy or firewall), so this backend pings only a connection that has not been used
for HEALTH_CHECK_IDLE_SECONDS (settings; default 1 s). If a connection in steady use did die, the
request fails (the API answers 503 with Retry-After) and Django discards the connection at the
end of that request, exactly as it does without health checks.
"""

from __future__ import annotations

import time

import psycopg
from django.conf import settings
from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    # Set by BaseDatabaseWrapper.__init__ and connect(); django-stubs does not declare them.
    health_check_enabled: bool
    health_check_done: bool
    _last_used: float = 0.0

    def close_if_health_check_failed(self) -> None:
        if (
            self.connection is not None
            and self.health_check_enabled
            and not self.health_check_done
            and time.monotonic() - self._last_used < settings.HEALTH_CHECK_IDLE_SECONDS
        ):
            self.health_check_done = True
            return
        super().close_if_health_check_failed()

    def close_if_unusable_or_obsolete(self) -> None:
        # Runs at the start and at the end of each request; `health_check_done` is only set when
        # the connection was checked or used since the last reset, i.e. at the end of a request
        # that used it.
        if self.connection is not None and self.health_check_done:
            self._last_used = time.monotonic()
        super().close_if_unusable_or_obsolete()

    def get_new_connection(self, conn_params):
        connection = super().get_new_connection(conn_params)
        # Django turns psycopg's statement preparation off (for transaction-mode poolers). Its
        # own cursors bind on the client and never prepare; only `prepared_cursor` does.
        connection.prepare_threshold = 5
        return connection

    def prepared_cursor(self):
        """A cursor for the few hot statements (tasks.plumbing.rawsql): bound on the server and
        prepared once per connection, so PostgreSQL parses and plans each of them once rather than
        on every call (docs/benchmarks.md)."""
        self.close_if_health_check_failed()
        self.ensure_connection()
        with self.wrap_database_errors:
            # Private BaseDatabaseWrapper method, not in django-stubs.
            return self._prepare_cursor(PreparedCursor(self.connection))  # type: ignore[attr-defined]


class PreparedCursor(psycopg.Cursor):
    """Server-side binding, each statement prepared on its first run in a connection."""

    def execute(self, query, params=None, *, prepare=None, binary=None):
        return super().execute(query, params, prepare=prepare is not False, binary=binary)
