"""The web process's server, measured: `make bench` runs this.

gunicorn's gthread workers serving the WSGI application (the web process before the event
streams) against gunicorn's uvicorn workers serving dashboard.runtime.asgi (the web process
now: the streams as coroutines, everything else through a2wsgi's thread pool), and granian's
WSGI server for reference. Poll and async submit throughput with wrk (20 connections), each
server started fresh for each of ROUNDS alternating rounds, 2 processes each, same database,
same Redis, no worker (submits stay pending). Writes the "Web server" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BASE_DIR, free_port, write_report_section
from bench.run import wrk_post
from dashboard.runtime.processes import GUNICORN_CONFIG

ROUNDS = 3
SECONDS = 5
CLIENTS = 20
PROCESSES = 2

SERVERS = {
    "gunicorn gthread, WSGI (before)": lambda port: [
        sys.executable, "-m", "gunicorn", "dashboard.runtime.wsgi", "-c", GUNICORN_CONFIG,
        "--worker-class", "gthread", "--threads", "8", "--bind", f"127.0.0.1:{port}",
    ],
    "gunicorn uvicorn workers, ASGI (now)": lambda port: [
        sys.executable, "-m", "gunicorn", "dashboard.runtime.asgi", "-c", GUNICORN_CONFIG,
        "--bind", f"127.0.0.1:{port}",
    ],
    "granian, WSGI (reference)": lambda port: [
        sys.executable, "-m", "granian", "--interface", "wsgi", "--workers", str(PROCESSES),
        "--blocking-threads", "8", "--host", "127.0.0.1", "--port", str(port),
        "dashboard.runtime.wsgi:application",
    ],
}  # fmt: skip


def wrk_get(url: str, headers: dict[str, str]) -> float:
    flags = [item for name, value in headers.items() for item in ("-H", f"{name}: {value}")]
    output = subprocess.run(
        ["wrk", "-t2", f"-c{CLIENTS}", f"-d{SECONDS}s", *flags, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


def start(argv: list[str], port: int, env: dict[str, str]) -> subprocess.Popen:
    server = subprocess.Popen(
        argv, cwd=BASE_DIR, env=env | {"WEB_CONCURRENCY": str(PROCESSES)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"{argv[:4]} did not start")


def main() -> None:
    db = BASE_DIR / "var" / f"bench-servers-{os.getpid()}.sqlite3"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
    os.environ.setdefault("DEBUG", "true")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{db}")
    import django

    django.setup()
    import requests
    from django.core.management import call_command

    from tasks.applications import create_application

    call_command("migrate", verbosity=0)
    app = create_application(name="servers", runner="echo")
    app.application.rate_limit_per_second = 0
    app.application.save()
    headers = {"Authorization": f"Bearer {app.api_key}"}
    body = json.dumps({"inputs": {"q": 1}, "response_mode": "async"})
    env = dict(os.environ) | {"LOG_LEVEL": "WARNING"}
    figures: dict[str, dict[str, list[float]]] = {n: {"poll": [], "submit": []} for n in SERVERS}
    try:
        for _ in range(ROUNDS):
            for name, argv in SERVERS.items():
                port = free_port()
                server = start(argv(port), port, env)
                try:
                    base = f"http://127.0.0.1:{port}"
                    submit_url = f"{base}/api/applications/{app.application.id}/generate"
                    json_headers = headers | {"Content-Type": "application/json"}
                    task = requests.post(submit_url, data=body, headers=json_headers, timeout=10)
                    poll_url = f"{base}/api/tasks/{task.json()['task_id']}"
                    figures[name]["poll"].append(wrk_get(poll_url, headers))
                    submits = wrk_post(submit_url, body, json_headers, CLIENTS, SECONDS)
                    figures[name]["submit"].append(submits)
                finally:
                    os.killpg(server.pid, 15)
                    server.wait(15)
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    write_report(figures)


def write_report(figures: dict[str, dict[str, list[float]]]) -> None:
    before = figures[next(iter(SERVERS))]
    lines = [
        "## Web server",
        "",
        f"Why the web process is gunicorn with uvicorn workers (`bench/servers.py`, "
        f"{time.strftime('%Y-%m-%d')}, SQLite + embedded Redis): poll and async-submit "
        f"requests/s from wrk, {CLIENTS} connections, {SECONDS} s, {PROCESSES} server processes, "
        f"median of {ROUNDS} alternating rounds (each server started fresh), ratio to the "
        "gthread WSGI server in the same run. wrk shares the 2 cores with the server.",
        "",
        "| server | poll/s | submit/s | poll ratio | submit ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, measured in figures.items():
        poll, submit = statistics.median(measured["poll"]), statistics.median(measured["submit"])
        lines.append(
            f"| {name} | {poll:.0f} | {submit:.0f} | "
            f"{poll / statistics.median(before['poll']):.2f} | "
            f"{submit / statistics.median(before['submit']):.2f} |"
        )
    lines += [
        "",
        "granian cannot serve a WSGI and an ASGI application in one process, and its ASGI "
        "interface did not run a2wsgi's bridge, so it is a reference only: the price of one base "
        "URL with native async streams is the gap between the first two rows.",
        "",
    ]
    write_report_section("Web server", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
