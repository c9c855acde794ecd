"""The full pipeline (issue #23, "make bench measures the full pipeline"): HTTP submit -> task run
-> signed callback received, on the stack `make run` starts, beside raw RQ no-op jobs through as
many workers on the same Redis in the same run. Measurement only. Writes the "Full pipeline"
section of docs/benchmarks.md and every figure to var/bench-pipeline.json.

The stack is `manage.py runstack` itself on a free port (gunicorn web, 2 task workers, 2 callback
workers, cron: its defaults), DEBUG=true, callbacks to 127.0.0.1 allowed, logging as `make run`
logs (its output in var/bench-pipeline-stack.log). The receiver is a process of its own on
127.0.0.1 (`--receiver`): it answers 200 at once, verifies nothing and counts unique task ids.
An `echo` application without a rate limit.

Rounds, bracketed: raw, pipeline, raw, ..., pipeline, raw (ROUNDS pipeline rounds):
- raw: RAW_JOBS no-op jobs enqueued (bench.noop.noop), then 2 plain `rq worker --burst`
  SimpleWorkers started together; jobs/s over the time both ran (from the later one's first
  job started to the earlier one's last job ended), from the jobs' own timestamps.
- pipeline: CLIENTS threads, each on its own keep-alive http.client connection, submit async
  tasks with a callback_url to the receiver as fast as they can, TASKS in all; tasks/s from the
  first submit to the last (unique) callback received; each submit's latency. CPU seconds of
  each process kind over the round (psutil, children included), per task.
Each pipeline round's ratio is over the mean of the raw rounds right before and after it. Then
a short phase: one client submitting ONE_CLIENT_SUBMITS tasks (with callbacks) one after
another, the pipeline running them meanwhile: its submit latency.

BENCH_PIPELINE_PROFILE=1 adds one unmeasured pipeline round under py-spy (web, a task worker,
a callback worker; their subprocesses too) and puts each one's hottest functions in the figures.

Backends: SQLite + an embedded Redis always; PostgreSQL + Redis when DATABASE_URL (or
BENCH_PG_URL) is a PostgreSQL URL: database `taskhook_bench_pipeline` on that server (recreated,
dropped at the end) and Redis db BENCH_REDIS_DB (default 12) of REDIS_URL's server, or
BENCH_PIPELINE_REDIS_URL; flushed before and after, so it must be the benchmark's own.
  python bench/pipeline.py            # orchestrate, write the section of docs/benchmarks.md
  python bench/pipeline.py --child    # one backend (env says which), JSON on stdout
  python bench/pipeline.py --report   # the section again from var/bench-pipeline.json
BENCH_PIPELINE_ONLY=sqlite|postgresql picks one backend; BENCH_PIPELINE_PARTIAL=1 prints the
figures without writing the report. Sizes: BENCH_PIPELINE_TASKS (3000), _RAW_JOBS (= TASKS),
_ROUNDS (2), _ONE_CLIENT (500).
"""

from __future__ import annotations

import collections
import http.client
import itertools
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import psutil

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench import common  # noqa: E402
from bench.common import free_port, write_report_section  # noqa: E402
from bench.run import percentile, wait_until  # noqa: E402
from bench.scheduling import revision  # noqa: E402
from dashboard.runtime.processes import manage_argv  # noqa: E402

TASKS = int(os.environ.get("BENCH_PIPELINE_TASKS", 3000))
RAW_JOBS = int(os.environ.get("BENCH_PIPELINE_RAW_JOBS", TASKS))
ROUNDS = int(os.environ.get("BENCH_PIPELINE_ROUNDS", 2))
ONE_CLIENT_SUBMITS = int(os.environ.get("BENCH_PIPELINE_ONE_CLIENT", 500))
PROFILE = os.environ.get("BENCH_PIPELINE_PROFILE", "") not in ("", "0")
CLIENTS = 10
WORKERS = 2  # task workers, as runstack starts them; the raw rounds run as many
WARMUP_SUBMITS = 20
RATIO_TARGET = 0.6
P99_TARGET_MS = 50.0
P50_TARGET_MS = 3.0
PG_DATABASE = "taskhook_bench_pipeline"
RESULTS = BASE_DIR / "var" / "bench-pipeline.json"
STACK_LOG = BASE_DIR / "var" / "bench-pipeline-stack.log"
# Set, these would size the stack otherwise than `make run` does: dropped.
STACK_SIZES = ("TASK_WORKERS", "CALLBACK_WORKERS", "WEB_CONCURRENCY", "RQ_WORKER_CLASS",
               "GUNICORN_THREADS", "PORT")  # fmt: skip
SUPERVISED_AS = "TASKHOOK_SUPERVISED_AS"  # runstack names each child in its environment
# Process kinds, in the report's order.
KINDS = ("web", "task workers", "callback workers", "cron", "supervisor", "redis", "database",
         "load generator", "receiver")  # fmt: skip
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PY_SPY = str(Path(sys.executable).with_name("py-spy"))  # installed in the venv, beside python


# --- the receiver (a process of its own) ----------------------------------------------------------


def receiver_main() -> None:
    """Answers each POST 200 at once and counts unique task ids (nothing verified); GET /stats
    says how many and when the first and the last arrived (time.monotonic, the same clock in
    every process), GET /reset forgets them. Prints its port, then serves until killed."""
    lock = threading.Lock()
    seen: set[str] = set()
    state: dict[str, float] = {"posts": 0, "first": 0.0, "last": 0.0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            now = time.monotonic()
            try:
                task_id = json.loads(body).get("task_id")
            except ValueError:
                task_id = None
            with lock:
                state["posts"] += 1
                if task_id and task_id not in seen:
                    seen.add(task_id)
                    state["first"] = state["first"] or now
                    state["last"] = now
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            with lock:
                if self.path == "/reset":
                    seen.clear()
                    state.update(posts=0, first=0.0, last=0.0)
                body = json.dumps(state | {"count": len(seen)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


class Receiver:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--receiver"], cwd=BASE_DIR,
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        self.hook = f"http://127.0.0.1:{self.port}/hooks/taskhook"
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def _get(self, path: str) -> dict[str, float]:
        self.connection.request("GET", path)
        return json.loads(self.connection.getresponse().read())

    def stats(self) -> dict[str, float]:
        return self._get("/stats")

    def reset(self) -> None:
        self._get("/reset")

    def stop(self) -> None:
        self.connection.close()
        self.process.kill()
        self.process.wait()


# --- CPU accounting -------------------------------------------------------------------------------


def _cpu(process: psutil.Process) -> float:
    """Its CPU seconds, and those of the children it has reaped (a dead gunicorn worker, a work
    horse, RQ's scheduler): summed over a tree at two moments, the difference is exact for
    processes alive at both and for those reaped in between."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def _kind(supervised_as: str) -> str:
    if supervised_as.startswith("task-worker"):
        return "task workers"
    if supervised_as.startswith("callback-worker"):
        return "callback workers"
    return supervised_as  # web, cron (redis only when runstack starts its own: not here)


class PostgresCpu:
    """CPU of the PostgreSQL backends serving this database (and, apart, the server's shared
    writers), when the server runs on this machine: /proc/<pid>/stat of the postmaster's
    children, sampled every SAMPLE_SECONDS so that a backend that exits meanwhile still counts
    up to its last sample (Django keeps connections, CONN_MAX_AGE: few do)."""

    SAMPLE_SECONDS = 0.5
    SHARED = ("walwriter", "checkpointer", "background writer")

    def __init__(self, database: str, postmaster: int | None) -> None:
        self.ours = re.compile(rf"\b{re.escape(database)}\b")
        self.postmaster = postmaster
        self.kinds: dict[int, str | None] = {}
        self.baseline: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    @classmethod
    def of_connection(cls) -> PostgresCpu | None:
        from django.db import connection

        if connection.vendor != "postgresql":
            return None
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend = cursor.fetchone()[0]
        try:
            postmaster = psutil.Process(backend).ppid()
            if not psutil.Process(postmaster).name().startswith("postgres"):
                return None
        except psutil.Error:
            return None  # another machine, or not visible from here
        return cls(str(connection.settings_dict["NAME"]), postmaster)

    def _sample(self) -> dict[int, float]:
        try:
            pids = Path(f"/proc/{self.postmaster}/task/{self.postmaster}/children").read_text()
        except OSError:
            return {}
        found = {}
        for pid in map(int, pids.split()):
            try:
                if pid not in self.kinds:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    shared = any(name in title for name in self.SHARED)
                    self.kinds[pid] = "ours" if self.ours.search(title) else (
                        "shared" if shared else None)  # fmt: skip
                if self.kinds[pid] is not None:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    found[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            except OSError:
                continue  # exited meanwhile
        return found

    def start(self) -> None:
        self.baseline = self._sample()
        self.last = dict(self.baseline)
        self.stopping.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.SAMPLE_SECONDS):
            self.last.update(self._sample())

    def stop(self) -> dict[str, float]:
        self.stopping.set()
        assert self.thread is not None
        self.thread.join()
        self.last.update(self._sample())
        used: collections.defaultdict[str, float] = collections.defaultdict(float)
        for pid, seconds in self.last.items():
            kind = self.kinds.get(pid)
            used["database" if kind == "ours" else "database (shared writers)"] += (
                seconds - self.baseline.get(pid, 0.0))  # fmt: skip
        return dict(used)


class CpuMeter:
    """CPU seconds of each process kind between start() and stop(): the runstack tree by the
    name runstack gives each child (its subprocesses in its kind), Redis by INFO's process_id,
    the database's backends (PostgresCpu), this process (the load generator) and the receiver."""

    def __init__(self, stack: psutil.Process, receiver: psutil.Process, redis_pid: int | None,
                 database: PostgresCpu | None) -> None:  # fmt: skip
        self.stack = stack
        self.receiver = receiver
        self.redis = psutil.Process(redis_pid) if redis_pid else None
        self.database = database
        self.me = psutil.Process()
        self.began: dict[str, float] = {}
        self.wall = 0.0

    def snapshot(self) -> dict[str, float]:
        used: collections.defaultdict[str, float] = collections.defaultdict(float)
        used["supervisor"] += _cpu(self.stack)
        for child in self.stack.children():
            try:
                kind = _kind(child.environ().get(SUPERVISED_AS, "other"))
                for process in (child, *child.children(recursive=True)):
                    used[kind] += _cpu(process)
            except psutil.NoSuchProcess:
                continue  # exited between the listing and the reading: runstack restarts it
        if self.redis is not None:
            used["redis"] += _cpu(self.redis)
        own = self.me.cpu_times()
        used["load generator"] += own.user + own.system
        used["receiver"] += _cpu(self.receiver)
        return dict(used)

    def start(self) -> None:
        if self.database is not None:
            self.database.start()
        self.began = self.snapshot()
        self.wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        ended = self.snapshot()
        used = {kind: ended.get(kind, 0.0) - self.began.get(kind, 0.0) for kind in ended}
        if self.database is not None:
            used |= self.database.stop()
        used["wall"] = time.monotonic() - self.wall
        return used


# --- the stack ------------------------------------------------------------------------------------


class Stack:
    """`manage.py runstack` on a free port, until its web answers and its 4 workers are
    registered in Redis."""

    def __init__(self, env: dict[str, str], log: IO[bytes]) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [*manage_argv(), "runstack", "--port", str(self.port)], cwd=BASE_DIR, env=env,
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        self.tree = psutil.Process(self.process.pid)
        try:
            wait_until(self._ready, timeout=180, interval=0.5)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        from rq import Worker

        from tasks.plumbing.queueing import redis_client

        if self.process.poll() is not None:
            raise RuntimeError(f"runstack exited; see {STACK_LOG}")
        try:
            url = f"http://127.0.0.1:{self.port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status != 200:
                    return False
        except OSError:
            return False
        return Worker.count(connection=redis_client()) >= 2 * WORKERS

    def kinds(self) -> collections.Counter[str]:
        return collections.Counter(_kind(child.environ().get(SUPERVISED_AS, "other"))
                                   for child in self.tree.children())  # fmt: skip

    def pids(self, kind: str) -> list[int]:
        return [child.pid for child in self.tree.children()
                if _kind(child.environ().get(SUPERVISED_AS, "")) == kind]  # fmt: skip

    def stop(self) -> None:
        """SIGTERM, as Ctrl-C stops `make run`; whatever is left after its grace is killed."""
        left = self.tree.children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


# --- the load -------------------------------------------------------------------------------------


class Submitter:
    """POSTs of one async task with a callback to the receiver, to the application's generate."""

    def __init__(self, port: int, application_id: str, api_key: str, hook: str) -> None:
        self.port = port
        self.path = f"/api/applications/{application_id}/generate"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.body = json.dumps({"inputs": {"q": "bench"}, "response_mode": "async",
                                "callback_url": hook})  # fmt: skip

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def submit(self, connection: http.client.HTTPConnection) -> tuple[float, int, float]:
        """One submit on `connection` (opened again once if the server closed it while idle):
        its start (time.monotonic), status and latency in ms."""
        for attempt in (1, 2):
            began = time.monotonic()
            started = time.perf_counter()
            try:
                connection.request("POST", self.path, body=self.body, headers=self.headers)
                response = connection.getresponse()
                response.read()
                return began, response.status, (time.perf_counter() - started) * 1000
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def run(self, clients: int, count: int) -> dict[str, Any]:
        """`count` submits by `clients` threads, each on its own keep-alive connection, each as
        fast as it can: the first submit's start, latencies (ms) and statuses."""
        tickets = itertools.count()
        lock = threading.Lock()
        latencies: list[float] = []
        statuses: collections.Counter[int] = collections.Counter()
        starts: list[float] = []
        failures: list[BaseException] = []

        def client() -> None:
            connection = self.connection()
            mine: list[float] = []
            first = None
            try:
                while next(tickets) < count:
                    began, status, ms = self.submit(connection)
                    first = first if first is not None else began
                    mine.append(ms)
                    with lock:
                        statuses[status] += 1
            except BaseException as error:  # said after the join: a thread's error is lost
                failures.append(error)
            finally:
                connection.close()
                with lock:
                    latencies.extend(mine)
                    if first is not None:
                        starts.append(first)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return {"first": min(starts), "latencies": latencies, "statuses": dict(statuses)}


def latency_figures(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99),
            "max_ms": max(samples)}  # fmt: skip


def wait_for_callbacks(receiver: Receiver, count: int) -> dict[str, float]:
    deadline = time.monotonic() + max(120.0, count / 10)
    while time.monotonic() < deadline:
        stats = receiver.stats()
        if stats["count"] >= count:
            return stats
        time.sleep(0.05)
    raise TimeoutError(f"{receiver.stats()['count']} of {count} callbacks received")


def check_delivered(application, expected: int) -> None:
    """Every task of the application succeeded and its callback is recorded delivered (the
    callback workers write that after the receiver's answer: given a few seconds)."""
    from tasks.models import Task

    rows = Task.objects.filter(application=application)
    done = rows.filter(status="succeeded", callback_status="delivered")
    wait_until(lambda: done.count() >= expected, timeout=30, interval=0.2)
    assert rows.count() == expected, (rows.count(), expected)


def pipeline_round(submitter: Submitter, receiver: Receiver, meter: CpuMeter, application,
                   total: int) -> dict[str, Any]:  # fmt: skip
    """TASKS tasks by CLIENTS clients, first submit to last callback; CPU per process kind.
    `total` is how many tasks the application had before."""
    receiver.reset()
    meter.start()
    load = submitter.run(CLIENTS, TASKS)
    submitted_by = time.monotonic()
    accepted = sum(n for status, n in load["statuses"].items() if 200 <= status < 300)
    assert accepted == TASKS, load["statuses"]
    callbacks = wait_for_callbacks(receiver, accepted)
    time.sleep(0.3)  # the callback workers record the last deliveries
    cpu = meter.stop()
    check_delivered(application, total + accepted)
    seconds = callbacks["last"] - load["first"]
    return {
        "tasks": accepted,
        "seconds": seconds,
        "tasks_per_s": accepted / seconds,
        "submit_seconds": submitted_by - load["first"],
        "callback_posts": callbacks["posts"],
        "submit": latency_figures(load["latencies"]),
        "cpu_seconds": cpu,
        "cpu_ms_per_task": {kind: s * 1000 / accepted for kind, s in cpu.items() if kind != "wall"},
    }


def one_client(submitter: Submitter, receiver: Receiver) -> dict[str, Any]:
    """ONE_CLIENT_SUBMITS submits one after another on one keep-alive connection, each task
    run (and its callback sent) while the next ones are submitted."""
    receiver.reset()
    connection = submitter.connection()
    try:
        for _ in range(WARMUP_SUBMITS):
            submitter.submit(connection)
        latencies, first = [], time.monotonic()
        for _ in range(ONE_CLIENT_SUBMITS):
            _, status, ms = submitter.submit(connection)
            assert 200 <= status < 300, status
            latencies.append(ms)
    finally:
        connection.close()
    callbacks = wait_for_callbacks(receiver, WARMUP_SUBMITS + ONE_CLIENT_SUBMITS)
    return {"submits": ONE_CLIENT_SUBMITS, **latency_figures(latencies),
            "tasks_per_s": ONE_CLIENT_SUBMITS / (callbacks["last"] - first)}  # fmt: skip


# --- raw RQ ---------------------------------------------------------------------------------------


def raw_workers(redis_url: str, env: dict[str, str]) -> float:
    """WORKERS plain `rq worker --burst` SimpleWorkers on the queue bench-raw, started
    together, until both exit; the CPU seconds they used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [sys.executable, "-m", "rq.cli", "worker", "-u", redis_url, "--burst", "-w",
            "rq.worker.SimpleWorker", "--logging_level", "WARNING", "bench-raw"]  # fmt: skip
    workers = [subprocess.Popen(argv, cwd=BASE_DIR, env=env | {"PYTHONPATH": str(BASE_DIR)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(WORKERS)]  # fmt: skip
    for worker in workers:
        if worker.wait(600) != 0:
            raise RuntimeError(f"a raw RQ worker exited with {worker.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def raw_round(redis_url: str, env: dict[str, str], redis_cpu: psutil.Process | None,
              startup_cpu: float) -> dict[str, Any]:  # fmt: skip
    """RAW_JOBS no-op jobs through WORKERS SimpleWorkers: jobs/s over the time all of them
    ran; their CPU per job (their start-up, an empty burst's, taken out) and Redis's."""
    from rq.job import Job

    from bench.run import raw_queue

    queue = raw_queue(redis_url)
    with queue.connection.pipeline() as pipe:
        for _ in range(RAW_JOBS):
            queue.enqueue("bench.noop.noop", result_ttl=600, pipeline=pipe)
        pipe.execute()
    redis_before = _cpu(redis_cpu) if redis_cpu else 0.0
    worker_cpu = raw_workers(redis_url, env) - startup_cpu
    redis_used = _cpu(redis_cpu) - redis_before if redis_cpu else None
    ids = queue.finished_job_registry.get_job_ids()
    jobs = [job for job in Job.fetch_many(ids, connection=queue.connection) if job]
    assert len(jobs) == RAW_JOBS, (len(jobs), RAW_JOBS)
    # (started, ended) of each job, by the worker that ran it.
    by_worker: collections.defaultdict[str, list[tuple[datetime, datetime]]]
    by_worker = collections.defaultdict(list)
    for job in jobs:
        assert job.started_at is not None and job.ended_at is not None
        by_worker[job.worker_name or "?"].append((job.started_at, job.ended_at))
    spans = [span for runs in by_worker.values() for span in runs]
    # Both running: from the later worker's first start to the earlier one's last end (the
    # workers' start-up differs by a few hundred ms on a loaded machine).
    begin = max(min(start for start, _ in runs) for runs in by_worker.values())
    end = min(max(ended for _, ended in runs) for runs in by_worker.values())
    inside = sum(1 for _, ended in spans if begin < ended <= end)
    whole = (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds()
    both = (end - begin).total_seconds()
    with queue.connection.pipeline() as pipe:
        for job in jobs:
            job.delete(pipeline=pipe)
        pipe.execute()
    queue.finished_job_registry.cleanup()
    return {
        "jobs": len(jobs),
        "workers": len(by_worker),
        "jobs_per_s": inside / both
        if len(by_worker) == WORKERS and both > 1
        else len(jobs) / whole,
        "jobs_per_s_whole": len(jobs) / whole,
        "worker_cpu_ms_per_job": worker_cpu * 1000 / len(jobs),
        "redis_cpu_ms_per_job": None if redis_used is None else redis_used * 1000 / len(jobs),
    }


# --- profiling (an extra round, not measured) -----------------------------------------------------


def profiled_round(stack: Stack, submitter: Submitter, receiver: Receiver) -> dict[str, Any]:
    """One more pipeline round with py-spy on the web (its workers), a task worker and a
    callback worker (their subprocesses too), sampling only the thread holding the GIL (Python
    on the CPU; a wait in a socket releases it): where each one's CPU goes (hottest). The raw
    profiles stay in var/bench-pipeline-*.txt."""
    targets = {"web": stack.pids("web")[0], "task worker": stack.pids("task workers")[0],
               "callback worker": stack.pids("callback workers")[0]}  # fmt: skip
    spies = {}
    for name, pid in targets.items():
        output = BASE_DIR / "var" / f"bench-pipeline-{name.replace(' ', '-')}.txt"
        spies[name] = (output, subprocess.Popen(
            [PY_SPY, "record", "--pid", str(pid), "--subprocesses", "--gil", "--rate", "200",
             "--format", "raw", "--output", str(output), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    time.sleep(2)  # py-spy attaches
    receiver.reset()
    load = submitter.run(CLIENTS, TASKS)
    wait_for_callbacks(receiver, sum(load["statuses"].values()))
    profiles = {}
    for name, (output, spy) in spies.items():
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        spy.wait(60)
        profiles[name] = hottest(output) if output.exists() else {"error": "no profile"}
    return profiles


def hottest(path: Path, top: int = 10) -> dict[str, Any]:
    """From py-spy's raw output (`frame;frame;... count`, frames `function (file:line)`): the
    samples; by package, the share of samples whose innermost frame is that package's
    (redis, psycopg, django, rq, tasks, ...: where the CPU is spent); by owner, the share
    whose innermost function of the project or of RQ is that one (what it calls included:
    which step of the path pays); and the project's and RQ's functions with the most samples
    in their stack (inclusive), the entry points that are in nearly every sample left out."""
    by_package: collections.Counter[str] = collections.Counter()
    owners: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        frames = [frame.replace(str(BASE_DIR) + "/", "") for frame in frames]
        frames = [re.sub(r"\(\S*(site-packages|lib/python3\.\d+)/", "(", f) for f in frames]
        leaf = re.search(r"\(([^/)]+)", frames[-1]) if len(frames) > 1 else None
        by_package[(leaf.group(1) if leaf else "(no Python frame)").removesuffix(".py")] += samples
        ours = [frame for frame in frames[1:] if re.search(r"\((tasks|dashboard|rq)/", frame)]
        owners[ours[-1] if ours else "(none: the server's or the thread's own loop)"] += samples
        for frame in set(ours):  # frames[0] names the process and thread
            inclusive[frame] += samples

    def share(counter: collections.Counter[str], most: float = 1.0) -> list[tuple[str, float]]:
        found = [(f, round(n / max(1, total), 3)) for f, n in counter.most_common()]
        return [(f, part) for f, part in found if part <= most][:top]

    return {"samples": total, "packages": share(by_package), "owners": share(owners),
            "inclusive": share(inclusive, 0.9)}  # fmt: skip


# --- the child: one backend -----------------------------------------------------------------------


def child() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from tasks.applications import create_application
    from tasks.plumbing.queueing import redis_client

    call_command("migrate", verbosity=0)
    env = dict(os.environ)
    for variable in STACK_SIZES:  # runstack's defaults, as `make run` has them
        env.pop(variable, None)
    redis_url = settings.REDIS_URL
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "revision": revision(),
                               "tasks": TASKS, "raw_jobs": RAW_JOBS, "rounds": ROUNDS}  # fmt: skip
    began = time.monotonic()
    created = create_application(name=f"bench-pipeline-{uuid.uuid4().hex[:12]}", runner="echo",
                                 retry_schedule=[], rate_limit_per_second=0)  # fmt: skip
    application = created.application
    receiver = Receiver()
    with STACK_LOG.open("ab") as log:
        stack = Stack(env, log)
        try:
            results["processes"] = dict(stack.kinds())
            assert results["processes"].get("task workers") == WORKERS, results["processes"]
            redis_pid = int(redis_client().info("server")["process_id"])
            try:
                redis_process: psutil.Process | None = psutil.Process(redis_pid)
                assert redis_process is not None and "redis" in redis_process.name()
            except (psutil.Error, AssertionError):
                redis_process, redis_pid = None, 0  # another machine's: not measured
            meter = CpuMeter(stack.tree, psutil.Process(receiver.process.pid), redis_pid or None,
                             PostgresCpu.of_connection())  # fmt: skip
            submitter = Submitter(stack.port, str(application.id), created.api_key, receiver.hook)
            results["database_measured"] = meter.database is not None or (
                settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"))  # fmt: skip
            results["redis_measured"] = redis_process is not None

            # Warm-up: every web worker has served, every worker has run, the raw worker's
            # start-up cost known; then what the idle stack uses per second.
            receiver.reset()
            warm = submitter.run(CLIENTS, 200)
            wait_for_callbacks(receiver, sum(warm["statuses"].values()))
            done = 200
            startup = raw_workers(redis_url, env)  # on an empty queue: start-up and exit
            meter.start()
            time.sleep(5)
            idle = meter.stop()
            results["idle_cpu_per_s"] = {
                k: v / idle["wall"] for k, v in idle.items() if k != "wall"
            }
            results["raw_startup_cpu_s"] = startup

            raw, pipeline = [], []
            for index in range(ROUNDS + 1):
                raw.append(raw_round(redis_url, env, redis_process, startup))
                print(f"raw {index + 1}: {json.dumps(raw[-1])}", file=sys.stderr, flush=True)
                if index == ROUNDS:
                    break
                pipeline.append(pipeline_round(submitter, receiver, meter, application, done))
                done += TASKS
                print(f"pipeline {index + 1}: {json.dumps(pipeline[-1])}", file=sys.stderr,
                      flush=True)  # fmt: skip
            results["raw"] = raw
            results["pipeline"] = pipeline
            results["one_client"] = one_client(submitter, receiver)
            print(f"one client: {json.dumps(results['one_client'])}", file=sys.stderr, flush=True)
            if PROFILE:
                results["profile"] = profiled_round(stack, submitter, receiver)
        finally:
            stack.stop()
            receiver.stop()
    results["seconds"] = time.monotonic() - began
    results["load_after"] = os.getloadavg()[0]
    results |= summary(results)
    print(json.dumps(results))


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Medians and ranges of the rounds; each pipeline round over the mean of the raw rounds
    right before and after it."""
    raw = [r["jobs_per_s"] for r in results["raw"]]
    rates = [r["tasks_per_s"] for r in results["pipeline"]]
    ratios = [rate / statistics.fmean(raw[i : i + 2]) for i, rate in enumerate(rates)]
    kinds = {k for r in results["pipeline"] for k in r["cpu_ms_per_task"]}
    cpu = {k: statistics.median(r["cpu_ms_per_task"].get(k, 0.0) for r in results["pipeline"])
           for k in kinds}  # fmt: skip
    busy = [sum(v for k, v in r["cpu_seconds"].items() if k != "wall") / r["cpu_seconds"]["wall"]
            for r in results["pipeline"]]  # fmt: skip
    return {
        "tasks_per_s": statistics.median(rates), "tasks_per_s_range": [min(rates), max(rates)],
        "raw_per_s": statistics.median(raw), "raw_per_s_range": [min(raw), max(raw)],
        "ratio": statistics.median(ratios), "ratios": ratios,
        "p50_10_ms": statistics.median(r["submit"]["p50_ms"] for r in results["pipeline"]),
        "p99_10_ms": statistics.median(r["submit"]["p99_ms"] for r in results["pipeline"]),
        "p99_10_range": [min(r["submit"]["p99_ms"] for r in results["pipeline"]),
                         max(r["submit"]["p99_ms"] for r in results["pipeline"])],
        "cpu_ms_per_task": cpu,
        "cores_busy": statistics.median(busy),
        "raw_worker_cpu_ms_per_job": statistics.median(
            r["worker_cpu_ms_per_job"] for r in results["raw"]),
        "raw_redis_cpu_ms_per_job": None if not results["redis_measured"] else statistics.median(
            r["redis_cpu_ms_per_job"] for r in results["raw"]),
    }  # fmt: skip


# --- orchestration --------------------------------------------------------------------------------


def backends(embedded_url: str, sqlite: Path) -> list[tuple[str, dict[str, str]]]:
    base = common.base_env(DEBUG="true", CALLBACK_ALLOW_PRIVATE_NETWORKS="true")
    for variable in ("LOG_LEVEL", "RQ_LOG_LEVEL"):  # logging as `make run` has it
        if variable not in os.environ:
            base.pop(variable, None)
    return common.backends(
        embedded_url, sqlite, base=base, only=os.environ.get("BENCH_PIPELINE_ONLY", ""),
        pg_database=PG_DATABASE, redis_url=bench_redis_url(),
        in_use_hint="BENCH_REDIS_DB or BENCH_PIPELINE_REDIS_URL",
    )  # fmt: skip


def bench_redis_url() -> str:
    db = int(os.environ.get("BENCH_REDIS_DB", 12))
    return common.bench_redis_url("BENCH_PIPELINE_REDIS_URL", db)


def main() -> None:
    STACK_LOG.write_bytes(b"")
    common.orchestrate(
        str(Path(__file__).resolve()), "pipeline", backends, write_report=write_report,
        partial="BENCH_PIPELINE_PARTIAL", results=RESULTS, pg_database=PG_DATABASE,
    )  # fmt: skip


# --- the report -----------------------------------------------------------------------------------


def _range(median: float, span: list[float], digits: int = 0) -> str:
    return f"{median:,.{digits}f} ({min(span):,.{digits}f}-{max(span):,.{digits}f})"


def _cpu_row(kind: str) -> tuple[str, Any]:
    def figure(d: dict[str, Any]) -> str:
        value = d["cpu_ms_per_task"].get(kind)
        if kind == "database" and not d.get("database_measured"):
            return "not visible"
        if kind == "database" and value is None:
            return "in the processes above (SQLite)"
        if kind == "redis" and not d.get("redis_measured"):
            return "not visible"
        return "-" if value is None else f"{value:.2f}"

    return f"  {kind}", figure


def _total(d: dict[str, Any]) -> float:
    return sum(v for k, v in d["cpu_ms_per_task"].items() if k != "database (shared writers)")


ROWS: list[tuple[str, Any]] = [
    (f"**Full pipeline**: {TASKS:,} tasks by {CLIENTS} HTTP clients, first submit to last "
     f"callback received (tasks/s), median (range) of {ROUNDS}",
     lambda d: _range(d["tasks_per_s"], d["tasks_per_s_range"])),
    (f"raw RQ: {RAW_JOBS:,} no-op jobs through {WORKERS} SimpleWorkers (jobs/s), median (range) "
     f"of {ROUNDS + 1}", lambda d: _range(d["raw_per_s"], d["raw_per_s_range"])),
    (f"ratio pipeline / raw, median (range) of the rounds (target >= {RATIO_TARGET})",
     lambda d: _range(d["ratio"], d["ratios"], 2)),
    (f"submit latency, {CLIENTS} clients, while the pipeline runs: p50 / p99 (ms), medians of "
     f"the rounds (target p99 <= {P99_TARGET_MS:.0f})",
     lambda d: f"{d['p50_10_ms']:.1f} / {d['p99_10_ms']:.1f} "
               f"(p99 {min(d['p99_10_range']):.0f}-{max(d['p99_10_range']):.0f})"),
    (f"submit latency, 1 client, {ONE_CLIENT_SUBMITS} submits with the pipeline running them: "
     f"p50 / p99 (ms) (target p50 <= {P50_TARGET_MS:.0f}); its tasks/s",
     lambda d: f"{d['one_client']['p50_ms']:.1f} / {d['one_client']['p99_ms']:.1f}; "
               f"{d['one_client']['tasks_per_s']:,.0f}/s"),
    ("**CPU per task** (ms, median of the rounds), by process kind:", lambda d: ""),
    *[_cpu_row(kind) for kind in KINDS],
    ("  all of them; cores busy over the round (of 2)",
     lambda d: f"{_total(d):.2f}; {d['cores_busy']:.2f}"),
    ("  PostgreSQL's shared writers (WAL writer, checkpointer, background writer: the whole "
     "server's)",
     lambda d: f"{d['cpu_ms_per_task']['database (shared writers)']:.2f}"
     if "database (shared writers)" in d["cpu_ms_per_task"] else "-"),
    ("raw RQ's CPU per job (ms): its 2 workers (start-up taken out); Redis",
     lambda d: f"{d['raw_worker_cpu_ms_per_job']:.2f}; "
               + ("not visible" if d["raw_redis_cpu_ms_per_job"] is None
                  else f"{d['raw_redis_cpu_ms_per_job']:.2f}")),
    ("Load average (1 min) before / after; run time",
     lambda d: f"{d['load_before']:.1f} / {d['load_after']:.1f}; {d['seconds'] / 60:.1f} min"),
]  # fmt: skip


def verdicts(columns: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The issue's targets, met or missed in each column; a ratio is met when every round's
    is, missed when none is, else inconclusive."""
    said_as = {True: "met", False: "**missed**", None: "inconclusive (the rounds straddle it)"}

    def line(target: str, met: Any, figure: Any) -> str:
        said = "; ".join(f"{name}: {said_as[met(d)]}, {figure(d)}" for name, d in columns)
        return f"- {target}: {said}."

    def rounds(values: list[float], target: float) -> bool | None:
        return True if min(values) >= target else False if max(values) < target else None

    return [
        line(f"full pipeline with callbacks >= {RATIO_TARGET} x raw RQ no-op jobs/s with "
             f"{WORKERS} task workers", lambda d: rounds(d["ratios"], RATIO_TARGET),
             lambda d: f"x{d['ratio']:.2f}"),
        line(f"{CLIENTS}-client submit p99 <= {P99_TARGET_MS:.0f} ms while the pipeline runs",
             lambda d: max(d["p99_10_range"]) <= P99_TARGET_MS,
             lambda d: f"{max(d['p99_10_range']):.0f} ms (the worse round)"),
        line(f"1-client submit p50 <= {P50_TARGET_MS:.0f} ms",
             lambda d: d["one_client"]["p50_ms"] <= P50_TARGET_MS,
             lambda d: f"{d['one_client']['p50_ms']:.1f} ms"),
    ]  # fmt: skip


def profile_lines(columns: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = []
    for name, d in columns:
        for process, found in d.get("profile", {}).items():
            if "packages" not in found:
                continue
            packages = ", ".join(f"{package} {part:.0%}" for package, part in found["packages"][:6])
            owners = ", ".join(f"`{frame}` {part:.0%}" for frame, part in found["owners"][:8])
            lines.append(f"- {name}, {process} ({found['samples']:,} samples holding the GIL): "
                         f"innermost frame in {packages}; innermost function of the project "
                         f"or RQ: {owners}")  # fmt: skip
    return lines


def write_report(columns: list[tuple[str, dict[str, Any]]], seconds: float) -> None:
    profiles = profile_lines(columns)
    section = (
        "## Full pipeline\n\n"
        f"`bench/pipeline.py`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, code at "
        f"{' / '.join(dict.fromkeys(d.get('revision', '?') for _, d in columns))} "
        f"({common.machine()}; {seconds / 60:.0f} min in all). The stack is `manage.py "
        "runstack` as `make run` starts it (gunicorn, 2 task workers, 2 callback workers, cron; "
        "DEBUG=true, its logging), an `echo` application without a rate limit; each of "
        f"{CLIENTS} client threads (http.client, keep-alive) submits async tasks with a "
        "callback_url as fast as it can, to a receiver process on 127.0.0.1 that answers 200 "
        "at once and counts unique task ids. Rounds raw, pipeline, raw, ...: each pipeline "
        "round over the mean of the raw rounds right before and after it; raw RQ is "
        f"{WORKERS} plain `rq worker --burst` SimpleWorkers on the same Redis (the stack "
        "idle meanwhile), jobs/s while both ran, from the jobs' timestamps. The 1-client "
        "submits run after the rounds. CPU: psutil's user + system time of each process "
        "and its reaped children over each round (first submit to last callback), per task; "
        "web is the gunicorn master and its workers, the workers include their RQ scheduler "
        "processes, the database is PostgreSQL's backends of the benchmark's database "
        "(sampled from /proc), the load generator is the client threads' process (with the "
        "sampler). The system Redis of the PostgreSQL column serves other databases too. "
        "Absolute figures move with whatever else runs on the 2 shared cores; the ratios, "
        "measured in one run, less.\n\n"
        + common.report_table(ROWS, columns)
        + "\n\nTargets (issue #23):\n\n"
        + "\n".join(verdicts(columns))
        + ("\n\nWhere the CPU goes (py-spy --gil on one process of each kind, subprocesses "
           "included, during an extra round that is not measured; shares of its samples):\n\n"
           + "\n".join(profiles) if profiles else "")
        + "\n"
    )  # fmt: skip
    write_report_section("Full pipeline", section)
    print(section)


if __name__ == "__main__":
    if "--receiver" in sys.argv:
        receiver_main()
    else:
        common.command_line(child=child, main=main, write_report=write_report, results=RESULTS)
