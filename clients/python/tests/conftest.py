"""A live Taskhook stack for the client's tests: `manage.py runstack` (what `make run` starts:
gunicorn with uvicorn workers, task and callback workers, cron, Redis) on a free port.

The server checkout is `TASKHOOK_ROOT` (default: the repository this package lives in) and its
Python `TASKHOOK_PYTHON` (default: its `.venv`). By default the stack gets a SQLite file and an
embedded Redis of its own under pytest's tmp directory. `TASKHOOK_TEST_DATABASE_URL` and
`TASKHOOK_TEST_REDIS_URL` point it at a database (already created) and a Redis db instead: the
main suite's tests/test_python_client.py passes its test database that way, on SQLite and on
PostgreSQL.

Also here: a webhook receiver (a real HTTP server on 127.0.0.1 that records each request) and a
TCP relay whose connections a test can cut, to prove that streams resume.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

ROOT = Path(os.environ.get("TASKHOOK_ROOT") or Path(__file__).resolve().parents[3])
PYTHON = os.environ.get("TASKHOOK_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
# What the stack must not inherit from the shell (the caller's database, Redis, ports, the
# main suite's settings module): it gets exactly what `stack_env` sets.
DROPPED = (
    "DATABASE_URL", "REDIS_URL", "TEST_DATABASE_NAME", "DJANGO_SETTINGS_MODULE", "PORT",
    "WEB_CONCURRENCY", "GUNICORN_BIND", "GUNICORN_THREADS", "TASK_WORKERS", "CALLBACK_WORKERS",
    "EMBEDDED_REDIS_SOCKET", "PYTHONPATH", "DJANGO_ALLOW_ASYNC_UNSAFE", "PYTEST_ADDOPTS",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Application:
    app_id: str
    api_key: str
    webhook_secret: str


@dataclass
class LiveStack:
    base_url: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [PYTHON, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)}: {done.stderr}{done.stdout}")
        return done.stdout

    def create_application(self, *flags: str, runner: str = "echo") -> Application:
        name = f"client-{time.time_ns()}"
        created = json.loads(self.manage("createapplication", name, "--runner", runner,
                                          *flags, "--json"))  # fmt: skip
        return Application(created["app_id"], created["api_key"], created["webhook_secret"])

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "manage.py", "runstack", "--port", self.base_url.rsplit(":", 1)[1],
                 "--task-workers", "2", "--callback-workers", "1"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"runstack exited:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    self._remember()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the stack was not ready within 90 s:\n{self.log()[-4000:]}")

    def _remember(self) -> None:
        assert self.process is not None
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def stop(self) -> None:
        """SIGTERM to runstack (it stops its children), then kill whatever is left."""
        if self.process is None:
            return
        self._remember()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for child in self.seen.values():
            try:
                if child.is_running():
                    child.kill()
            except psutil.Error:
                pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stack_env(tmp: Path, port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in DROPPED}
    env |= {
        "DEBUG": "true",
        "CALLBACK_ALLOW_PRIVATE_NETWORKS": "true",  # the receivers below are on 127.0.0.1
        "PYTHONUNBUFFERED": "1",
        "WEB_CONCURRENCY": "2",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "CLEANUP_INTERVAL": "3600",
    }
    database = os.environ.get("TASKHOOK_TEST_DATABASE_URL")
    env["DATABASE_URL"] = database or f"sqlite:///{tmp / 'taskhook.sqlite3'}"
    redis = os.environ.get("TASKHOOK_TEST_REDIS_URL")
    if redis:
        env["REDIS_URL"] = redis
    else:  # runstack starts an embedded Redis on this socket; manage.py commands find it there
        env["EMBEDDED_REDIS_SOCKET"] = str(tmp / "redis" / "redis.sock")
    return env


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp("stack")
    port = free_port()
    live = LiveStack(f"http://127.0.0.1:{port}", stack_env(tmp, port), tmp / "stack.log")
    live.manage("migrate", "--noinput", "-v", "0")
    live.start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def app(stack: LiveStack) -> Application:
    """An echo application without a rate limit (the tests submit in bursts)."""
    return stack.create_application("--rate-limit", "0")


@pytest.fixture(scope="session")
def sleeper(stack: LiveStack) -> Application:
    return stack.create_application("--rate-limit", "0", runner="sleep")


# --- a webhook receiver --------------------------------------------------------------------


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTP server on 127.0.0.1 that answers 204 to every POST and keeps what came."""

    def __init__(self) -> None:
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        received = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                received.put(Delivery(self.path, dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/taskhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next(self, timeout: float = 30) -> Delivery:
        return self.deliveries.get(timeout=timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


# --- a TCP relay that can be cut -----------------------------------------------------------


class Relay:
    """Forwards 127.0.0.1:<port> to the stack; `cut()` closes every open connection (a network
    fault under a stream). Keeps the first bytes of each request to show what was sent."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.open += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, request: bool) -> None:
        first = True
        try:
            while chunk := source.recv(65536):
                if request and first:
                    with self.lock:
                        self.requests.append(chunk)
                    first = False
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self.lock:
            sockets, self.open = self.open, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def relay(stack: LiveStack) -> Iterator[Relay]:
    proxy = Relay(int(stack.base_url.rsplit(":", 1)[1]))
    try:
        yield proxy
    finally:
        proxy.close()
