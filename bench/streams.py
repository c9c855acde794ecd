"""Live event streams on ONE web process (WEB_CONCURRENCY=1): `make bench` runs this from
bench/run.py; `python bench/streams.py` runs it alone. Writes the "Live event streams" section
of docs/benchmarks.md (between its marker comments) and every figure to var/bench-streams.json.

Every `task.output.delta` carries its emit time (time.time(): the emitter and the client are on
the same machine), so the client measures emit -> receipt. Variants:

- "burst": COLD_STREAMS streams opened at once on a fresh web process, one event each.
- "distinct": STREAMS streams, each following a task of its own, whose events a publisher
  process writes through `tasks.events.stream.publish` at RATE per second per task: the fan-out
  over STREAMS distinct subscriptions.
- "tasks": STREAMS streams over TASKS running tasks, one worker process per task, the runner
  (`bench.streams.ticking_runner`) calling `ctx.emit` at RATE per second.

"distinct" and "tasks" each have a quiet window (latency alone) and a window with wrk submitting
and polling against the same web process. Submit and poll throughput is measured without
streams (before and after; the mean is the baseline), with STREAMS idle streams open, and with
each variant's events flowing. The web worker's RSS before and with the streams open gives
memory per stream. The SSE clients are raw asyncio sockets by default (BENCH_STREAMS_CLIENT=httpx:
httpx + httpx-sse, about twice the client CPU per event).

Sizes: BENCH_STREAMS (1000), BENCH_STREAMS_TASKS, _RATE, _QUIET_SECONDS, _WRK_SECONDS, _BURST.
For a closer look: BENCH_STREAMS_ONLY=sqlite|postgresql, BENCH_STREAMS_PHASES=burst,distinct,tasks
(a subset: figures printed, no report), BENCH_STREAMS_LOG_LEVEL=INFO (the web's log is
var/bench-streams-web.log), BENCH_STREAMS_DUMP=1 (every sample under var/).

Backends: SQLite + an embedded Redis always; PostgreSQL + Redis when DATABASE_URL (or
BENCH_PG_URL) is a PostgreSQL URL (database `taskhook_bench_streams` on that server, recreated
each run; Redis BENCH_STREAMS_REDIS_URL, default db 12). Each backend runs in a child process:
  python bench/streams.py             # orchestrate, write the section of docs/benchmarks.md
  python bench/streams.py --child     # one backend (env says which), JSON on stdout
  python bench/streams.py --client    # the SSE clients (spec on stdin), JSON on stdout
  python bench/streams.py --publisher # the "distinct" variant's writer (spec on stdin)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import queue
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench import common  # noqa: E402

STREAMS = int(os.environ.get("BENCH_STREAMS", 1000))
TASKS = int(os.environ.get("BENCH_STREAMS_TASKS", 10))  # "tasks" variant: one worker each
RATE = float(os.environ.get("BENCH_STREAMS_RATE", 2.0))  # events/s per task, so per stream
QUIET_SECONDS = float(os.environ.get("BENCH_STREAMS_QUIET_SECONDS", 20))
WRK_SECONDS = int(os.environ.get("BENCH_STREAMS_WRK_SECONDS", 5))
WRK_CLIENTS = 10
COLD_STREAMS = int(os.environ.get("BENCH_STREAMS_BURST", 200))  # the burst on a fresh process
CLIENT = os.environ.get("BENCH_STREAMS_CLIENT", "raw")  # "raw" asyncio sockets, or "httpx"
GATE = "bench-streams-gate:"
MARK_BEGIN = "<!-- bench/streams.py: this section is rewritten by each run -->"
MARK_END = "<!-- /bench/streams.py -->"
TARGET_P50_MS, TARGET_P99_MS = 20, 100


# --- the runner (inside the RQ worker) ---------------------------------------------------------


def ticking_runner(inputs: dict[str, Any], ctx: Any) -> dict[str, int]:
    """Waits for the benchmark's gate (every stream is open by then) and `inputs.offset`
    seconds, then emits `inputs.count` pieces `"<seq> <time.time()>"`, one every
    `inputs.interval` seconds."""
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL)
    if client.blpop([GATE + str(ctx.task_id)], timeout=300) is None:
        raise RuntimeError("the benchmark never opened the gate")
    count, interval = int(inputs["count"]), float(inputs["interval"])
    started = time.monotonic() + float(inputs.get("offset", 0))
    for seq in range(count):
        time.sleep(max(0.0, started + seq * interval - time.monotonic()))
        ctx.emit(f"{seq} {time.time():.6f}")
    return {"emitted": count}


# --- the SSE clients (a process of their own, no Django) ---------------------------------------


class Tally:
    """What one stream received: output deltas in order (seq), ids increasing."""

    __slots__ = ("deltas", "error", "expected", "finished", "last_id", "next_seq", "problems")

    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.deltas = 0
        self.next_seq = 0
        self.last_id: tuple[int, int] = (0, 0)
        self.problems = 0  # an id not above the previous one, or a seq out of order
        self.finished = False
        self.error = ""

    def done(self) -> bool:
        return self.finished or (self.expected is not None and self.deltas >= self.expected)


class Collector:
    """Every stream's events: emit times and latencies, in arrival order."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.opened = 0
        self.failed = 0
        self.emitted_at: list[float] = []
        self.latency_ms: list[float] = []
        self.all_open = asyncio.Event()

    def open_result(self, ok: bool) -> None:
        if ok:
            self.opened += 1
        else:
            self.failed += 1
        if self.opened + self.failed >= self.total:
            self.all_open.set()

    def event(self, tally: Tally, event_id: str, event: str, data: str) -> None:
        now = time.time()
        ms, _, seq_part = event_id.partition("-")
        pair = (int(ms), int(seq_part or 0))
        if pair <= tally.last_id:
            tally.problems += 1
        tally.last_id = pair
        if event == "task.output.delta":
            seq, emitted = json.loads(data)["text"].split()
            if int(seq) != tally.next_seq:
                tally.problems += 1
            tally.next_seq = int(seq) + 1
            tally.deltas += 1
            self.emitted_at.append(float(emitted))
            self.latency_ms.append((now - float(emitted)) * 1000)
        elif event == "task.finished":
            tally.finished = True


def parse_block(block: bytes) -> tuple[str, str, str] | None:
    """(id, event, data) of one SSE block; None for a comment or the `retry:` block."""
    event_id = event = ""
    data: list[str] = []
    for line in block.decode().split("\n"):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "event":
            event = value
        elif field == "data":
            data.append(value)
    return (event_id, event or "message", "\n".join(data)) if data else None


async def follow_raw(spec: dict[str, Any], tally: Tally, collector: Collector) -> None:
    """One stream over a plain asyncio connection: HTTP/1.1, chunked, SSE parsed by hand."""
    from urllib.parse import urlsplit

    url = urlsplit(spec["url"])
    opened = False
    writer = None
    try:
        reader, writer = await asyncio.open_connection(url.hostname, url.port, limit=1 << 20)
        lines = [
            f"GET {url.path}{'?' + url.query if url.query else ''} HTTP/1.1",
            f"Host: {url.netloc}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
        ]
        lines += [f"{name}: {value}" for name, value in spec.get("headers", {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        status = int((await reader.readline()).split()[1])
        head = b""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            head += line.lower()
        if status != 200:
            tally.error = f"status {status}"
            return
        opened = True
        collector.open_result(True)
        chunked = b"transfer-encoding: chunked" in head
        buffer = b""
        while not tally.done():
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                chunk = (await reader.readexactly(size + 2))[:-2]
            else:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
            buffer += chunk
            while b"\n\n" in buffer and not tally.done():
                block, buffer = buffer.split(b"\n\n", 1)
                parsed = parse_block(block)
                if parsed is not None:
                    collector.event(tally, *parsed)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
        tally.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not opened:
            collector.open_result(False)
        if writer is not None:
            writer.close()


async def follow_httpx(
    client: Any, spec: dict[str, Any], tally: Tally, collector: Collector
) -> None:
    """One stream through httpx + httpx-sse, as tests/test_events.py reads them."""
    import httpx
    from httpx_sse import aconnect_sse

    opened = False
    try:
        async with aconnect_sse(
            client, "GET", spec["url"], headers=dict(spec.get("headers", {}))
        ) as source:
            if source.response.status_code != 200:
                tally.error = f"status {source.response.status_code}"
                return
            opened = True
            collector.open_result(True)
            async for sse in source.aiter_sse():
                if sse.data:
                    collector.event(tally, sse.id, sse.event, sse.data)
                if tally.done():
                    break
    except (httpx.HTTPError, OSError, ValueError) as exc:
        tally.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not opened:
            collector.open_result(False)


async def run_clients(spec: dict[str, Any]) -> dict[str, Any]:
    streams = spec["streams"]
    collector = Collector(len(streams))
    tallies = [Tally(stream.get("expected")) for stream in streams]
    started_cpu = _cpu_seconds()
    began = time.monotonic()
    http_client = None
    if spec["client"] == "httpx":
        import httpx

        http_client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            timeout=httpx.Timeout(60.0, read=None),
        )
        jobs = [
            follow_httpx(http_client, s, t, collector)
            for s, t in zip(streams, tallies, strict=True)
        ]
    else:
        jobs = [follow_raw(s, t, collector) for s, t in zip(streams, tallies, strict=True)]
    tasks = [asyncio.ensure_future(job) for job in jobs]
    await asyncio.wait_for(collector.all_open.wait(), timeout=120)
    open_seconds = time.monotonic() - began
    open_cpu = _cpu_seconds()
    print(json.dumps({"opened": collector.opened, "failed": collector.failed,
                      "seconds": open_seconds}), flush=True)  # fmt: skip
    _, pending = await asyncio.wait(tasks, timeout=spec["deadline_seconds"])
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if http_client is not None:
        await http_client.aclose()
    for tally in tallies:
        if not tally.done() and not tally.error:
            tally.error = "deadline"
    return {
        "opened": collector.opened,
        "open_seconds": open_seconds,
        "open_cpu_seconds": open_cpu - started_cpu,
        "flow_cpu_seconds": _cpu_seconds() - open_cpu,
        "streams": [[t.deltas, t.problems, t.finished, t.error] for t in tallies],
        "emitted_at": collector.emitted_at,
        "latency_ms": [round(value, 3) for value in collector.latency_ms],
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * STREAMS + 1024 if hard == resource.RLIM_INFINITY else min(hard, 4 * STREAMS + 1024)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def client_main() -> None:
    raise_fd_limit()
    spec = json.loads(sys.stdin.read())
    try:
        import uvloop  # the client's own overhead is not under test

        result = uvloop.run(run_clients(spec))
    except ImportError:
        result = asyncio.run(run_clients(spec))
    print(json.dumps(result), flush=True)


# --- the "distinct" variant's publisher (a process of its own) ---------------------------------


def publisher_main() -> None:
    """Publishes `count` output deltas to each task, RATE per second per task, spread evenly
    over the tasks from `start_at`; prints how many were published per task."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
    import django

    django.setup()
    from tasks.events import catalog
    from tasks.events import stream as event_stream

    spec = json.loads(sys.stdin.read())
    task_ids, count, rate = spec["task_ids"], spec["count"], spec["rate"]
    published = [0] * len(task_ids)
    step = 1.0 / (rate * len(task_ids))
    start_at = spec["start_at"]
    for n in range(count * len(task_ids)):
        delay = start_at + n * step - time.time()
        if delay > 0:
            time.sleep(delay)
        index = n % len(task_ids)
        seq = n // len(task_ids)
        entry = event_stream.publish(
            task_id=task_ids[index], run=1, event=catalog.OUTPUT_DELTA,
            data={"text": f"{seq} {time.time():.6f}"},
        )  # fmt: skip
        if entry is not None:
            published[index] += 1
    print(json.dumps({"published": published, "late_by_s": time.time() - (start_at + n * step)}))


# --- processes -----------------------------------------------------------------------------------


class Group:
    """Processes started in sessions of their own, each stopped with its whole group."""

    def __init__(self) -> None:
        self.items: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        process = subprocess.Popen(argv, cwd=BASE_DIR, env=env, start_new_session=True, **kwargs)
        self.items.append(process)
        return process

    @staticmethod
    def stop(process: subprocess.Popen, timeout: float = 15) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Whatever the leader left behind in its group (gunicorn's worker, RQ's horse).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for process in reversed(self.items):
            self.stop(process)
        self.items.clear()


WEB_LOG = BASE_DIR / "var" / "bench-streams-web.log"


def start_web(port: int, env: dict[str, str], group: Group) -> subprocess.Popen:
    """gunicorn as bench.common.start_gunicorn starts it, its output kept in WEB_LOG."""
    import httpx

    from dashboard.runtime.processes import web_argv

    with WEB_LOG.open("ab") as log:
        web = group.start(web_argv(), env | {"GUNICORN_BIND": f"127.0.0.1:{port}"},
                          stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return web
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not start; see {WEB_LOG}")


def web_worker(web: subprocess.Popen) -> Any:
    """The uvicorn worker process under the gunicorn master."""
    import psutil

    children = psutil.Process(web.pid).children()
    assert len(children) == 1, children
    return children[0]


class Clients:
    """The SSE client process: started with its spec, `opened()` once every stream answered,
    `result()` once they all ended."""

    def __init__(self, group: Group, env: dict[str, str], streams: list[dict[str, Any]],
                 deadline_seconds: float) -> None:  # fmt: skip
        spec = {"streams": streams, "client": CLIENT, "deadline_seconds": deadline_seconds}
        self.process = group.start(
            [sys.executable, str(Path(__file__).resolve()), "--client"], env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
        )  # fmt: skip
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(spec))
        self.process.stdin.close()
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.deadline_seconds = deadline_seconds

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _line(self, timeout: float) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        if not line:
            raise RuntimeError(f"the client process ended (exit {self.process.wait()})")
        return json.loads(line)

    def opened(self) -> dict[str, Any]:
        return self._line(timeout=150)

    def result(self, name: str) -> dict[str, Any]:
        result = self._line(timeout=self.deadline_seconds + 60)
        self.process.wait(30)
        if os.environ.get("BENCH_STREAMS_DUMP"):  # every sample, for a closer look
            (BASE_DIR / "var" / f"bench-streams-{name}-samples.json").write_text(json.dumps(result))
        return result


# --- one backend ---------------------------------------------------------------------------------


def window(result: dict[str, Any], start: float, end: float) -> dict[str, float]:
    """p50 / p99 / max latency of the events emitted between start and end (time.time())."""
    from bench.run import percentile

    pairs = zip(result["emitted_at"], result["latency_ms"], strict=True)
    samples = [latency for at, latency in pairs if start <= at < end]
    if not samples:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"n": len(samples), "p50": percentile(samples, 50), "p99": percentile(samples, 99),
            "max": max(samples)}  # fmt: skip


def completeness(result: dict[str, Any], expected: list[int]) -> dict[str, Any]:
    """Whether each stream got exactly its task's emitted deltas, in order, ids increasing."""
    tally = {"complete": 0, "short": 0, "none": 0, "short_finished": 0, "order": 0, "errors": 0}
    errors: dict[str, int] = {}
    for (deltas, problems, finished, error), wanted in zip(
        result["streams"], expected, strict=True
    ):
        if error:
            tally["errors"] += 1
            errors[error[:80]] = errors.get(error[:80], 0) + 1
        elif deltas < wanted:
            tally["short"] += 1
            tally["none"] += deltas == 0
            tally["short_finished"] += finished  # ended with task.finished all the same
        elif problems or deltas != wanted:
            tally["order"] += 1
        else:
            tally["complete"] += 1
    return tally | {"received": sum(s[0] for s in result["streams"]), "expected": sum(expected),
                    "error_reasons": errors}  # fmt: skip


class Throughput:
    """Submit and poll requests/s against the web process, by phase."""

    def __init__(self, base: str, app: Any, task_id: str, worker: Any) -> None:
        self.worker = worker  # the web worker process, whose CPU each run takes
        self.submit_url = f"{base}/api/applications/{app.application.id}/generate"
        self.poll_url = f"{base}/api/tasks/{task_id}"
        self.headers = {"Authorization": f"Bearer {app.api_key}",
                        "Content-Type": "application/json"}  # fmt: skip
        self.body = json.dumps({"inputs": {"q": "bench"}, "response_mode": "async"})
        self.figures: dict[str, dict[str, float]] = {}

    def measure(self, phase: str) -> tuple[float, float]:
        import psutil

        started = time.time()
        cpu = sum(self.worker.cpu_times()[:2])
        psutil.cpu_percent()
        submit = common.wrk(self.submit_url, self.headers, method="POST", body=self.body,
                            clients=WRK_CLIENTS, seconds=WRK_SECONDS)  # fmt: skip
        poll = common.wrk(self.poll_url, self.headers, clients=WRK_CLIENTS, seconds=WRK_SECONDS)
        self.figures[phase] = {
            "submit": submit,
            "poll": poll,
            "web_cores": (sum(self.worker.cpu_times()[:2]) - cpu) / (time.time() - started),
            "machine_percent": psutil.cpu_percent(),
        }
        print(f"  {phase}: {self.figures[phase]}", file=sys.stderr)
        return started, time.time()


def running_tasks(app: Any, count: int) -> list[str]:
    """`count` running tasks of `app` (rows only: no worker runs them)."""
    from django.utils import timezone

    from tasks.models import Task

    now = timezone.now()
    created = Task.objects.bulk_create(
        Task(application=app.application, inputs={}, status="running", started_at=now,
             created_at=now) for _ in range(count)
    )  # fmt: skip
    return [str(task.id) for task in created]


def stream_url(base: str, task_id: str) -> str:
    from tasks.events import tokens

    return f"{base}/api/tasks/{task_id}/events?token={tokens.issue(task_id)}"


def start_publisher(group: Group, env: dict[str, str], task_ids: list[str], *, count: int,
                    rate: float, start_at: float) -> subprocess.Popen:  # fmt: skip
    publisher = group.start(
        [sys.executable, str(Path(__file__).resolve()), "--publisher"], env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
    )  # fmt: skip
    assert publisher.stdin is not None
    publisher.stdin.write(json.dumps({"task_ids": task_ids, "count": count, "rate": rate,
                                      "start_at": start_at}))  # fmt: skip
    publisher.stdin.close()
    return publisher


def finish_publisher(publisher: subprocess.Popen) -> dict[str, Any]:
    assert publisher.stdout is not None
    published = json.loads(publisher.stdout.read())
    publisher.wait(30)
    return published


def pubsub_clients() -> tuple[int, int]:
    """Redis pub/sub connections on the benchmark's database, and their subscriptions."""
    from tasks.plumbing.queueing import redis_client

    client = redis_client()
    db = client.connection_pool.connection_kwargs.get("db", 0)
    listing = client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
    listing = listing.decode() if isinstance(listing, bytes) else listing
    fields = [dict(item.split("=", 1) for item in line.split() if "=" in item)
              for line in listing.splitlines()]  # fmt: skip
    ours = [f for f in fields if f.get("db") == str(db)]
    return len(ours), sum(int(f.get("sub", 0)) for f in ours)


class Bench:
    """One backend's run: the web process, its load generator, the applications."""

    def __init__(self, group: Group, env: dict[str, str]) -> None:
        import httpx

        from bench.common import free_port
        from tasks.applications import create_application

        def unlimited(app: Any) -> Any:
            app.application.rate_limit_per_second = 1_000_000
            app.application.rate_limit_burst = 1_000_000
            app.application.save()
            return app

        self.group, self.env = group, env
        self.echo = unlimited(create_application(name="bench-streams-echo", runner="echo",
                                                 retry_schedule=[]))  # fmt: skip
        self.ticking = unlimited(create_application(name="bench-streams-ticking",
                                                    runner="bench.streams.ticking_runner",
                                                    retry_schedule=[]))  # fmt: skip
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.web = start_web(port, env, group)
        self.worker = web_worker(self.web)
        self.http = httpx.Client(timeout=10)
        answer = self.submit(self.echo, {})
        self.load = Throughput(self.base, self.echo, answer["task_id"], self.worker)
        # One stream first, alone: the process's pub/sub connection exists before the
        # figures (the burst phase measures a fresh process).
        url = stream_url(self.base, running_tasks(self.echo, 1)[0])
        with self.http.stream("GET", url) as response:
            assert response.status_code == 200, response.status_code

    def submit(self, app: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.http.post(
            f"{self.base}/api/applications/{app.application.id}/generate",
            headers={"Authorization": f"Bearer {app.api_key}"},
            json={"inputs": inputs, "response_mode": "async"},
        ).json()

    def rss(self) -> int:
        return self.worker.memory_info().rss

    def clients(self, streams: list[dict[str, Any]], deadline_seconds: float) -> Clients:
        return Clients(self.group, self.env, streams, deadline_seconds)


def phase_burst(bench: Bench) -> dict[str, Any]:
    """COLD_STREAMS streams opened at once on a fresh web process of its own (as after a
    deploy, every client reconnecting at once), one event each: does each get it at once?"""
    from bench.common import free_port

    cold_ids = running_tasks(bench.echo, COLD_STREAMS)
    port = free_port()
    web = start_web(port, bench.env, bench.group)
    try:
        base = f"http://127.0.0.1:{port}"
        pubsub_before = pubsub_clients()
        clients = bench.clients([{"url": stream_url(base, tid), "expected": 1}
                                 for tid in cold_ids], deadline_seconds=60)  # fmt: skip
        opened = clients.opened()
        time.sleep(1)
        pubsub_open = pubsub_clients()
        publisher = start_publisher(bench.group, bench.env, cold_ids, count=1, rate=1.0,
                                    start_at=time.time() + 0.5)  # fmt: skip
        published = finish_publisher(publisher)
        result = clients.result("burst")
    finally:
        bench.group.stop(web)
    latencies = result["latency_ms"]
    return {
        "streams": COLD_STREAMS,
        "opened": opened,
        "received": len(latencies),
        "within_1s": sum(1 for value in latencies if value <= 1000),
        "latency": window(result, 0, float("inf")),
        "check": completeness(result, published["published"]),
        "pubsub_connections_opened": pubsub_open[0] - pubsub_before[0],
        "pubsub_channels": pubsub_open[1] - pubsub_before[1],
    }


def phase_distinct(bench: Bench) -> dict[str, Any]:
    """A task per stream, events from the publisher process; wrk with the streams idle, then
    with the events flowing."""
    from django.utils import timezone

    from tasks.events import catalog
    from tasks.events import stream as event_stream
    from tasks.models import Task

    task_ids = running_tasks(bench.echo, STREAMS)
    count = int(RATE * (QUIET_SECONDS + 2 * WRK_SECONDS + 4))
    streams = [{"url": stream_url(bench.base, tid), "expected": None} for tid in task_ids]
    rss_before = bench.rss()
    clients = bench.clients(streams, deadline_seconds=count / RATE + 120)
    opened = clients.opened()
    time.sleep(1)  # the last streams' first reads are done
    out: dict[str, Any] = {"open": opened | {"rss_before": rss_before, "rss_open": bench.rss(),
                                             "fds_open": bench.worker.num_fds(),
                                             "pubsub": pubsub_clients()}}  # fmt: skip
    print(f"  distinct: {out['open']}", file=sys.stderr)
    bench.load.measure("idle streams")

    start_at = time.time() + 1.0
    publisher = start_publisher(bench.group, bench.env, task_ids, count=count, rate=RATE,
                                start_at=start_at)  # fmt: skip
    quiet = quiet_window(start_at + 1.0, bench.worker)
    flowing = bench.load.measure("distinct flowing")
    published = finish_publisher(publisher)
    # The tasks finish (database, then their finish markers): each stream ends on it.
    Task.objects.filter(pk__in=task_ids).update(status="succeeded", finished_at=timezone.now(),
                                                output={})  # fmt: skip
    for tid in task_ids:
        event_stream.publish(task_id=tid, run=1, event=catalog.FINISHED, data={})
    result = clients.result("distinct")
    return (
        out
        | flow_figures(result, quiet, flowing, published["published"])
        | {"published_late_by_s": published["late_by_s"], "count_per_task": count}
    )


def phase_tasks(bench: Bench) -> dict[str, Any]:
    """STREAMS streams over TASKS running tasks (a worker each), ctx.emit in the runner."""
    from django.conf import settings

    from dashboard.runtime.processes import worker_argv
    from tasks.models import Task
    from tasks.plumbing.queueing import queue, redis_client

    queue(settings.TASK_QUEUE).empty()
    env = bench.env | {"RQ_LOG_LEVEL": "ERROR"}
    workers = [bench.group.start(worker_argv("worker", name=f"bench-streams-{os.getpid()}-{n}"),
                                 env) for n in range(TASKS)]  # fmt: skip
    count = int(RATE * (QUIET_SECONDS + 2 * WRK_SECONDS + 4))
    # The tasks' emits spread evenly over each interval: in step, every one of the streams
    # would get an event at the same instant, and wait on the others' deliveries.
    answers = [
        bench.submit(bench.ticking, {"count": count, "interval": 1 / RATE,
                                     "offset": n / (TASKS * RATE)})
        for n in range(TASKS)
    ]  # fmt: skip
    ids = [answer["task_id"] for answer in answers]
    running = Task.objects.filter(pk__in=ids, status="running")
    wait_until(lambda: running.count() == TASKS, timeout=120)
    streams = [{"url": answers[n % TASKS]["stream_url"], "expected": None}
               for n in range(STREAMS)]  # fmt: skip
    rss_before = bench.rss()
    clients = bench.clients(streams, deadline_seconds=count / RATE + 120)
    opened = clients.opened()
    time.sleep(1)
    out: dict[str, Any] = {"open": opened | {"rss_before": rss_before, "rss_open": bench.rss(),
                                             "pubsub": pubsub_clients()}}  # fmt: skip
    print(f"  tasks: {out['open']}", file=sys.stderr)
    gate = redis_client()
    go_at = time.time()
    for tid in ids:
        gate.rpush(GATE + tid, "go")
    quiet = quiet_window(go_at + 1.0, bench.worker)
    flowing = bench.load.measure("tasks flowing")
    result = clients.result("tasks")
    rows = Task.objects.filter(pk__in=ids)
    # Each piece is "<seq> <time>": one space each.
    emitted = {str(task.id): task.streamed_output.count(" ") for task in rows}
    out |= flow_figures(result, quiet, flowing, [emitted[ids[n % TASKS]] for n in range(STREAMS)])
    out |= {"count_per_task": count, "emitted_per_task": sorted(set(emitted.values())),
            "task_statuses": sorted({task.status for task in rows})}  # fmt: skip
    queue(settings.TASK_QUEUE).empty()
    for process in workers:
        bench.group.stop(process)
    return out


def flow_figures(result: dict[str, Any], quiet: dict[str, Any], flowing: tuple[float, float],
                 expected: list[int]) -> dict[str, Any]:  # fmt: skip
    events = max(1, len(result["latency_ms"]))
    return {
        "quiet": window(result, *quiet["window"]) | quiet,
        "loaded": window(result, *flowing),
        "check": completeness(result, expected),
        "client_cpu_per_event_ms": 1000 * result["flow_cpu_seconds"] / events,
        "open_seconds": result["open_seconds"],
        "finished": sum(1 for stream in result["streams"] if stream[2]),
    }


PHASES = {"burst": phase_burst, "distinct": phase_distinct, "tasks": phase_tasks}


def child() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
    raise_fd_limit()
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from tasks.plumbing.queueing import queue, redis_client

    # Stopped by the orchestrator (its timeout): the processes started here stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    call_command("migrate", verbosity=0)
    redis_client().flushdb()
    phases = os.environ.get("BENCH_STREAMS_PHASES", ",".join(PHASES)).split(",")
    group = Group()
    out: dict[str, Any] = {"client": CLIENT}
    started = time.monotonic()
    try:
        bench = Bench(group, dict(os.environ))
        bench.load.measure("before")  # also warms the web process up
        for name in phases:
            queue(settings.TASK_QUEUE).empty()  # what the submits of wrk queued
            out[name] = PHASES[name](bench)
            print(f"  {name}: {out[name].get('check')}", file=sys.stderr)
        bench.load.measure("after")
        out["throughput"] = bench.load.figures
        out["web_worker_same_pid"] = web_worker(bench.web).pid == bench.worker.pid
        out["web_rss_end"] = bench.rss()
        out["seconds"] = time.monotonic() - started
        out["load_average"] = os.getloadavg()
    finally:
        group.stop_all()
    print(json.dumps(out))


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("benchmark step did not finish in time")


def quiet_window(start: float, worker: Any) -> dict[str, Any]:
    """Waits out QUIET_SECONDS from `start` (events flowing, nothing else); the web worker's
    and the machine's CPU over it."""
    import psutil

    time.sleep(max(0.0, start - time.time()))
    cpu_before = sum(worker.cpu_times()[:2])
    psutil.cpu_percent()
    time.sleep(QUIET_SECONDS)
    cpu_after = sum(worker.cpu_times()[:2])
    return {"window": [start, start + QUIET_SECONDS],
            "web_cores": (cpu_after - cpu_before) / QUIET_SECONDS,
            "machine_percent": psutil.cpu_percent()}  # fmt: skip


# --- orchestration -------------------------------------------------------------------------------


def backends(embedded_url: str, sqlite: Path) -> list[tuple[str, dict[str, str]]]:
    base = common.base_env(
        LOG_LEVEL=os.environ.get("BENCH_STREAMS_LOG_LEVEL", "WARNING"),
        WEB_CONCURRENCY="1",
        # A worker recycled mid-run would drop every open stream (and end the measurement).
        GUNICORN_MAX_REQUESTS="0",
    )
    return common.backends(
        embedded_url, sqlite, base=base, only=os.environ.get("BENCH_STREAMS_ONLY", ""),
        pg_database="taskhook_bench_streams",
        redis_url=os.environ.get("BENCH_STREAMS_REDIS_URL", "redis://127.0.0.1:6379/12"),
    )  # fmt: skip


def main() -> None:
    raise_fd_limit()
    WEB_LOG.write_bytes(b"")
    # The database is recreated by the next run, the Redis left as it is.
    common.orchestrate(
        str(Path(__file__).resolve()), "streams", backends, write_report=write_report,
        partial="BENCH_STREAMS_PHASES", timeout=900, stop_wait=60,
    )  # fmt: skip


def _ms(figures: dict[str, float]) -> str:
    return f"{figures['p50']:.1f} / {figures['p99']:.1f} / {figures['max']:.0f}"


def _check(variant: dict[str, Any]) -> str:
    check = variant["check"]
    text = f"{check['received']:,} / {check['expected']:,}; {check['complete']:,} / {STREAMS:,}"
    notes = []
    if check["short"]:
        notes.append(f"{check['short']:,} short of deltas, {check['none']:,} with none, "
                     f"{check['short_finished']:,} of them ended by `task.finished`")  # fmt: skip
    if check["order"]:
        notes.append(f"{check['order']:,} out of order or repeated")
    if check["errors"]:
        notes.append(", ".join(f"{n:,}: {why}" for why, n in check["error_reasons"].items()))
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _ratio(data: dict[str, Any], phase: str, kind: str) -> str:
    figures = data["throughput"]
    baseline = statistics.fmean([figures["before"][kind], figures["after"][kind]])
    return f"{figures[phase][kind]:.0f} ({figures[phase][kind] / baseline:.2f})"


def _per_stream_kb(opening: dict[str, Any]) -> str:
    return f"{(opening['rss_open'] - opening['rss_before']) / STREAMS / 1024:.1f}"


def _rss(opening: dict[str, Any]) -> str:
    return f"{opening['rss_before'] / 2**20:.0f} -> {opening['rss_open'] / 2**20:.0f}"


LATENCY = f"(ms; target p50 <= {TARGET_P50_MS}, p99 <= {TARGET_P99_MS})"
ROWS: list[tuple[str, Any]] = [
    (
        f"**burst**: {COLD_STREAMS} streams opened at once on a fresh web process, one event "
        "each: received within 1 s / at all",
        lambda d: f"{d['burst']['within_1s']} / {d['burst']['received']}",
    ),
    (
        "**burst**: emit -> client latency p50 / p99 / max (ms)",
        lambda d: _ms(d["burst"]["latency"]),
    ),
    (
        "**burst**: Redis pub/sub connections the web process opened, channels on them",
        lambda d: f"{d['burst']['pubsub_connections_opened']}, {d['burst']['pubsub_channels']}",
    ),
    (
        "**distinct**: streams open, seconds to open them all",
        lambda d: f"{d['distinct']['open']['opened']:,} in {d['distinct']['open_seconds']:.1f} s",
    ),
    (
        "**distinct**: deltas received / published; streams complete (every event once, in "
        "order, ids increasing)",
        lambda d: _check(d["distinct"]),
    ),
    (
        f"**distinct**: emit -> client latency p50 / p99 / max, quiet {LATENCY}",
        lambda d: _ms(d["distinct"]["quiet"]),
    ),
    (
        "**distinct**: same, while wrk submits and polls (ms)",
        lambda d: _ms(d["distinct"]["loaded"]),
    ),
    (
        "**distinct**: web process CPU, quiet (cores); whole machine (%)",
        lambda d: (
            f"{d['distinct']['quiet']['web_cores']:.2f}; "
            f"{d['distinct']['quiet']['machine_percent']:.0f}"
        ),
    ),
    ("**tasks**: deltas received / emitted; streams complete", lambda d: _check(d["tasks"])),
    (
        f"**tasks**: emit -> client latency p50 / p99 / max, quiet {LATENCY}",
        lambda d: _ms(d["tasks"]["quiet"]),
    ),
    ("**tasks**: same, while wrk submits and polls (ms)", lambda d: _ms(d["tasks"]["loaded"])),
    (
        "**tasks**: web process CPU, quiet (cores); whole machine (%)",
        lambda d: (
            f"{d['tasks']['quiet']['web_cores']:.2f}; {d['tasks']['quiet']['machine_percent']:.0f}"
        ),
    ),
    (
        f"Web worker RSS before -> with {STREAMS:,} streams open (MB): distinct / tasks",
        lambda d: f"{_rss(d['distinct']['open'])} / {_rss(d['tasks']['open'])}",
    ),
    (
        "  per open stream (KB): distinct / tasks (tasks': on memory distinct's streams freed)",
        lambda d: f"{_per_stream_kb(d['distinct']['open'])} / {_per_stream_kb(d['tasks']['open'])}",
    ),
    (
        f"Submits/s, {WRK_CLIENTS} clients, no streams: before / after",
        lambda d: (
            f"{d['throughput']['before']['submit']:.0f} / {d['throughput']['after']['submit']:.0f}"
        ),
    ),
    (
        f"  {STREAMS:,} streams open, idle (ratio to the mean of before and after; target >= 0.90)",
        lambda d: _ratio(d, "idle streams", "submit"),
    ),
    ("  distinct's events flowing (ratio)", lambda d: _ratio(d, "distinct flowing", "submit")),
    ("  tasks' events flowing (ratio)", lambda d: _ratio(d, "tasks flowing", "submit")),
    (
        f"Polls/s, {WRK_CLIENTS} clients, no streams: before / after",
        lambda d: (
            f"{d['throughput']['before']['poll']:.0f} / {d['throughput']['after']['poll']:.0f}"
        ),
    ),
    (
        f"  {STREAMS:,} streams open, idle (ratio; target >= 0.90)",
        lambda d: _ratio(d, "idle streams", "poll"),
    ),
    ("  distinct's events flowing (ratio)", lambda d: _ratio(d, "distinct flowing", "poll")),
    ("  tasks' events flowing (ratio)", lambda d: _ratio(d, "tasks flowing", "poll")),
    (
        "Web process CPU (cores) during wrk: no streams (before) / idle streams / distinct / "
        "tasks; whole machine (%) during distinct's",
        lambda d: (
            " / ".join(
                f"{d['throughput'][phase]['web_cores']:.2f}"
                for phase in ("before", "idle streams", "distinct flowing", "tasks flowing")
            )
            + f"; {d['throughput']['distinct flowing']['machine_percent']:.0f}"
        ),
    ),
    (
        "SSE client CPU per event received (ms): distinct / tasks",
        lambda d: (
            f"{d['distinct']['client_cpu_per_event_ms']:.3f} / "
            f"{d['tasks']['client_cpu_per_event_ms']:.3f}"
        ),
    ),
    (
        "Load average at the end (1 min), seconds for this backend",
        lambda d: f"{d['load_average'][0]:.1f}, {d['seconds']:.0f} s",
    ),
]


def write_report(columns: list[tuple[str, dict[str, Any]]], seconds: float) -> None:
    import django

    lines = ["| measure | " + " | ".join(name for name, _ in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]  # fmt: skip
    for label, render in ROWS:
        lines.append(f"| {label} | " + " | ".join(render(d) for _, d in columns) + " |")
    table = "\n".join(lines)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, Django {django.get_version()}")  # fmt: skip
    client = {"raw": "raw asyncio sockets (uvloop)", "httpx": "httpx + httpx-sse"}[CLIENT]
    section = "\n".join([
        f"## Live event streams ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        MARK_BEGIN,
        "",
        f"`bench/streams.py` ({machine}; {seconds:.0f} s in all): {STREAMS:,} concurrent "
        "`GET /api/tasks/{id}/events` streams on ONE web process (`WEB_CONCURRENCY=1`: gunicorn, "
        "one uvicorn worker; `GUNICORN_MAX_REQUESTS=0`, so it is not recycled mid-run). Every "
        "`task.output.delta` carries its emit time (`time.time()`), the client takes emit -> "
        f"receipt; {RATE:g} events/s per stream, {STREAMS * RATE:,.0f}/s in all. Variants:",
        "",
        f"- **distinct**: each stream follows a task of its own ({STREAMS:,} subscriptions); a "
        "publisher process writes the events through `tasks.events.stream.publish`.",
        f"- **tasks**: the streams follow {TASKS} running tasks, {STREAMS // TASKS} each, one RQ "
        "worker per task running `bench.streams.ticking_runner` (`ctx.emit`), the tasks' emits "
        "spread evenly over each interval.",
        f"- **burst**: {COLD_STREAMS} streams opened at once on a fresh web process (every client "
        "reconnecting after a deploy). The process of the other two opened one stream alone "
        "first.",
        "",
        f"Each variant has a {QUIET_SECONDS:g} s quiet window, then wrk ({WRK_CLIENTS} clients, "
        f"{WRK_SECONDS} s) submits, then polls; throughput ratios are to the mean of the same "
        "process before the streams opened and after they closed. Complete means every event "
        f"the task emitted, once, in order, ids increasing. Client: {client}, one process "
        "(httpx + httpx-sse: `BENCH_STREAMS_CLIENT=httpx`). Caveat: the clients, the publisher or "
        "workers, wrk, Redis and the database share the 2 cores with the web process (and other "
        "work on the machine, see the load average), so figures under load are conservative.",
        "",
        table,
        MARK_END,
        "",
    ])  # fmt: skip
    report = BASE_DIR / "docs" / "benchmarks.md"
    text = report.read_text() if report.exists() else "# Benchmarks\n"
    pattern = (r"\n## Live event streams \([^)\n]*\)\n" + re.escape(MARK_BEGIN) + r".*?"
               + re.escape(MARK_END) + r"\n")  # fmt: skip
    if re.search(pattern, text, flags=re.S):
        text = re.sub(pattern, lambda _: "\n" + section, text, count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    report.write_text(text)
    print(section)
    # Every figure, for a closer look than the table's.
    (BASE_DIR / "var" / "bench-streams.json").write_text(json.dumps(columns, indent=1))


if __name__ == "__main__":
    if "--client" in sys.argv:
        client_main()
    elif "--publisher" in sys.argv:
        publisher_main()
    elif "--child" in sys.argv:
        child()
    else:
        main()
