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
from tasks.models import Application, Task  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", 40))


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


def main() -> None:
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
        }  # fmt: skip
        first = session.get(f"{base}/tasks/?size=100&application={app.pk}&status=failed").text
        next_cursor = re.search(r"cursor=([A-Za-z0-9_=-]+)", first)
        if next_cursor:
            pages["Tasks, 100 rows, page 2 (keyset)"] = (
                f"/tasks/?size=100&application={app.pk}&status=failed&cursor={next_cursor.group(1)}",
                None,
            )
        rows = ["| page | median ms | p95 ms |", "| --- | ---: | ---: |"]
        for name, (path, headers) in pages.items():
            if not path:
                continue
            samples = sorted(timed(session, base + path, headers))
            p95 = samples[int(len(samples) * 0.95) - 1]
            rows.append(f"| {name} | {statistics.median(samples):.1f} | {p95:.1f} |")
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
