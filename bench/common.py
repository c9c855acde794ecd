"""Helpers shared by the benchmarks: a free port, a gunicorn serving this project, a callback
receiver and queued deliveries, and the orchestration of a benchmark's backends (one child
process each, on an embedded Redis and SQLite, and PostgreSQL + Redis when configured)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dashboard.runtime.processes import web_argv

BASE_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(port: int, env: dict[str, str], workers: int | None = None) -> subprocess.Popen:
    """gunicorn with the project's config on 127.0.0.1:port, once /healthz answers; `workers`
    processes, or the config's default (what `make run` serves)."""
    if workers is not None:
        env = env | {"WEB_CONCURRENCY": str(workers)}
    server = subprocess.Popen(
        web_argv(),
        cwd=BASE_DIR,
        env=env | {"GUNICORN_BIND": f"127.0.0.1:{port}"},
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
    raise RuntimeError("gunicorn did not start")


def start_receiver(
    record: Callable[[bytes], None], answer_after: Callable[[], float] = lambda: 0.0
) -> tuple[ThreadingHTTPServer, str]:
    """A callback receiver on 127.0.0.1 (keep-alive, a thread per connection): hands each body
    to `record`, answers 204 after `answer_after()` seconds. Returns the server and its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if delay := answer_after():
                time.sleep(delay)
            record(body)
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/hook"


def queue_due_callbacks(application, hook: str, count: int) -> None:
    """`count` finished tasks with a callback to `hook` due, their first deliveries queued."""
    from tasks.delivery.callbacks import schedule_first_delivery
    from tasks.models import Task

    now = datetime.now(UTC)
    tasks = Task.objects.bulk_create(
        Task(application=application, inputs={}, status="succeeded", output={"ok": 1},
             created_at=now, started_at=now, finished_at=now, callback_url=hook,
             callback_status="pending") for _ in range(count)
    )  # fmt: skip
    for task in tasks:
        schedule_first_delivery(task_id=task.id)


def wrk(
    url: str, headers: dict[str, str], *, method: str = "GET", body: str | None = None,
    clients: int, seconds: int,
) -> float:  # fmt: skip
    """Requests/s of 2xx answers, from wrk (Debian's package: `make bench` installs it):
    `clients` connections on 2 threads for `seconds` s."""
    script = BASE_DIR / "var" / f"bench-wrk-{os.getpid()}.lua"
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    try:
        output = subprocess.run(
            ["wrk", "-t2", f"-c{clients}", f"-d{seconds}s", "-s", str(script), url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        script.unlink(missing_ok=True)
    total = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    requests_done = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    bad = int(errors.group(1)) if errors else 0
    return total * (requests_done - bad) / max(1, requests_done)


def write_report_section(title: str, section: str) -> None:
    """Put `## title` and its text into docs/benchmarks.md, in place of the previous one."""
    report = BASE_DIR / "docs" / "benchmarks.md"
    text = report.read_text() if report.exists() else "# Benchmarks\n"
    heading = f"\n## {title}\n"
    if heading in text:
        pattern = re.escape(heading) + r".*?(?=\n## |\Z)"
        text = re.sub(pattern, lambda _: "\n" + section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    report.write_text(text)


# --- orchestration: one child per backend ---------------------------------------------------------

Backends = list[tuple[str, dict[str, str]]]
Columns = list[tuple[str, dict[str, Any]]]


def base_env(**overrides: str) -> dict[str, str]:
    """This environment with the settings every benchmark's stack runs under, then `overrides`."""
    base = dict(os.environ) | {
        "DJANGO_SETTINGS_MODULE": "dashboard.runtime.settings",
        "DEBUG": "false",
        "SECURE_SSL_REDIRECT": "false",  # plain HTTP on loopback, no TLS proxy in front
        "LOG_LEVEL": "WARNING",
        "RQ_LOG_LEVEL": "ERROR",
    }
    base.update(overrides)
    base.setdefault("SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    return base


def bench_redis_url(variable: str, db: int) -> str:
    """The URL in `variable`, else database `db` of REDIS_URL's server."""
    if url := os.environ.get(variable):
        return url
    server = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    return f"{server}/{db}"


def backends(
    embedded_url: str, sqlite: Path, *, base: dict[str, str], only: str, pg_database: str,
    redis_url: str, in_use_hint: str | None = None,
) -> Backends:  # fmt: skip
    """SQLite + the embedded Redis, and PostgreSQL (database `pg_database`, recreated) + the
    Redis at `redis_url` when DATABASE_URL (or BENCH_PG_URL) names a PostgreSQL server; `only`
    ("sqlite" or "postgresql") keeps one. With `in_use_hint` (which setting picks another
    Redis), PostgreSQL is skipped when live RQ workers of something else use that Redis."""
    found = []
    if only in ("", "sqlite"):
        sqlite_env = {"DATABASE_URL": f"sqlite:///{sqlite}", "REDIS_URL": embedded_url}
        found.append(("SQLite + embedded Redis", base | sqlite_env))
    pg = os.environ.get("BENCH_PG_URL") or os.environ.get("DATABASE_URL", "")
    if only in ("", "postgresql") and pg.startswith("postgres"):
        from dashboard.runtime.embedded_redis import is_reachable

        server = pg.rsplit("/", 1)[0]
        if not is_reachable(redis_url):
            print(f"Redis {redis_url} not reachable; skipping PostgreSQL", file=sys.stderr)
        elif in_use_hint is not None and redis_in_use(redis_url):
            print(f"Redis {redis_url} has live RQ workers of something else; skipping "
                  f"PostgreSQL ({in_use_hint} picks another)", file=sys.stderr)  # fmt: skip
        elif pg_database_reset(server, pg_database, create=True):
            pg_env = {"DATABASE_URL": f"{server}/{pg_database}", "REDIS_URL": redis_url}
            found.append(("PostgreSQL + Redis", base | pg_env))
    return found


def redis_in_use(url: str) -> bool:
    """An RQ worker of someone else is alive on that database (it would take our runs)."""
    import redis

    client = redis.Redis.from_url(url)
    return any(client.exists(member) for member in client.smembers("rq:workers"))


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def pg_database_reset(server: str, name: str, *, create: bool) -> bool:
    """Drop database `name` on `server` and, with `create`, make it afresh; False (said on
    stderr) when PostgreSQL cannot be used."""
    try:
        import psycopg

        url = server.replace("postgres://", "postgresql://", 1) + "/postgres"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            if create:
                conn.execute(f"CREATE DATABASE {name}")
        return True
    except Exception as exc:
        print(f"PostgreSQL not usable ({exc}); skipping that backend", file=sys.stderr)
        return False


def orchestrate(
    script: str, name: str, find_backends: Callable[[str, Path], Backends], *,
    write_report: Callable[[Columns, float], None], partial: str, results: Path | None = None,
    pg_database: str | None = None, timeout: float = 1800, stop_wait: float = 120,
) -> None:  # fmt: skip
    """A benchmark's main: an embedded Redis and a SQLite file for the run (var/bench-`name`-*),
    `script --child` once per backend of `find_backends(embedded_url, sqlite)` (its last stdout
    line is its figures), then `write_report(columns, seconds)`, unless the variable `partial`
    is set (a partial run: figures printed, no report). With `pg_database`, PostgreSQL's Redis
    is flushed before and after its child and that database dropped after; `results` keeps
    every figure, written after each backend too so a later failure keeps the earlier ones."""
    from dashboard.runtime.embedded_redis import EmbeddedRedis

    began = time.monotonic()
    sqlite = BASE_DIR / "var" / f"bench-{name}-{os.getpid()}.sqlite3"
    embedded = EmbeddedRedis(BASE_DIR / "var" / f"bench-{name}-redis-{os.getpid()}",
                             persist=False)  # fmt: skip
    columns: Columns = []
    try:
        embedded_url = embedded.start()
        for backend, env in find_backends(embedded_url, sqlite):
            print(f"running: {backend} ...", file=sys.stderr, flush=True)
            postgresql = backend.startswith("PostgreSQL")
            if pg_database and postgresql:
                flush_redis(env["REDIS_URL"])
            child = subprocess.Popen(
                [sys.executable, script, "--child"],
                cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                stdout, _ = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.terminate()  # it stops what it started
                child.wait(stop_wait)
                raise
            finally:
                if pg_database and postgresql:
                    flush_redis(env["REDIS_URL"])
                    server = env["DATABASE_URL"].rsplit("/", 1)[0]
                    pg_database_reset(server, pg_database, create=False)
            if child.returncode != 0:
                raise SystemExit(f"{name} benchmark failed on {backend}")
            columns.append((backend, json.loads(stdout.strip().splitlines()[-1])))
            if results is not None:
                results.write_text(json.dumps(columns, indent=1))
    finally:
        embedded.stop()
        shutil.rmtree(embedded.data_dir, ignore_errors=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{sqlite}{suffix}").unlink(missing_ok=True)
    if results is not None:
        results.write_text(json.dumps(columns, indent=1))
    if partial in os.environ:
        print(json.dumps(columns, indent=1))
        return
    write_report(columns, time.monotonic() - began)


# --- the report -----------------------------------------------------------------------------------


def report_table(rows: list[tuple[str, Callable[[dict[str, Any]], str]]], columns: Columns) -> str:
    """A section's table: a column per backend, a row per label with its figure of each
    column's data."""
    lines = ["| measure | " + " | ".join(name for name, _ in columns) + " |",
             "| --- |" + " --- |" * len(columns)]  # fmt: skip
    for label, figure in rows:
        lines.append(f"| {label} | " + " | ".join(figure(d) for _, d in columns) + " |")
    return "\n".join(lines)


def machine() -> str:
    """The machine and versions a section's figures come from."""
    import django
    import rq

    return (f"{platform.machine()}, {os.cpu_count()} cores shared with other work, Python "
            f"{platform.python_version()}, Django {django.get_version()}, "
            f"RQ {rq.__version__}")  # fmt: skip


def command_line(
    *, child: Callable[[], None], main: Callable[[], None],
    write_report: Callable[[Columns, float], None], results: Path,
) -> None:  # fmt: skip
    """A benchmark script's command line: `--child` (one backend), `--report` (the section
    again from the last run's figures in `results`) or the whole run."""
    if "--child" in sys.argv:
        child()
    elif "--report" in sys.argv:
        saved = [(name, data) for name, data in json.loads(results.read_text())]
        write_report(saved, sum(data["seconds"] for _, data in saved))
    else:
        main()
