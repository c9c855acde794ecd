"""Django's PostgreSQL backend with a health check that skips connections in steady use.

With CONN_HEALTH_CHECKS, Django pings the server (`SELECT 1`) before the first query of every
request: on a busy web process that is one more round trip on every submit and every poll, about
a sixth of a submit's time. Connections die mostly while they sit idle (a server restart, an idle
timeout in a proxy or firewall), so this backend pings only a connection that has not been used
for HEALTH_CHECK_IDLE_SECONDS (settings; default 1 s). If a connection in steady use did die, the
request fails (the API answers 503 with Retry-After) and Django discards the connection at the
end of that request, exactly as it does without health checks.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
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
