"""Delivery isolation under a black-hole receiver: `make bench` runs this after bench/run.py.

The stack as `make run` starts it (gunicorn, 2 task workers, 2 callback workers with
CALLBACK_CONCURRENCY threads each), on a fresh SQLite database and the Redis of REDIS_URL. One
application's receiver is healthy and fast; another's accepts connections and never answers
(10 s callback timeout, as a firewall that drops packets). 200 callbacks to each are submitted
together at 50/s each; the figure is submit -> callback received at the healthy receiver, p50
and p99, in three runs of the same stack: without the black hole (the second application's
callbacks go to a second healthy receiver), with it (the endpoint cap at its default of 4), and
with it and no cap (what Taskhook did before the cap). A healthy callback not received within
120 s of the last submit counts as late (the database still has it: none is lost).
Writes the "Delivery isolation" section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BASE_DIR, free_port, start_gunicorn, start_receiver, write_report_section
from bench.run import Processes, percentile
from dashboard.runtime.processes import worker_argv

RATE_PER_S = 50
CALLBACKS = 200


def black_hole() -> tuple[socket.socket, str, threading.Event]:
    """Accepts every connection and never answers; closed when `stop` is set."""
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)
    server.settimeout(0.2)
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
        for conn in held:
            conn.close()
        server.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}/hook", stop


def run_once(*, with_black_hole: bool, cap: int, env: dict[str, str]) -> dict[str, float]:
    import requests

    from tasks.applications import create_application
    from tasks.models import Task

    received: dict[str, float] = {}
    lock = threading.Lock()

    def record(body: bytes) -> None:
        with lock:
            received.setdefault(json.loads(body)["task_id"], time.perf_counter())

    receiver, healthy_url = start_receiver(record)
    # Without the black hole the second application's callbacks go to a second healthy
    # receiver: the same load, so the difference is the black hole alone.
    other, other_url = start_receiver(lambda body: None)
    _, hole_url, stop_hole = black_hole()
    second_url = hole_url if with_black_hole else other_url
    healthy = create_application(name="healthy", runner="echo", retry_schedule=[])
    dead = create_application(name="black-hole", runner="echo", retry_schedule=[10])
    for app in (healthy, dead):
        app.application.rate_limit_per_second = 0  # unlimited: the bench measures delivery
        app.application.endpoint_max_in_flight = cap
        app.application.save()

    processes = Processes()
    port = free_port()
    try:
        processes.items.append(start_gunicorn(port, env))
        for _ in range(2):
            processes.start(worker_argv("worker"), env)
            processes.start(worker_argv("callbacks"), env)
        time.sleep(3)  # workers' start-up is not part of the figure
        session = requests.Session()
        base = f"http://127.0.0.1:{port}/api/applications"
        submitted: dict[str, float] = {}
        started = time.perf_counter()
        for n in range(CALLBACKS):
            due = started + n / RATE_PER_S
            time.sleep(max(0.0, due - time.perf_counter()))
            at = time.perf_counter()
            answer = session.post(
                f"{base}/{healthy.application.id}/generate",
                headers={"Authorization": f"Bearer {healthy.api_key}"},
                json={"inputs": {"n": n}, "response_mode": "async", "callback_url": healthy_url},
                timeout=10,
            ).json()
            submitted[answer["task_id"]] = at
            session.post(
                f"{base}/{dead.application.id}/generate",
                headers={"Authorization": f"Bearer {dead.api_key}"},
                json={"inputs": {"n": n}, "response_mode": "async", "callback_url": second_url},
                timeout=10,
            )
        deadline = time.monotonic() + 120
        while len(received) < CALLBACKS and time.monotonic() < deadline:
            time.sleep(0.1)
        latencies = [(received[t] - at) * 1000 for t, at in submitted.items() if t in received]
        dead_attempts = 0
        if with_black_hole:
            from tasks.models import CallbackAttempt

            dead_attempts = CallbackAttempt.objects.filter(
                task__application=dead.application
            ).count()
        return {
            "p50_ms": percentile(latencies, 50) if latencies else float("nan"),
            "p99_ms": percentile(latencies, 99) if latencies else float("nan"),
            "received": len(latencies),
            "late": CALLBACKS - len(latencies),
            "black_hole_attempts": dead_attempts,
            "pending_healthy": Task.objects.filter(application=healthy.application)
            .exclude(callback_status="delivered")
            .count(),
        }
    finally:
        processes.stop_all()
        stop_hole.set()
        receiver.shutdown()
        other.shutdown()


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
    os.environ.setdefault("DEBUG", "true")
    os.environ["CALLBACK_ALLOW_PRIVATE_NETWORKS"] = "true"
    db = BASE_DIR / "var" / f"bench-isolation-{os.getpid()}.sqlite3"
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{db}")
    import django

    django.setup()
    from django.core.management import call_command

    from tasks.plumbing.queueing import redis_client

    call_command("migrate", verbosity=0)

    env = dict(os.environ) | {"RQ_LOG_LEVEL": "ERROR", "LOG_LEVEL": "WARNING"}
    runs = {}
    for name, with_hole, cap in (
        ("without the black hole", False, 4),
        ("with the black hole, cap 4 (default)", True, 4),
        ("with the black hole, no cap", True, 0),
    ):
        redis_client().flushdb()
        runs[name] = run_once(with_black_hole=with_hole, cap=cap, env=env)
        print(name, json.dumps(runs[name]), flush=True)
    write_report(runs)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def write_report(runs: dict[str, dict]) -> None:
    baseline = runs["without the black hole"]["p99_ms"]
    lines = [
        "## Delivery isolation",
        "",
        f"`bench/isolation.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: 200 "
        "callbacks to a healthy receiver and 200 to a black hole (accepts, never answers, 10 s "
        "timeout), submitted together at 50/s each, through gunicorn, 2 task workers and 2 "
        "callback workers (8 threads each). Submit -> callback received at the healthy "
        "receiver; p99 ratio against the run without the black hole (target at most 2x).",
        "",
        "| run | p50 ms | p99 ms | p99 ratio | healthy received in time | late | black-hole "
        "attempts recorded by then |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['p99_ms'] / baseline:.2f}x | "
            f"{r['received']}/{CALLBACKS} | {r['late']} | {r['black_hole_attempts']} |"
        )
    section = "\n".join(lines) + "\n"
    write_report_section("Delivery isolation", section)
    print(section)


if __name__ == "__main__":
    main()
