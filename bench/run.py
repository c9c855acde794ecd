"""`make bench`: Taskhook side by side with raw RQ, measured in the same run on the same Redis and
database. A benchmark, never a test: it prints a table and writes docs/benchmarks.md.

Backends: SQLite + the embedded Redis always; PostgreSQL + a real Redis when DATABASE_URL points
at PostgreSQL and REDIS_URL at a Redis server (the bench uses a database of its own,
`taskhook_bench`, on that server, and Redis db 13).

Each backend runs in a child process (Django settings are per process):
  python bench/run.py                 # orchestrate, print, write docs/benchmarks.md
  python bench/run.py --child         # one backend, JSON on stdout (env says which)
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import free_port, queue_due_callbacks, start_gunicorn, start_receiver, wrk  # noqa: E402
from dashboard.runtime.processes import DELIVERY_WORKER_CLASS, TASK_WORKER_CLASS  # noqa: E402

RAW_JOBS = int(os.environ.get("BENCH_RAW_JOBS", 2000))
E2E_SUBMIT_SECONDS = int(os.environ.get("BENCH_E2E_SECONDS", 4))
LATENCY_REQUESTS = int(os.environ.get("BENCH_LATENCY_REQUESTS", 300))
CALLBACKS = int(os.environ.get("BENCH_CALLBACKS", 500))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))  # rounds of each Taskhook/raw RQ ratio
SLOW_RECEIVER_SECONDS = 0.05


# --- helpers ----------------------------------------------------------------------------------


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def wait_until(predicate, timeout: float, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("benchmark step did not finish in time")


class Processes:
    def __init__(self) -> None:
        self.items: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(
            argv, cwd=BASE_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.items.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.items:
            if process.poll() is None:
                process.terminate()
        for process in self.items:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.items.clear()


# --- raw RQ -----------------------------------------------------------------------------------


def raw_queue(redis_url: str):
    import redis
    from rq import Queue

    queue = Queue("bench-raw", connection=redis.Redis.from_url(redis_url))
    queue.empty()
    return queue


def raw_enqueue_rates(redis_url: str, rounds: int = 3) -> list[float]:
    """Jobs/s of `queue.enqueue` in a loop, a few rounds."""
    queue = raw_queue(redis_url)
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(RAW_JOBS // 2):
            queue.enqueue("bench.noop.noop", result_ttl=60)
        rates.append(RAW_JOBS // 2 / (time.perf_counter() - started))
        queue.empty()
    return rates


def paired_ratios(name: str, figures: list[float], baselines: list[float]) -> dict:
    """Each figure over the mean of the baselines measured right before and right after it
    (`baselines` has one more item than `figures`): the median ratio and its range."""
    ratios = [figure / statistics.fmean(baselines[i : i + 2]) for i, figure in enumerate(figures)]
    return {name: statistics.median(ratios), f"{name}_range": [min(ratios), max(ratios)]}


def raw_worker_rate(redis_url: str, env: dict[str, str], worker_class: str, jobs: int) -> float:
    """No-op jobs/s through one raw RQ worker, timed from the jobs' own timestamps (worker
    start-up not counted), logging at WARNING as Taskhook's workers do (RQ_LOG_LEVEL)."""
    from rq.job import Job

    queue = raw_queue(redis_url)
    for _ in range(jobs):
        queue.enqueue("bench.noop.noop", result_ttl=60)
    processes = Processes()
    worker = processes.start(
        [sys.executable, "-m", "rq.cli", "worker", "-u", redis_url, "--burst", "-w",
         worker_class, "--logging_level", "WARNING", "bench-raw"],
        env | {"PYTHONPATH": str(BASE_DIR)},
    )  # fmt: skip
    wait_until(lambda: worker.poll() is not None, timeout=300)
    ids = queue.finished_job_registry.get_job_ids()
    jobs_done = [j for j in Job.fetch_many(ids, connection=queue.connection) if j]
    first = min(j.started_at for j in jobs_done)
    last = max(j.ended_at for j in jobs_done)
    for job in jobs_done:
        job.delete()
    return len(jobs_done) / (last - first).total_seconds()


# --- Taskhook ---------------------------------------------------------------------------------


def child() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from tasks.applications import create_application
    from tasks.models import Task

    call_command("migrate", verbosity=0)
    env = dict(os.environ)
    redis_url = settings.REDIS_URL
    results: dict[str, float] = {}

    app = create_application(name=f"bench-{time.time_ns()}", runner="echo")
    app.application.rate_limit_per_second = 1_000_000
    app.application.rate_limit_burst = 1_000_000
    app.application.retry_schedule = []
    app.application.save()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    processes = Processes()
    processes.items.append(start_gunicorn(port, env | {"GUNICORN_THREADS": "8"}))
    url = f"{base}/api/applications/{app.application.id}/generate"
    headers = {"Authorization": f"Bearer {app.api_key}", "Content-Type": "application/json"}
    body = json.dumps({"inputs": {"q": "bench"}, "response_mode": "async"})

    try:
        # Submit latency, 1 client on a keep-alive connection (the web path alone: no worker).
        client = http.client.HTTPConnection("127.0.0.1", port)
        path = f"/api/applications/{app.application.id}/generate"
        samples = timed_requests(client, "POST", path, body, headers, LATENCY_REQUESTS)
        results.update(submit_p50_ms=percentile(samples, 50), submit_p95_ms=percentile(samples, 95),
                       submit_p99_ms=percentile(samples, 99))  # fmt: skip

        # Submit throughput with 10 and 50 concurrent clients (wrk: a C load generator, so the
        # 2 cores go to the server rather than to a Python client). The 10-client figure is
        # compared with the raw enqueue rate in ROUNDS rounds, each bracketed by enqueue
        # measurements before and after it (this machine's speed drifts within minutes): the
        # table shows the medians, and the range of the per-round ratios.
        enqueue = [statistics.median(raw_enqueue_rates(redis_url))]
        submits = []
        for _ in range(ROUNDS):
            submits.append(wrk_post(url, body, headers, 10))
            enqueue.append(statistics.median(raw_enqueue_rates(redis_url)))
        results.update(submit_rps_10=statistics.median(submits),
                       raw_enqueue_per_s=statistics.median(enqueue),
                       **paired_ratios("ratio_submit", submits, enqueue))  # fmt: skip
        results["submit_rps_50"] = wrk_post(url, body, headers, 50)

        # Poll latency (a new connection: the idle one was closed during the wrk runs).
        client.close()
        client = http.client.HTTPConnection("127.0.0.1", port)
        client.request("POST", path, body=body, headers=headers)
        task_id = json.loads(client.getresponse().read())["task_id"]
        samples = timed_requests(client, "GET", f"/api/tasks/{task_id}", None, headers,
                                 LATENCY_REQUESTS)  # fmt: skip
        results.update(poll_p50_ms=percentile(samples, 50), poll_p99_ms=percentile(samples, 99))
        client.close()

        # Drain what the submit benchmarks queued, then end to end with one worker.
        from tasks.plumbing.queueing import queue

        queue(settings.TASK_QUEUE).empty()
        Task.objects.filter(application=app.application).delete()
        worker_argv = [
            sys.executable,
            str(BASE_DIR / "manage.py"),
            "rqworker",
            settings.TASK_QUEUE,
            "--worker-class",
            TASK_WORKER_CLASS,
        ]
        # End to end with one worker against raw RQ's SimpleWorker (same worker count), in
        # ROUNDS rounds bracketed by raw runs, as above.
        simple = [raw_worker_rate(redis_url, env, "rq.worker.SimpleWorker", RAW_JOBS)]
        processes.start(worker_argv, env)
        time.sleep(2)  # worker start-up (Django import) is not part of the throughput
        e2e, counts = [], []
        succeeded = Task.objects.filter(application=app.application, status="succeeded")
        for _ in range(ROUNDS):
            Task.objects.filter(application=app.application).delete()
            started = time.perf_counter()
            wrk_post(url, body, headers, clients=4, seconds=E2E_SUBMIT_SECONDS)
            submitted = Task.objects.filter(application=app.application).count()
            wait_until(lambda n=submitted: succeeded.count() >= n, timeout=600, interval=0.1)
            e2e.append(submitted / (time.perf_counter() - started))
            counts.append(submitted)
            simple.append(raw_worker_rate(redis_url, env, "rq.worker.SimpleWorker", RAW_JOBS))
        results.update(e2e_tasks_per_s=statistics.median(e2e), e2e_tasks=statistics.median(counts),
                       raw_simple_jobs_per_s=statistics.median(simple),
                       **paired_ratios("ratio_e2e", e2e, simple))  # fmt: skip
        results["raw_forking_jobs_per_s"] = raw_worker_rate(
            redis_url, env, "rq.worker.Worker", RAW_JOBS // 4
        )

        # Callbacks: deliveries/s to a fast receiver, and submit -> callback received latency.
        results.update(callbacks(app, url, headers, processes, env, settings))
    finally:
        processes.stop_all()
    print(json.dumps(results))


def callbacks(app, url, headers, processes, env, settings) -> dict[str, float]:
    from django.db.models import Max, Min

    from tasks.models import Task

    received: dict[str, float] = {}
    lock = threading.Lock()
    answer_after = {"seconds": 0.0}  # the receiver's own time per request

    def record(body: bytes) -> None:
        task_id = json.loads(body)["task_id"]
        with lock:
            received.setdefault(task_id, time.perf_counter())

    server, hook = start_receiver(record, answer_after=lambda: answer_after["seconds"])
    env = env | {"CALLBACK_ALLOW_PRIVATE_NETWORKS": "true"}
    try:
        # Capacity: deliveries already queued (finished tasks with a callback due), timed from
        # the first to the last arrival, as raw RQ is timed.
        def capacity(count: int = CALLBACKS) -> float:
            received.clear()
            queue_due_callbacks(app.application, hook, count)
            wait_until(lambda: len(received) >= count, timeout=300)
            arrivals = sorted(received.values())
            return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])

        def callback_worker(worker_class: str) -> list[str]:
            return [sys.executable, str(BASE_DIR / "manage.py"), "rqworker",
                    settings.CALLBACK_QUEUE, "--worker-class", worker_class]  # fmt: skip

        # A receiver that takes 50 ms to answer: one delivery at a time (RQ's SimpleWorker
        # model) against the delivery worker's threads (CALLBACK_CONCURRENCY, default 8).
        answer_after["seconds"] = SLOW_RECEIVER_SECONDS
        slow = {}
        models = {"serial": TASK_WORKER_CLASS,
                  "threads": DELIVERY_WORKER_CLASS}  # fmt: skip
        for label, worker_class in models.items():
            worker = processes.start(callback_worker(worker_class), env)
            time.sleep(2)
            slow[label] = capacity(count=200)
            worker.terminate()
            worker.wait(30)
        answer_after["seconds"] = 0.0

        # A fast receiver: one, then two delivery workers.
        delivery_worker = callback_worker(DELIVERY_WORKER_CLASS)
        processes.start(delivery_worker, env)
        time.sleep(2)  # worker start-up is not part of the throughput
        capacity_1 = capacity()
        second = processes.start(delivery_worker, env)
        time.sleep(2)
        capacity_2 = capacity()
        second.terminate()
        second.wait(30)

        # Keeping up: tasks with a callback submitted over HTTP for a few seconds, with one task
        # worker (running since the end-to-end run) and one callback worker. Each rate is over
        # its own window; the lag is how long after the last task finished its callback came.
        received.clear()
        body = json.dumps({"inputs": {"q": 1}, "response_mode": "async", "callback_url": hook})
        Task.objects.filter(application=app.application).delete()
        wrk_post(url, body, headers, clients=4, seconds=E2E_SUBMIT_SECONDS)
        submitted = Task.objects.filter(application=app.application).count()
        done = lambda: Task.objects.filter(application=app.application,  # noqa: E731
                                           status="succeeded").count() >= submitted  # fmt: skip
        wait_until(done, timeout=600, interval=0.02)
        tasks_done_at = time.perf_counter()
        wait_until(lambda: len(received) >= submitted, timeout=600, interval=0.02)
        window = Task.objects.filter(application=app.application).aggregate(
            first=Min("started_at"), last=Max("finished_at")
        )
        tasks_per_s = (submitted - 1) / (window["last"] - window["first"]).total_seconds()
        arrivals = sorted(received.values())
        deliveries_per_s = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        lag_ms = max(0.0, arrivals[-1] - tasks_done_at) * 1000

        # End to end: submit -> callback received, one task at a time.
        import requests

        session = requests.Session()
        latencies = []
        for _ in range(60):
            started = time.perf_counter()
            task_id = session.post(url, data=body, headers=headers).json()["task_id"]
            wait_until(lambda task_id=task_id: task_id in received, timeout=30, interval=0.001)
            latencies.append((received[task_id] - started) * 1000)
    finally:
        server.shutdown()
    return {
        "callback_slow_serial_per_s": slow["serial"],
        "callback_slow_threads_per_s": slow["threads"],
        "callback_capacity_per_s": capacity_1,
        "callback_capacity_2_per_s": capacity_2,
        "callback_mixed_tasks_per_s": tasks_per_s,
        "callback_mixed_deliveries_per_s": deliveries_per_s,
        "callback_mixed_lag_ms": lag_ms,
        "callback_mixed_tasks": submitted,
        "callback_e2e_p50_ms": percentile(latencies, 50),
        "callback_e2e_p95_ms": percentile(latencies, 95),
    }


def timed_requests(client, method: str, path: str, body, headers, count: int) -> list[float]:
    for _ in range(20):  # warm-up
        client.request(method, path, body=body, headers=headers)
        client.getresponse().read()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.request(method, path, body=body, headers=headers)
        response = client.getresponse()
        response.read()
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status == 200, response.status
    return samples


def wrk_post(url: str, body: str, headers: dict[str, str], clients: int, seconds: int = 8) -> float:
    """Requests/s of 2xx answers to POSTs of `body` (bench.common.wrk)."""
    return wrk(url, headers, method="POST", body=body, clients=clients, seconds=seconds)


# --- orchestration ----------------------------------------------------------------------------


def backends() -> list[tuple[str, dict[str, str]]]:
    base = {k: v for k, v in os.environ.items()}
    base["DEBUG"] = "false"
    base["SECURE_SSL_REDIRECT"] = "false"  # plain HTTP on loopback, no TLS proxy in front
    base.setdefault("SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    base["LOG_LEVEL"] = "WARNING"
    base["CALLBACK_ALLOW_PRIVATE_NETWORKS"] = "true"
    found = []
    sqlite = BASE_DIR / "var" / "bench.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{sqlite}{suffix}").unlink(missing_ok=True)
    sqlite_env = base | {"DATABASE_URL": f"sqlite:///{sqlite}", "REDIS_URL": EMBEDDED_URL}
    found.append(("SQLite + embedded Redis", sqlite_env))
    pg = os.environ.get("BENCH_PG_URL") or os.environ.get("DATABASE_URL", "")
    real_redis = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    if pg.startswith("postgres") and _redis_up(real_redis) and _pg_bench_database(pg):
        found.append(
            (
                "PostgreSQL + Redis",
                base
                | {
                    "DATABASE_URL": pg.rsplit("/", 1)[0] + "/taskhook_bench",
                    "REDIS_URL": real_redis,
                },
            )
        )
    return found


def _redis_up(url: str) -> bool:
    from dashboard.runtime.embedded_redis import is_reachable

    if not is_reachable(url):
        print(
            f"Redis {url} not reachable; skipping the PostgreSQL + Redis backend", file=sys.stderr
        )
        return False
    return True


def _pg_bench_database(url: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'taskhook_bench'")
            if not exists.fetchone():
                conn.execute("CREATE DATABASE taskhook_bench")
        return True
    except Exception as exc:
        print(f"PostgreSQL not reachable ({exc}); skipping that backend", file=sys.stderr)
        return False


ROWS = [
    ("Raw RQ: enqueue rate (jobs/s)", "raw_enqueue_per_s", "{:.0f}"),
    ("Raw RQ: no-op jobs/s, 1 SimpleWorker", "raw_simple_jobs_per_s", "{:.0f}"),
    ("Raw RQ: no-op jobs/s, 1 forking Worker", "raw_forking_jobs_per_s", "{:.0f}"),
    ("Taskhook: tasks/s, HTTP submit -> succeeded, 1 worker", "e2e_tasks_per_s", "{:.0f}"),
    ("  tasks in a round", "e2e_tasks", "{:.0f}"),
    (
        "  ratio to raw SimpleWorker, median (range) of the rounds (target >= 0.6)",
        "ratio_e2e",
        "{}",
    ),
    ("Submit latency p50 / p95 / p99, 1 client (ms)", "submit_latency", "{}"),
    ("Submit throughput, 10 clients (req/s)", "submit_rps_10", "{:.0f}"),
    (
        "  ratio to raw enqueue rate, median (range) of the rounds (target >= 0.25)",
        "ratio_submit",
        "{}",
    ),
    ("Submit throughput, 50 clients (req/s)", "submit_rps_50", "{:.0f}"),
    (
        "Callback deliveries/s, receiver answering in 50 ms: 1 worker one at a time / "
        "1 delivery worker (8 threads)",
        "slow_receiver",
        "{}",
    ),
    ("Callback deliveries/s, queued, fast receiver: 1 / 2 delivery workers", "capacity", "{}"),
    ("  ratio to Taskhook tasks/s above, 1 / 2 workers", "ratio_capacity", "{}"),
    (
        "With callbacks, 1 task + 1 callback worker: tasks/s succeeded",
        "callback_mixed_tasks_per_s",
        "{:.0f}",
    ),
    (
        "  same run: callbacks received/s (target >= tasks/s)",
        "callback_mixed_deliveries_per_s",
        "{:.0f}",
    ),
    (
        "  same run: last callback after the last task finished (ms)",
        "callback_mixed_lag_ms",
        "{:.0f}",
    ),
    ("  tasks in that run", "callback_mixed_tasks", "{:.0f}"),
    ("Submit -> callback received p50 / p95 (ms)", "callback_e2e", "{}"),
    ("Poll latency p50 / p99 (ms)", "poll_latency", "{}"),
]


EMBEDDED_URL = ""


def main() -> None:
    global EMBEDDED_URL
    from dashboard.runtime.embedded_redis import EmbeddedRedis

    embedded = EmbeddedRedis(BASE_DIR / "var" / "bench-redis", port=free_port(), persist=False)
    EMBEDDED_URL = embedded.start()
    try:
        columns = run_backends()
    finally:
        embedded.stop()
    write_report(columns)
    # Live event streams on one web process: a section of its own, on the same backends.
    subprocess.run([sys.executable, str(BASE_DIR / "bench" / "streams.py")], cwd=BASE_DIR,
                   check=True)  # fmt: skip
    # Scheduling (priority lanes, fairness, ETA, their cost): its section, the same backends.
    subprocess.run([sys.executable, str(BASE_DIR / "bench" / "scheduling.py")], cwd=BASE_DIR,
                   check=True)  # fmt: skip
    # Batches (ingestion rate, another client's submits under a big batch): its section.
    subprocess.run([sys.executable, str(BASE_DIR / "bench" / "batches.py")], cwd=BASE_DIR,
                   check=True)  # fmt: skip


def run_backends() -> list[tuple[str, dict]]:
    columns = []
    for name, env in backends():
        print(f"running: {name} ...", file=sys.stderr)
        output = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child"],
            cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if output.returncode != 0:
            print(output.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"benchmark failed on {name}")
        data = json.loads(output.stdout.strip().splitlines()[-1])
        for ratio in ("ratio_e2e", "ratio_submit"):
            low, high = data[f"{ratio}_range"]
            data[ratio] = f"{data[ratio]:.2f} ({low:.2f}-{high:.2f})"
        data["capacity"] = (f"{data['callback_capacity_per_s']:.0f} / "
                            f"{data['callback_capacity_2_per_s']:.0f}")  # fmt: skip
        data["ratio_capacity"] = (
            f"{data['callback_capacity_per_s'] / data['e2e_tasks_per_s']:.2f} / "
            f"{data['callback_capacity_2_per_s'] / data['e2e_tasks_per_s']:.2f}"
        )
        data["slow_receiver"] = (f"{data['callback_slow_serial_per_s']:.0f} / "
                                 f"{data['callback_slow_threads_per_s']:.0f}")  # fmt: skip
        data["submit_latency"] = (f"{data['submit_p50_ms']:.1f} / {data['submit_p95_ms']:.1f} / "
                                  f"{data['submit_p99_ms']:.1f}")  # fmt: skip
        data["callback_e2e"] = (
            f"{data['callback_e2e_p50_ms']:.0f} / {data['callback_e2e_p95_ms']:.0f}"
        )
        data["poll_latency"] = f"{data['poll_p50_ms']:.1f} / {data['poll_p99_ms']:.1f}"
        columns.append((name, data))
    return columns


def write_report(columns: list[tuple[str, dict]]) -> None:
    header = "| measure | " + " | ".join(name for name, _ in columns) + " |"
    lines = [header, "| --- |" + " ---: |" * len(columns)]
    for label, key, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(d[key]) for _, d in columns) + " |")
    table = "\n".join(lines)
    print(table)
    import django
    import rq

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"Django {django.get_version()}, RQ {rq.__version__}")  # fmt: skip
    doc = BASE_DIR / "docs" / "benchmarks.md"
    # Sections written by the other benchmarks (bench/retention.py, bench/dashboard.py) stay.
    previous = doc.read_text() if doc.exists() else ""
    others = previous[previous.index("\n## ") :] if "\n## " in previous else ""
    doc.write_text(
        "# Benchmarks\n\n"
        f"Written by `make bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({machine}).\n"
        "Every figure comes from the same run, on the same Redis and database per column; each "
        f"ratio to raw RQ is taken in {ROUNDS} rounds, each Taskhook figure over the mean of the "
        "raw RQ figures measured right before and right after it, and the table shows the "
        "medians and the range of the ratios: the machine's speed drifts within minutes (the "
        "raw enqueue rate alone swung 1,500-4,000/s within an hour). "
        f"Task workers are `{TASK_WORKER_CLASS}` (RQ's SimpleWorker plus a liveness "
        f"thread), callback workers `{DELIVERY_WORKER_CLASS}` (the same, running up "
        "to CALLBACK_CONCURRENCY = 8 deliveries at once in threads); "
        f"the web is gunicorn as `make run` starts it ({2 * (os.cpu_count() or 1)} processes x 8 "
        "threads); raw RQ and Taskhook workers both log at "
        "WARNING. The load generator (wrk) runs on the same 2 cores as the server, so absolute "
        "numbers are conservative; the ratios count.\n\n"
        f"{table}\n{others}"
    )
    print(f"\nwritten to {doc.relative_to(BASE_DIR)}")


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        main()
