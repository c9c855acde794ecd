"""Loaded before anything reads Django's settings (`-p tests.xdist_isolation` in pyproject.toml):
under pytest-xdist every worker process gets a Redis database of its own, so the suite's queues,
workers and counters of one process never meet another's. Test databases are pytest-django's
business (it suffixes their names with the worker id), and the processes a test starts inherit
both through `tests.conftest.subprocess_env`. Outside xdist this module does nothing."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDIS_DATABASES = 16  # Redis's default `databases`


def database_of(url: str) -> int:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return int(dict(parse_qsl(parts.query)).get("db", 0))
    return int(parts.path.strip("/") or 0)


def with_database(url: str, database: int) -> str:
    """`url` pointing at Redis database `database`."""
    if not 0 <= database < REDIS_DATABASES:
        raise RuntimeError(f"Redis has no database {database}")
    parts = urlsplit(url)
    if parts.scheme == "unix":  # urlunsplit would drop the empty host: unix:/path
        query = urlencode({**dict(parse_qsl(parts.query)), "db": database})
        return f"unix://{parts.netloc}{parts.path}?{query}"
    return urlunsplit(parts._replace(path=f"/{database}"))


def own_database(url: str, worker: str) -> str:
    """`url` with its database moved by the worker's index (gw0 keeps it), counting down from
    the top when counting up would pass the last database."""
    index, base = int(worker.removeprefix("gw")), database_of(url)
    return with_database(url, base + index if base + index < REDIS_DATABASES else base - index)


def spare_database(url: str) -> str:
    """A database no test process of this run uses (for a test that needs an empty Redis):
    the one furthest from the run's base."""
    base = database_of(url)
    return with_database(url, (base + REDIS_DATABASES // 2) % REDIS_DATABASES)


_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and os.environ.get("REDIS_URL"):
    os.environ["REDIS_URL"] = own_database(os.environ["REDIS_URL"], _worker)
