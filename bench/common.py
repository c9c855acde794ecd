"""Helpers shared by the benchmarks: a free port, a gunicorn serving this project, a callback
receiver and queued deliveries."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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
