"""Dashboard latency at scale, under gunicorn (a benchmark, not a test).

    DATABASE_URL=postgres://…/taskhook_bench python manage.py seed_tasks 1000000
    DATABASE_URL=postgres://…/taskhook_bench python bench/dashboard.py

Logs in as a staff user and times each page 40 times after a warm-up; prints median and p95 in
ms per page. Run it against a database seeded with `seed_tasks`.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import django
import requests

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
os.environ.setdefault("DEBUG", "true")
django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.db import connection  # noqa: E402

from bench.common import free_port, start_gunicorn  # noqa: E402
from tasks.models import Application, ErrorGroup, Task  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", 40))
# Pages of the dashboard's second round, compared with the Overview in the same run.
NEW_PAGES: dict[str, tuple[str, None]] = {
    **{
        f"Work, {state} (50 rows, as it opens)": (f"/work/?state={state}", None)
        for state in (
            "queued",
            "scheduled",
            "deferred",
            "running",
            "failed",
            "callbacks",
            "given_up",
        )
    },
    "Workers": ("/workers/", None),
    "Failures, task errors": ("/failures/?kind=task", None),
    "Failures, callbacks": ("/failures/?kind=callback", None),
}


def login(base: str) -> requests.Session:
    if not User.objects.filter(username="bench-admin").exists():
        User.objects.create_superuser("bench-admin", "bench@example.com", "bench-password-123")
    session = requests.Session()
    page = session.get(f"{base}/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    session.post(
        f"{base}/accounts/login/",
        data={"username": "bench-admin", "password": "bench-password-123",
              "csrfmiddlewaretoken": token},
        headers={"Referer": f"{base}/accounts/login/"},
    )  # fmt: skip
    return session


def get(session: requests.Session, url: str, headers: dict | None) -> requests.Response:
    # A redirect would be the login page (a session cookie not sent back, e.g. a Secure cookie
    # over plain HTTP with DEBUG off): timing it would measure the wrong page.
    response = session.get(url, headers=headers, allow_redirects=False)
    if response.status_code != 200:
        raise SystemExit(f"{url} answered {response.status_code}, not the page: not logged in?")
    return response


def timed(session: requests.Session, url: str, headers: dict | None = None) -> list[float]:
    for _ in range(3):
        get(session, url, headers)
    samples = []
    for _ in range(RUNS):
        started = time.perf_counter()
        get(session, url, headers)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def prepare() -> None:
    """What the cron process keeps in production: the rollups (History's 7 days) and the
    failure fingerprints of rows seeded without them (its backfill job, run to the end)."""
    from tasks import triage
    from tasks.telemetry import rollups

    started = time.perf_counter()
    rollups.roll_up()
    print(f"rollups: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    while sum(triage.backfill(batch=5000, batches=20)):
        pass
    print(f"failure fingerprints: {time.perf_counter() - started:.1f} s")


def main() -> None:
    prepare()
    total = Task.objects.count()
    app = Application.objects.order_by("name").first()
    task = Task.objects.filter(status="failed").order_by("-created_at").first()
    port = free_port()
    server = start_gunicorn(port, dict(os.environ), workers=2)
    base = f"http://127.0.0.1:{port}"
    try:
        session = login(base)
        pages = {
            "Overview (page)": ("/", None),
            "Overview (HTMX poll)": ("/", {"HX-Request": "true"}),
            "Tasks, 100 rows": ("/tasks/?size=100", None),
            "Tasks, 100 rows, app+status filter": (
                f"/tasks/?size=100&application={app.pk}&status=failed", None),
            "Tasks, 100 rows, page 2 (keyset)": (None, None),
            "Tasks, search by id prefix": (f"/tasks/?q={str(task.id)[:8]}", None),
            "Tasks, search by user": ("/tasks/?q=customer_00042", None),
            "Failed callbacks, 100 rows": ("/callbacks/failed/?size=100", None),
            "Task detail": (f"/tasks/{task.id}/", None),
            "Application detail": (f"/applications/{app.pk}/", None),
            "History, 1 h": ("/history/?range=1h", None),
            "History, 24 h": ("/history/?range=24h", None),
            "History, 7 days": ("/history/?range=7d", None),
            "History, 7 days, one app": (f"/history/?range=7d&application={app.pk}", None),
            "Audit": ("/audit/", None),
            "Audit, by action": ("/audit/?action=application.update", None),
            **NEW_PAGES,
        }  # fmt: skip
        group = ErrorGroup.objects.filter(kind="task").order_by("-last_seen").first()
        if group:
            pages["Tasks of one error group, 100 rows"] = (
                f"/tasks/?size=100&error_fingerprint={group.fingerprint}", None)  # fmt: skip
        first = session.get(f"{base}/tasks/?size=100&application={app.pk}&status=failed").text
        next_cursor = re.search(r"cursor=([A-Za-z0-9_=-]+)", first)
        if next_cursor:
            pages["Tasks, 100 rows, page 2 (keyset)"] = (
                f"/tasks/?size=100&application={app.pk}&status=failed&cursor={next_cursor.group(1)}",
                None,
            )
        rows = ["| page | median ms | p95 ms | median / Overview |", "| --- | ---: | ---: | ---: |"]
        overview_median = None
        for name, (path, headers) in pages.items():
            if not path:
                continue
            samples = sorted(timed(session, base + path, headers))
            p95 = samples[int(len(samples) * 0.95) - 1]
            median = statistics.median(samples)
            overview_median = overview_median or median  # the first page is the Overview
            rows.append(f"| {name} | {median:.1f} | {p95:.1f} | {median / overview_median:.2f} |")
        table = "\n".join(rows)
        print(f"{total} tasks in the database\n{table}")
        with (BASE_DIR / "docs" / "benchmarks.md").open("a") as doc:
            doc.write(
                f"\n## Dashboard at {total:,} tasks ({connection.vendor}, "
                f"{datetime.now(UTC):%Y-%m-%d})\n\n"
                "`python bench/dashboard.py` after `seed_tasks 1000000 --days 30`: gunicorn "
                f"(2 processes), a logged-in staff user, {RUNS} timed requests per page after a "
                "warm-up. Targets: Overview <= 22 ms, Tasks (100 rows, filtered) <= 60 ms, "
                "Task detail <= 25 ms.\n\n"
                f"{table}\n"
            )
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
