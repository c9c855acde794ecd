"""Retention at scale (a benchmark, not a test): cleanup of a large expired backlog while a
client keeps submitting, on the database DATABASE_URL names (seed it first).

    DATABASE_URL=postgres://…/taskhook_bench10m python manage.py seed_tasks 10400000 --apps 50
    DATABASE_URL=postgres://…/taskhook_bench10m REDIS_URL=redis://127.0.0.1:6379/9 \\
        python bench/retention.py

The cleanup is `manage.py cleanup_tasks` (what the cron process runs), in its own process; a
client submits over HTTP to gunicorn (2 processes) during the whole cleanup, one submit after
another with a 20 ms pause (about 40 tasks/s).
BENCH_DEADLINE (seconds, default none) stops the cleanup there (its open batch rolls back):
the rows removed by then are counted, and the rate gives the time the whole backlog would
take. Prints expired rows, rows removed, time taken, rows/s and the submit latency (p50, p99,
worst) before and during; writes the section "Retention of N expired tasks" of
docs/benchmarks.md (BENCH_TITLE overrides the title).
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
os.environ.setdefault("DEBUG", "true")

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402
from django.db.models import Q  # noqa: E402
from django.utils import timezone  # noqa: E402

from bench.common import base_env, free_port, start_gunicorn, write_report_section  # noqa: E402
from tasks.applications import create_application  # noqa: E402
from tasks.models import Application, Task  # noqa: E402
from tasks.plumbing.queueing import redis_client  # noqa: E402
from tasks.statuses import CALLBACK_IN_FLIGHT, FINISHED  # noqa: E402
from tasks.upkeep import retention  # noqa: E402

DEADLINE = float(os.environ.get("BENCH_DEADLINE", 0)) or None
SUBMIT_PAUSE = 0.02  # between one answer and the next submit: steady traffic, not a load test


def expired_count() -> int:
    """What a cleanup would remove now, every application at once (one count)."""
    now = timezone.now()
    expired = Q()
    for app in Application.objects.only("id", "retention_hours"):
        cutoff = now - timedelta(hours=app.retention_hours)
        expired |= Q(application=app, finished_at__lt=cutoff)
    found = Task.objects.filter(expired, status__in=FINISHED)
    return found.exclude(callback_status__in=CALLBACK_IN_FLIGHT).count()


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def main() -> None:
    began = time.monotonic()
    before = Task.objects.count()
    expired = expired_count()
    print(f"{before} tasks, {expired} expired", flush=True)
    app = create_application(name=f"retention-bench-{time.time_ns()}", runner="echo")
    app.application.rate_limit_per_second = 1e6
    app.application.rate_limit_burst = 10**6
    app.application.save()
    port = free_port()
    server = start_gunicorn(port, dict(os.environ), workers=2)
    latencies: list[float] = []
    stop = threading.Event()

    def submitter() -> None:
        client = http.client.HTTPConnection("127.0.0.1", port)
        body = json.dumps({"inputs": {"q": 1}, "response_mode": "async"})
        headers = {"Authorization": f"Bearer {app.api_key}", "Content-Type": "application/json"}
        path = f"/api/applications/{app.application.id}/generate"
        while not stop.is_set():
            started = time.perf_counter()
            client.request("POST", path, body=body, headers=headers)
            response = client.getresponse()
            response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status == 200, response.status
            time.sleep(SUBMIT_PAUSE)

    thread = threading.Thread(target=submitter, daemon=True)
    stopped = False
    try:
        thread.start()
        time.sleep(5)
        baseline = sorted(latencies)
        latencies.clear()
        started = time.perf_counter()
        # As the cron process runs it: DEBUG off (no query log kept per statement).
        cleanup = subprocess.Popen(
            [sys.executable, "manage.py", "cleanup_tasks"], cwd=BASE_DIR, env=base_env(),
            stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            cleanup.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(cleanup.pid, signal.SIGTERM)
            cleanup.wait(60)
            # Killed, it left its lock (a TTL of half an hour) behind: the next run needs it.
            redis_client().delete(retention.LOCK_KEY)
        took = time.perf_counter() - started
        stop.set()
        thread.join(5)
    finally:
        server.terminate()
        server.wait(10)
    during = sorted(latencies)
    after = Task.objects.count()
    removed = before + len(baseline) + len(during) - after
    rate = removed / took
    state = (
        f"stopped at the {DEADLINE:.0f} s deadline, {expired - removed:,} left; the whole "
        f"backlog at this rate: {expired / rate / 60:.1f} min"
        if stopped
        else "finished"
    )
    rows = [
        ("tasks before / expired", f"{before:,} / {expired:,}"),
        ("removed", f"{removed:,} in {took / 60:.1f} min ({rate:,.0f} rows/s; {state})"),
        ("submit latency before cleanup p50 / p99",
         f"{pct(baseline, 0.5):.1f} / {pct(baseline, 0.99):.1f} ms ({len(baseline)} submits)"),
        ("submit latency during cleanup p50 / p99 / worst",
         f"{pct(during, 0.5):.1f} / {pct(during, 0.99):.1f} / {during[-1]:.1f} ms "
         f"({len(during)} submits)"),
    ]  # fmt: skip
    table = "| retention benchmark | |\n| --- | --- |\n" + "\n".join(
        f"| {label} | {value} |" for label, value in rows
    )
    print(table)
    title = os.environ.get("BENCH_TITLE") or f"Retention of {expired:,} expired tasks"
    section = (
        f"## {title}\n"
        f"<!-- bench/retention.py: this section is rewritten by each run of this title -->\n\n"
        f"`python bench/retention.py` ({connection.vendor}, {datetime.now(UTC):%Y-%m-%d %H:%M} "
        f"UTC, {platform.machine()}, {os.cpu_count()} cores shared with other work; "
        f"{time.monotonic() - began:.0f} s in all): `manage.py cleanup_tasks` on {before:,} "
        f"tasks over {Application.objects.count()} applications, while one client submits "
        f"over HTTP to gunicorn (2 processes), one submit after another with a "
        f"{SUBMIT_PAUSE * 1000:.0f} ms pause. Target: the cleanup done in at most 10 min, "
        f"submit p99 at most 100 ms meanwhile.\n\n"
        f"{table}\n"
    )
    write_report_section(title, section)


if __name__ == "__main__":
    main()
