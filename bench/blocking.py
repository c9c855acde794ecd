"""A flood of blocking clients against gunicorn as `make run` serves it: `make bench` runs this.

150 clients each keep a blocking submit open (no worker runs, so every task stays pending and
every wait would last its full 30 s without the cap; a client answered at once comes back a
second later with a new one); meanwhile /healthz and a poll of another
task are timed once every 100 ms. Writes the "Blocking flood" section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BASE_DIR, free_port, start_gunicorn, write_report_section
from bench.run import percentile

CLIENTS = 150
PROBE_SECONDS = 10


def main() -> None:
    db = BASE_DIR / "var" / f"bench-blocking-{os.getpid()}.sqlite3"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
    os.environ.setdefault("DEBUG", "true")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{db}")
    import django

    django.setup()
    import requests
    from django.core.management import call_command

    from tasks.applications import create_application

    call_command("migrate", verbosity=0)
    app = create_application(name="flood", runner="echo")
    app.application.rate_limit_per_second = 0
    app.application.save()
    port = free_port()
    web = start_gunicorn(port, dict(os.environ))  # the config's defaults: 2 per core, 8 threads
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {app.api_key}", "Content-Type": "application/json"}
    submit_url = f"{base}/api/applications/{app.application.id}/generate"
    async_body = json.dumps({"inputs": {}, "response_mode": "async"})
    blocking_body = json.dumps({"inputs": {}, "response_mode": "blocking"})
    other = requests.post(submit_url, headers=headers, data=async_body, timeout=10).json()
    stop = threading.Event()
    statuses: list[int] = []

    def blocking_client(_: int) -> None:
        session = requests.Session()
        while not stop.is_set():
            response = session.post(submit_url, headers=headers, data=blocking_body, timeout=60)
            statuses.append(response.status_code)
            stop.wait(1.0)  # answered at once (past the cap): the client comes back a second later

    health, poll = [], []
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            for n in range(CLIENTS):
                pool.submit(blocking_client, n)
            time.sleep(2)  # every client has a request in flight
            probe = requests.Session()
            deadline = time.monotonic() + PROBE_SECONDS
            while time.monotonic() < deadline:
                started = time.perf_counter()
                probe.get(f"{base}/healthz", timeout=30)
                health.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                probe.get(f"{base}/api/tasks/{other['task_id']}", headers=headers, timeout=30)
                poll.append((time.perf_counter() - started) * 1000)
                time.sleep(0.1)
            stop.set()
    finally:
        web.terminate()
        web.wait(15)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    write_report(health, poll, statuses)


def write_report(health: list[float], poll: list[float], statuses: list[int]) -> None:
    answered_202 = sum(1 for status in statuses if status == 202)
    lines = [
        "## Blocking flood",
        "",
        f"`bench/blocking.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {CLIENTS} "
        "clients each keep a blocking submit in flight against gunicorn with its defaults (2 "
        "processes per core, 8 threads each), no worker running; /healthz and a poll are timed "
        f"every 100 ms for {PROBE_SECONDS} s. Target: every probe within 1 s.",
        "",
        "| probe | n | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, samples in (("/healthz", health), ("poll", poll)):
        lines.append(f"| {name} | {len(samples)} | {percentile(samples, 50):.1f} | "
                     f"{percentile(samples, 99):.1f} | {max(samples):.1f} |")  # fmt: skip
    lines += ["", f"Blocking submits answered meanwhile: {len(statuses)}, {answered_202} of them "
              "`202` (past the cap, or after their wait)."]  # fmt: skip
    section = "\n".join(lines) + "\n"
    write_report_section("Blocking flood", section)
    print(section)


if __name__ == "__main__":
    main()
