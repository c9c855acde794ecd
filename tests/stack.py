"""A whole Taskhook deployment in real processes, for fault-injection tests: a Redis server the
test controls, gunicorn, RQ workers and the cron process, all on the test database."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import requests

from dashboard.runtime.embedded_redis import EmbeddedRedis
from dashboard.runtime.processes import TASK_WORKER_CLASS, cron_argv, web_argv
from tests.conftest import BASE_DIR, WorkerProcess, subprocess_env, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.tmp_path = tmp_path
        self.redis_port = free_port()
        self.redis: EmbeddedRedis | None = None
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = subprocess_env(REDIS_URL=self.redis_url, CLEANUP_INTERVAL="3600", **env)
        self.web: subprocess.Popen | None = None
        self.web_port = free_port()
        self.workers: list[WorkerProcess] = []
        self.cron: subprocess.Popen | None = None
        self._generation = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    # --- Redis -----------------------------------------------------------------------------

    def start_redis(self) -> None:
        """A fresh, empty Redis on the stack's port (as after a Redis restart without data)."""
        self._generation += 1
        data_dir = self.tmp_path / f"redis-{self._generation}"
        self.redis = EmbeddedRedis(data_dir, port=self.redis_port, persist=False)
        self.redis.start()

    def kill_redis(self) -> None:
        if self.redis and self.redis.process:
            self.redis.process.kill()
            self.redis.process.wait()
            shutil.rmtree(self.redis.data_dir, ignore_errors=True)

    # --- processes ---------------------------------------------------------------------------

    def start_web(self, workers: int = 2, **env: str) -> None:
        log = (self.tmp_path / "web.log").open("ab")
        self.web = subprocess.Popen(
            web_argv(),
            cwd=BASE_DIR,
            env=self.env
            | {"GUNICORN_BIND": f"127.0.0.1:{self.web_port}", "WEB_CONCURRENCY": str(workers)}
            | env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for(self._web_up, timeout=30, interval=0.1)

    def _web_up(self) -> bool:
        try:
            return requests.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def kill_web(self) -> None:
        if self.web and self.web.poll() is None:
            os.killpg(self.web.pid, signal.SIGKILL)
            self.web.wait()

    def start_worker(
        self,
        name: str,
        queues: tuple[str, ...],
        worker_class: str = TASK_WORKER_CLASS,
        **env: str,
    ) -> WorkerProcess:
        worker = WorkerProcess(queues, name=f"{name}-{len(self.workers)}", env=self.env | env,
                               worker_class=worker_class)  # fmt: skip
        self.workers.append(worker)
        return worker

    def start_cron(self) -> None:
        self.cron = subprocess.Popen(
            cron_argv(),
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def ensure_running(self) -> None:
        """What a process supervisor does: restart any worker or cron process that exited."""
        for index, worker in enumerate(self.workers):
            if worker.process.poll() is not None:
                self.workers[index] = WorkerProcess(
                    worker.queues, name=f"restarted-{index}-{time.time_ns()}", env=self.env
                )
        if self.cron and self.cron.poll() is not None:
            self.start_cron()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(signal.SIGKILL)
        if self.cron and self.cron.poll() is None:
            os.killpg(self.cron.pid, signal.SIGKILL)
            self.cron.wait()
        self.kill_web()
        if self.redis:
            self.redis.stop()


class RedisCut:
    """A TCP relay in front of the test Redis (TCP or unix socket) that a test can cut: every
    relayed connection is closed, and new ones are closed as soon as they are accepted, until
    it is mended. What a network partition or a Redis failover does to one process."""

    def __init__(self, upstream_url: str) -> None:
        import redis.connection

        self.upstream = redis.connection.parse_url(upstream_url)
        self.port = free_port()
        self.cut = False
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.upstream.get('db', 0)}"

    def _connect_upstream(self) -> socket.socket:
        if "path" in self.upstream:
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.upstream["path"])
            return upstream
        return socket.create_connection((self.upstream["host"], self.upstream["port"]))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self.cut:
                client.close()
                continue
            upstream = self._connect_upstream()
            with self._lock:
                self._sockets |= {client, upstream}
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(source, target), daemon=True).start()

    def _relay(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        self.cut = True
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for end in sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def mend(self) -> None:
        self.cut = False

    def close(self) -> None:
        self.sever()
        self._listener.close()
