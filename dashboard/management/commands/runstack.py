"""`make run`: the whole stack in one terminal, supervised, stopped together by Ctrl-C.

Starts (1) an embedded Redis under var/ when REDIS_URL is unset or unreachable, (2) the web
server (gunicorn, or runserver with --dev), (3) task workers and callback workers (with RQ's
scheduler, which runs callback retries), and (4) the cron process for the periodic jobs.

A child that exits, for any reason, is started again after a delay of 1 s, doubling with each
exit up to 30 s, back to 1 s once it has stayed up a minute; each exit and restart is logged.
Whatever the dead child left in its process group (a work horse, RQ's scheduler process,
gunicorn's workers) is killed at once: those orphans hold the dead process's sockets, and Redis
would go on handing jobs to its blocked BLPOP that nobody reads. The embedded Redis restarts on
its own data (append-only file), so it comes back with what it held.

Every child runs in its own process group; on SIGINT/SIGTERM all groups get SIGTERM, then
SIGKILL after a grace period, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from dashboard.runtime import processes
from dashboard.runtime.embedded_redis import EmbeddedRedis, is_reachable

STOP_GRACE_SECONDS = 10
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0  # up this long, a child's next restart is again after RESTART_FIRST_SECONDS
# Each child's name, in its environment: `tests/makerun.py` tells the children apart by it.
SUPERVISED_AS_VARIABLE = "TASKHOOK_SUPERVISED_AS"


@dataclass
class Child:
    name: str
    launch: Callable[[], subprocess.Popen]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    delay: float = 0.0  # before the next restart; 0 until the first exit
    restart_at: float | None = None

    def start(self) -> None:
        self.process = self.launch()
        self.started_at = time.monotonic()
        self.restart_at = None

    def exited(self, code: int) -> float:
        """Record an exit; returns the delay before the restart."""
        up_for = time.monotonic() - self.started_at
        if self.delay == 0 or up_for >= STABLE_SECONDS:
            self.delay = RESTART_FIRST_SECONDS
        else:
            self.delay = min(self.delay * 2, RESTART_MAX_SECONDS)
        self.process = None
        self.restart_at = time.monotonic() + self.delay
        return self.delay


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
        self.children: list[Child] = []
        self.redis: EmbeddedRedis | None = None
        self.stopping = False
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        env = dict(os.environ)
        try:
            env["REDIS_URL"] = self._redis_url()
            self._start_children(env, options)
            self._print_banner(options["port"], env["REDIS_URL"])
            self._supervise()
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
        child_env = env | {SUPERVISED_AS_VARIABLE: name}
        child = Child(name, lambda: subprocess.Popen(argv, env=child_env, start_new_session=True))
        child.start()
        self.children.append(child)

    def _start_children(self, env: dict[str, str], options: dict) -> None:
        if self.redis is not None:  # started above; supervised like the others from here on
            redis = self.redis

            def launch_redis() -> subprocess.Popen:
                redis.start()
                assert redis.process is not None  # start() sets it, or raises
                return redis.process

            child = Child("redis", launch_redis, redis.process)
            child.started_at = time.monotonic()
            self.children.append(child)
        if options["dev"]:
            port = options["port"]
            self._spawn("web", processes.dev_web_argv(port), env)
        else:
            web_env = env | {"GUNICORN_BIND": f"127.0.0.1:{options['port']}"}
            self._spawn("web", processes.web_argv(), web_env)
        worker_class = env.get("RQ_WORKER_CLASS")  # the benchmarks' raw-RQ comparison
        for index in range(max(1, options["task_workers"])):
            argv = processes.worker_argv("worker", worker_class=worker_class)
            self._spawn(f"task-worker-{index + 1}", argv, env)
        for index in range(max(1, options["callback_workers"])):
            self._spawn(f"callback-worker-{index + 1}", processes.worker_argv("callbacks"), env)
        self._spawn("cron", processes.cron_argv(), env)

    def _print_banner(self, port: int, redis_url: str) -> None:
        names = ", ".join(child.name for child in self.children if child.name != "redis")
        self.stdout.write(
            f"\nTaskhook is running on http://127.0.0.1:{port}/  (redis: {redis_url})\n"
            f"processes: {names}\n\n"
            "First time? In another terminal, in this directory (README, First steps):\n"
            '  eval "$(.venv/bin/python manage.py createapplication demo --runner echo --shell)"\n'
            "  .venv/bin/python manage.py createsuperuser   # for the dashboard\n"
            "A process that exits is restarted; Ctrl-C stops everything.\n"
        )

    # --- supervise and stop -----------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        self.stopping = True

    def _supervise(self) -> None:
        while not self.stopping:
            for child in self.children:
                if self.stopping:
                    break
                if child.process is not None:
                    code = child.process.poll()
                    if code is not None:
                        _signal_group(child.process, signal.SIGKILL)  # what it left behind
                        delay = child.exited(code)
                        self.stderr.write(
                            f"{child.name} exited with code {code}; restarting in {delay:g} s."
                        )
                elif child.restart_at is not None and time.monotonic() >= child.restart_at:
                    self._restart(child)
            time.sleep(0.2)

    def _restart(self, child: Child) -> None:
        try:
            child.start()
        except Exception as error:  # the embedded Redis did not come up: try again later
            child.started_at = time.monotonic()
            delay = child.exited(-1)
            self.stderr.write(f"{child.name} could not start ({error}); retrying in {delay:g} s.")
            return
        assert child.process is not None  # start() just set it
        self.stderr.write(f"{child.name} restarted (pid {child.process.pid}).")

    def _stop_all(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Redis last, so that workers and cron can unregister on their way out.
        _stop([child for child in self.children if child.name != "redis"])
        _stop([child for child in self.children if child.name == "redis"])
        self.stdout.write("stopped.")


def _stop(children: list[Child]) -> None:
    """SIGTERM to each child's group, SIGKILL after the grace."""
    processes = [child.process for child in children if child.process is not None]
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.1, deadline - time.monotonic()))
    for process in processes:
        _signal_group(process, signal.SIGKILL)  # stragglers and their own children
        process.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
