"""`make run`: the whole stack in one terminal, stopped together by Ctrl-C.

Starts (1) an embedded Redis under var/ when REDIS_URL is unset or unreachable, (2) the web
server (gunicorn, or runserver with --dev), (3) task workers and callback workers (with RQ's
scheduler, which runs callback retries), and (4) the RQ cron process for the periodic jobs.
Every child runs in its own process group; on SIGINT/SIGTERM, or when any child dies, all groups
get SIGTERM, then SIGKILL after a grace period, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from dashboard.embedded_redis import EmbeddedRedis, is_reachable

STOP_GRACE_SECONDS = 10


class Command(BaseCommand):
    help = "Run web, workers, scheduler, periodic jobs and (if needed) an embedded Redis."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
        parser.add_argument("--dev", action="store_true", help="runserver with autoreload")
        parser.add_argument(
            "--task-workers", type=int, default=int(os.environ.get("TASK_WORKERS", 2))
        )
        parser.add_argument(
            "--callback-workers", type=int, default=int(os.environ.get("CALLBACK_WORKERS", 2))
        )

    def handle(self, *args, **options):
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.redis: EmbeddedRedis | None = None
        self.stopping = False
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        env = dict(os.environ)
        try:
            env["REDIS_URL"] = self._redis_url()
            self._start_children(env, options)
            self._print_banner(options["port"], env["REDIS_URL"])
            self._watch()
        finally:
            self._stop_all()

    # --- start ------------------------------------------------------------------------------

    def _redis_url(self) -> str:
        configured = os.environ.get("REDIS_URL")
        if configured and is_reachable(configured):
            return configured
        if configured:
            self.stderr.write(f"REDIS_URL {configured} is not reachable; using an embedded Redis.")
        socket = Path(settings.EMBEDDED_REDIS_SOCKET)
        if is_reachable(f"unix://{socket}"):
            return f"unix://{socket}"  # another `make run` in this clone already started it
        self.redis = EmbeddedRedis(socket.parent)
        url = self.redis.start()
        self.stdout.write(f"embedded redis on {url} (data in {socket.parent})")
        return url

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        process = subprocess.Popen(argv, env=env, start_new_session=True)
        self.children.append((name, process))

    def _start_children(self, env: dict[str, str], options: dict) -> None:
        manage = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py")]
        port = options["port"]
        if options["dev"]:
            self._spawn("web", [*manage, "runserver", f"127.0.0.1:{port}"], env)
        else:
            web_env = env | {"GUNICORN_BIND": f"127.0.0.1:{port}"}
            self._spawn(
                "web",
                [sys.executable, "-m", "gunicorn", "dashboard.wsgi",
                 "-c", str(Path(settings.BASE_DIR) / "dashboard" / "gunicorn.conf.py")],
                web_env,
            )  # fmt: skip
        worker_class = env.get("RQ_WORKER_CLASS", "tasks.worker.TaskhookWorker")
        for index in range(max(1, options["task_workers"])):
            self._spawn(
                f"task-worker-{index + 1}",
                [*manage, "rqworker", settings.TASK_QUEUE, settings.MAINTENANCE_QUEUE,
                 "--worker-class", worker_class, "--with-scheduler"],
                env,
            )  # fmt: skip
        for index in range(max(1, options["callback_workers"])):
            self._spawn(
                f"callback-worker-{index + 1}",
                [*manage, "rqworker", settings.CALLBACK_QUEUE, settings.MAINTENANCE_QUEUE,
                 "--worker-class", "tasks.worker.TaskhookDeliveryWorker", "--with-scheduler"],
                env,
            )  # fmt: skip
        self._spawn("cron", [*manage, "rqcron", "tasks.cron"], env)

    def _print_banner(self, port: int, redis_url: str) -> None:
        names = ", ".join(name for name, _ in self.children)
        self.stdout.write(
            f"\nTaskhook is running on http://127.0.0.1:{port}/  (redis: {redis_url})\n"
            f"processes: {names}\n\n"
            "First time? In another terminal:\n"
            "  .venv/bin/python manage.py createapplication demo --runner echo\n"
            "  .venv/bin/python manage.py createsuperuser\n"
            "Ctrl-C stops everything.\n"
        )

    # --- watch and stop -----------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        self.stopping = True

    def _watch(self) -> None:
        while not self.stopping:
            for name, process in self.children:
                code = process.poll()
                if code is not None:
                    self.stderr.write(f"{name} exited with code {code}; stopping everything.")
                    self.stopping = True
                    break
            time.sleep(0.2)

    def _stop_all(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for _, process in self.children:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for _, process in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for _, process in self.children:
            _signal_group(process, signal.SIGKILL)  # stragglers and their own children
            process.wait()
        if self.redis:
            self.redis.stop()
        self.stdout.write("stopped.")


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
