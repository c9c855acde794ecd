"""Shared fixtures: real Redis, real RQ worker processes, real HTTP receivers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client as DjangoClient
from django.test import client as test_client
from rq import Queue
from rq.registry import ScheduledJobRegistry

from dashboard.runtime.handlers import ApiMiddlewareMixin, is_api
from dashboard.runtime.processes import TASK_WORKER_CLASS, worker_argv
from tasks.applications import CreatedApplication, create_application
from tasks.models import Application, Task
from tasks.plumbing.lane_names import task_lanes
from tasks.plumbing.queueing import redis_client

BASE_DIR = Path(__file__).resolve().parent.parent
QUEUES = (*task_lanes(settings.TASK_QUEUE), settings.CALLBACK_QUEUE, settings.MAINTENANCE_QUEUE)


def test_database_url() -> str:
    """A DATABASE_URL for subprocesses that points at the test database pytest-django made."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{db['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    # The browser tests relax Django's async guard in this process only; never pass it on.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env.update(
        {
            "DEBUG": "true",
            "DATABASE_URL": test_database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "CALLBACK_ALLOW_PRIVATE_NETWORKS": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class WorkerProcess:
    """A real `manage.py rqworker` process in its own process group."""

    def __init__(
        self,
        queues: tuple[str, ...],
        *,
        name: str,
        env: dict[str, str] | None = None,
        worker_class: str = TASK_WORKER_CLASS,
    ) -> None:
        self.queues = queues
        self.log_path = BASE_DIR / "var" / f"test-{name}-{os.getpid()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            worker_argv(
                "worker", queues=queues, worker_class=worker_class, name=f"{name}-{os.getpid()}"
            ),
            env=env or subprocess_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.name = f"{name}-{os.getpid()}"

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def clean_redis() -> None:
    client = redis_client()
    for name in QUEUES:
        queue = Queue(name, connection=client)
        queue.empty()
        registry = ScheduledJobRegistry(queue=queue)
        for job_id in registry.get_job_ids():
            registry.remove(job_id, delete_job=True)
    for key in client.scan_iter("taskhook:*"):
        client.delete(key)


@pytest.fixture(scope="session")
def worker(django_db_setup, django_db_blocker) -> Iterator[WorkerProcess]:
    """One real SimpleWorker (with scheduler) on every queue, shared by the session."""
    clean_redis()
    process = WorkerProcess(QUEUES, name="worker")
    yield process
    process.stop()


@pytest.fixture
def private_queues(settings) -> Iterator[None]:
    """Queues no worker of the session listens on, so jobs stay where the code under test put
    them."""
    settings.TASK_QUEUE = "tasks-reconciler-test"
    settings.CALLBACK_QUEUE = "callbacks-reconciler-test"
    yield
    for name in (*task_lanes(settings.TASK_QUEUE), settings.CALLBACK_QUEUE):
        Queue(name, connection=redis_client()).empty()


@pytest.fixture
def live_worker(worker, transactional_db) -> WorkerProcess:
    """The shared worker, for a test whose rows it must see (committed, not in a test txn)."""
    assert worker.process.poll() is None, worker.output()[-3000:]
    clean_redis()
    return worker


class ApiClientHandler(ApiMiddlewareMixin, test_client.ClientHandler):
    """The test client's handler with the API's middleware chain."""


class ServedClientHandler(test_client.ClientHandler):
    """The test client's handler, routing /api/ through settings.API_MIDDLEWARE as
    dashboard.runtime.handlers.RoutingHandler does in production."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.api = ApiClientHandler(*args, **kwargs)

    def __call__(self, environ):
        return self.api(environ) if is_api(environ) else super().__call__(environ)


class Client(DjangoClient):
    """Django's test client, served as production serves requests (the suite's only client:
    tests/unit/test_seams.py fails on a test module that imports Django's own)."""

    def __init__(self, enforce_csrf_checks: bool = False, **defaults) -> None:
        super().__init__(enforce_csrf_checks, **defaults)
        self.handler = ServedClientHandler(enforce_csrf_checks)


@pytest.fixture
def client() -> Client:
    return Client()


@pytest.fixture
def operator() -> Client:
    """Logged in as a staff user with the `operate` permission (the dashboard's actions)."""
    user = User.objects.create_user("operator", password="pw-operator-123", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="operate"))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer() -> Client:
    """Logged in as a staff user without `operate`: it sees the dashboard, acts on nothing."""
    user = User.objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture(autouse=True)
def _private_callbacks_allowed(settings):
    # Receivers in tests listen on 127.0.0.1; the SSRF tests switch this off explicitly.
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = True


@pytest.fixture
def make_app(db) -> Callable[..., CreatedApplication]:
    """Create an application through the real service; extra keywords set model fields."""

    def make(
        runner: str = "echo",
        *,
        runner_config=None,
        retry_schedule=None,
        retention_hours: int = 24,
        **fields,
    ) -> CreatedApplication:
        created = create_application(
            name=f"app-{runner}",
            runner=runner,
            runner_config=runner_config,
            retry_schedule=retry_schedule,
            retention_hours=retention_hours,
        )
        if fields:
            Application.objects.filter(pk=created.application.pk).update(**fields)
            created.application.refresh_from_db()
        return created

    return make


def api_submit(app: CreatedApplication, body: dict) -> str:
    """Submit through the real API view (in process); returns the task id."""
    response = Client().post(
        f"/api/applications/{app.application.id}/generate",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )
    assert response.status_code == 200, response.content
    return response.json()["task_id"]


@pytest.fixture
def stack(tmp_path, settings):
    """A Redis server of the test's own, with the real processes a fault test starts on it
    (tests.stack.Stack): the reconciler every 2 s, a worker lost 3 s after its last beat."""
    from tests.stack import Stack  # it imports this module

    stack = Stack(tmp_path, RECONCILE_INTERVAL="2", WORKER_ALIVE_TTL="3")
    stack.start_redis()
    settings.REDIS_URL = stack.redis_url
    redis_client.cache_clear()
    yield stack
    stack.close()
    redis_client.cache_clear()


def wait_for(predicate: Callable[[], object], timeout: float = 20, interval: float = 0.05):
    """Poll `predicate` until truthy; returns its value or fails the test with a message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def wait_for_exit(process: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit code, or None if it is still running after `timeout` seconds (so an
    assertion on it can show the process's output rather than a bare TimeoutExpired)."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def wait_for_status(task_id, statuses: tuple[str, ...], timeout: float = 20) -> Task:
    return wait_for(
        lambda: Task.objects.filter(pk=task_id, status__in=statuses).first(), timeout=timeout
    )


# --- HTTP receivers ---------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    client_port: int = 0  # the sender's port: the same on a kept-alive connection

    def json(self):
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1. `responses` is consumed in order, then `default`."""

    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    responses: list[tuple[int, dict[str, str], bytes, float]] = field(default_factory=list)
    default: tuple[int, dict[str, str], bytes, float] = (200, {}, b"ok", 0.0)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hook"

    def respond(
        self,
        status: int,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        delay: float = 0.0,
    ) -> None:
        self.responses.append((status, headers or {}, body, delay))

    def next_response(self):
        with self.lock:
            return self.responses.pop(0) if self.responses else self.default


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            rec = holder["receiver"]
            rec.received.append(Received(self.path, dict(self.headers.items()), body, time.time(),
                                         self.client_address[1]))  # fmt: skip
            status, headers, payload, delay = rec.next_response()
            if delay:
                time.sleep(delay)
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder["receiver"] = Receiver(server=server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder["receiver"]
    server.shutdown()
    server.server_close()


# --- raw-socket receivers, for receivers that misbehave below HTTP ------------------------


class RawReceiver:
    """A TCP server on `host`: `handle(connection)` runs in a thread per accepted connection."""

    def __init__(self, handle: Callable[[socket.socket], None], host: str = "127.0.0.1",
                 port: int = 0) -> None:  # fmt: skip
        self.handle = handle
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()[:2]
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            self.handle(conn)

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def raw_receiver() -> Iterator[Callable[..., RawReceiver]]:
    started: list[RawReceiver] = []

    def start(handle, **kwargs) -> RawReceiver:
        started.append(RawReceiver(handle, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def read_request(conn: socket.socket) -> bytes:
    """The request's head and body (Content-Length), as a receiver reads it."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


# --- test layers: fast in-process tests first, then real processes, then the browser ----------

# Modules whose every test starts real processes (stacks, supervisors, make run, deployments).
PROCESS_MODULES = frozenset({
    "test_supervisor", "test_faults", "test_deployment", "test_first_steps", "test_openapi",
    "test_delivery_isolation",
})  # fmt: skip
# Fixtures that start (or hand out) a real RQ worker process.
PROCESS_FIXTURES = frozenset({"worker", "live_worker"})
# In other modules, a test whose own source starts a process is marked too.
_STARTS_PROCESS = re.compile(
    r"subprocess\.(?:Popen|run|call|check_call|check_output)\(|\bStack\(|\bWorkerProcess\("
    r"|\bgunicorn\(|\bMakeRun\(|\bEmbeddedRedis\("
)
LAYERS = ("fast", "processes", "browser")


MARKERS = {
    "processes": "starts real processes (RQ workers, gunicorn, make run, redis-server)",
    "browser": "drives a real Chromium through Playwright",
}


def pytest_configure(config) -> None:
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, text in MARKERS.items():
        if name not in declared:  # pyproject.toml declares them; this keeps --strict-markers
            config.addinivalue_line("markers", f"{name}: {text}")


def _starts_processes(item) -> bool:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    if module in PROCESS_MODULES or PROCESS_FIXTURES & set(item.fixturenames):
        return True
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function else ""
    except (OSError, TypeError):
        source = ""
    return bool(_STARTS_PROCESS.search(source))


def layer_of(item) -> str:
    """The layer a collected test runs in: "fast", "processes" or "browser"."""
    if item.get_closest_marker("browser"):
        return "browser"
    return "processes" if item.get_closest_marker("processes") else "fast"


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that starts real processes `processes`, then run the fast ones first,
    then `processes`, then `browser`, each group in collection order (a stable sort).

    Deliberately neither tryfirst nor trylast: pytest-django's own reordering (tryfirst) has
    run by now and is kept inside each group, and `-m` deselection (pytest's mark plugin,
    registered before any conftest) runs after this and so sees the markers added here."""
    for item in items:
        if _starts_processes(item) and not item.get_closest_marker("processes"):
            item.add_marker(pytest.mark.processes)
    items.sort(key=lambda item: LAYERS.index(layer_of(item)))
