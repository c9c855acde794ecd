"""Retention at scale (a benchmark, not a test): cleanup of a large expired backlog while clients
keep submitting, on the database DATABASE_URL names (seed it first).

    DATABASE_URL=postgres://…/taskhook_bench python manage.py seed_tasks 1000000 --days 30
    DATABASE_URL=postgres://…/taskhook_bench REDIS_URL=redis://127.0.0.1:6379/13 \\
        python bench/retention.py

Prints rows removed, time taken, rows/s, and the submit latency (p50, p99, worst) measured by a
client submitting over HTTP to gunicorn during the whole cleanup; appends them to
docs/benchmarks.md.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
os.environ.setdefault("DEBUG", "true")

import django  # noqa: E402

django.setup()

from bench.common import free_port, start_gunicorn  # noqa: E402
from tasks.applications import create_application  # noqa: E402
from tasks.models import Task  # noqa: E402
from tasks.upkeep.retention import run_cleanup  # noqa: E402


def main() -> None:
    before = Task.objects.count()
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
            time.sleep(0.02)  # ~40 submits/s: steady traffic, not a load test

    thread = threading.Thread(target=submitter, daemon=True)
    try:
        thread.start()
        time.sleep(2)
        baseline = sorted(latencies)
        latencies.clear()
        started = time.perf_counter()
        run = run_cleanup(trigger="command")
        took = time.perf_counter() - started
        stop.set()
        thread.join(5)
    finally:
        server.terminate()
        server.wait(10)
    during = sorted(latencies)

    def pct(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(len(values) * p))]

    lines = [
        f"| tasks before / removed | {before} / {run.total_removed} |",
        f"| cleanup time | {took:.1f} s ({run.total_removed / took:.0f} rows/s, "
        f"batches of 1,000) |",
        f"| submit latency before cleanup p50 / p99 | {pct(baseline, 0.5):.1f} / "
        f"{pct(baseline, 0.99):.1f} ms |",
        f"| submit latency during cleanup p50 / p99 / worst | {pct(during, 0.5):.1f} / "
        f"{pct(during, 0.99):.1f} / {during[-1]:.1f} ms ({len(during)} submits) |",
    ]
    table = "| retention benchmark | |\n| --- | --- |\n" + "\n".join(lines)
    print(table)
    database = django.db.connection.vendor
    with (BASE_DIR / "docs" / "benchmarks.md").open("a") as doc:
        doc.write(
            f"\n## Retention cleanup ({database}, {datetime.now(UTC):%Y-%m-%d})\n\n"
            "`python bench/retention.py` on a database seeded with `seed_tasks 1000000 --days 30` "
            "(about 97 % of it past the 24 h retention), while one client submits ~40 tasks/s "
            "over HTTP.\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
