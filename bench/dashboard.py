"""Dashboard latency at scale beside its peer, under gunicorn (a benchmark, not a test).

    DATABASE_URL=postgres://…/taskhook_bench10m python manage.py seed_tasks 10000000 --apps 50
    DATABASE_URL=postgres://…/taskhook_bench10m REDIS_URL=redis://…/9 python bench/dashboard.py

Logs in as a staff user and times each page, and django-rq's home (`/django-rq/`) on the same
server, interleaved request by request: each round asks every page once, in an order rotated
from round to round, so a slow second of the host lands on every page alike. Prints each page's
median and p95 in ms and its median as a ratio to django-rq's home median, against the page's
target, and writes the section "Dashboard at N tasks" of docs/benchmarks.md (in place of the
previous one of that size). BENCH_RUNS (default 40) timed rounds after 3 warm-up rounds.
"""

from __future__ import annotations

import os
import platform
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

from bench.common import free_port, start_gunicorn, write_report_section  # noqa: E402
from tasks.models import Application, Batch, Endpoint, Task  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", 40))
WARMUP = 3
PEER = "django-rq home"
WORKERS = 2


def login(base: str) -> requests.Session:
    if not User.objects.filter(username="bench-admin").exists():
        User.objects.create_superuser("bench-admin", "bench@example.com", "bench-password-123")
    session = requests.Session()
    page = session.get(f"{base}/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    session.post(
        f"{base}/accounts/login/",
        data={"username": "bench-admin", "password": "bench-password-123",
              "csrfmiddlewaretoken": token},
        headers={"Referer": f"{base}/accounts/login/"},
    )  # fmt: skip
    return session


def get(session: requests.Session, url: str) -> float:
    """One request's time in ms. A redirect would be the login page (a session cookie not sent
    back, e.g. a Secure cookie over plain HTTP with DEBUG off): timing it would measure the
    wrong page."""
    started = time.perf_counter()
    response = session.get(url, allow_redirects=False)
    took = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise SystemExit(f"{url} answered {response.status_code}, not the page: not logged in?")
    return took


def interleaved(session: requests.Session, base: str, pages: dict[str, str]) -> dict[str, list]:
    """RUNS rounds of one request per page (after WARMUP rounds), the order rotated each round."""
    names = list(pages)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(WARMUP + RUNS):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            took = get(session, base + pages[name])
            if round_ >= WARMUP:
                samples[name].append(took)
    return samples


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.95) - 1)]


def prepare() -> None:
    """What the cron process keeps in production: the failure fingerprints of rows loaded
    without them (its backfill job, run to the end; seed_tasks stores them, so it finds none)."""
    from tasks import triage

    started = time.perf_counter()
    while sum(triage.backfill(batch=5000, batches=20)):
        pass
    print(f"failure fingerprints: {time.perf_counter() - started:.1f} s")


def targets() -> dict[str, float]:
    """Each page's target: its median at most this times django-rq's home median."""
    return {
        "Overview": 1.0,
        "Tasks, 100 rows, app + status filter": 1.0,
        "Task": 0.5,
        "Batch": 1.0,
        "Endpoint": 1.0,
        "Failures": 1.0,
    }


def pages() -> dict[str, str]:
    """The pages of issue #23, on the seeded data: the first seeded application by name, its newest
    failed task with a callback, the largest batch, the application's endpoint."""
    apps = Application.objects.order_by("name")
    app = apps.filter(name__startswith="seed-").first() or apps.first()
    assert app is not None, "no application: seed the database first (seed_tasks)"
    task = (
        Task.objects.filter(application=app, status="failed")
        .exclude(callback_url="")
        .order_by("-created_at")
        .first()
    ) or Task.objects.order_by("-created_at").first()
    batch = Batch.objects.order_by("-total").first()
    endpoint = Endpoint.objects.filter(application=app).order_by("id").first()
    found = {
        PEER: "/django-rq/",
        "Overview": "/",
        "Tasks, 100 rows, app + status filter": f"/tasks/?size=100&application={app.pk}"
        "&status=failed",
        "Task": f"/tasks/{task.pk}/" if task else "",
        "Batch": f"/batches/{batch.pk}/" if batch else "",
        "Endpoint": f"/endpoints/{endpoint.pk}/" if endpoint else "",
        "Failures": "/failures/",
    }
    missing = [name for name, path in found.items() if not path]
    if missing:
        print(f"not timed (nothing to show): {', '.join(missing)}", file=sys.stderr)
    return {name: path for name, path in found.items() if path}


def main() -> None:
    began = time.monotonic()
    prepare()
    total = Task.objects.count()
    timed = pages()
    port = free_port()
    server = start_gunicorn(port, dict(os.environ), workers=WORKERS)
    base = f"http://127.0.0.1:{port}"
    try:
        session = login(base)
        samples = interleaved(session, base, timed)
    finally:
        server.terminate()
        server.wait(10)
    peer = statistics.median(samples[PEER])
    goals = targets()
    rows = ["| page | URL | median ms | p95 ms | median / django-rq home | target | met |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name, values in samples.items():
        median = statistics.median(values)
        ratio = median / peer
        goal = goals.get(name)
        met = "" if goal is None else ("yes" if ratio <= goal else "**no**")
        shown = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "…", timed[name])
        rows.append(f"| {name} | `{shown}` | {median:.1f} | {p95(values):.1f} | {ratio:.2f} | "
                    f"{'' if goal is None else f'≤ {goal:.1f}'} | {met} |")  # fmt: skip
    table = "\n".join(rows)
    print(f"{total} tasks in the database\n{table}")
    title = f"Dashboard at {total:,} tasks"
    apps = Application.objects.count()
    section = (
        f"## {title}\n"
        f"<!-- bench/dashboard.py: this section is rewritten by each run at this size -->\n\n"
        f"`python bench/dashboard.py` ({connection.vendor}, {datetime.now(UTC):%Y-%m-%d %H:%M} "
        f"UTC, {platform.machine()}, {os.cpu_count()} cores shared with other work; "
        f"{time.monotonic() - began:.0f} s in all) on {total:,} tasks over {apps} applications "
        f"(`seed_tasks {total} --apps 50`): gunicorn ({WORKERS} processes), a logged-in staff "
        f"user, {RUNS} timed rounds after {WARMUP} warm-up rounds, each round one request per "
        f"page in a rotated order, django-rq's home (`/django-rq/`) among them. Ratios are of "
        f"medians to django-rq's home median in the same run.\n\n"
        f"{table}\n"
    )
    write_report_section(title, section)


if __name__ == "__main__":
    main()
