"""`make run` itself, in a copy of the project tree, for tests of what a user actually runs.

    run = MakeRun(tmp_path, env={"CALLBACK_ALLOW_PRIVATE_NETWORKS": "true"})
    run.start()
    run.wait_ready()
    app = json.loads(run.manage("createapplication", "demo", "--runner", "echo", "--json").stdout)
    ...
    run.stop()  # SIGINT, as Ctrl-C; asserts nothing it started is left

The copy has the files git would commit (tracked, and untracked but not ignored) with their
mtimes, and `.venv` symlinked to this tree's, so make finds its install stamp newer than
pyproject.toml and installs nothing. SQLite, the embedded Redis and every log live under the
copy's `var/`, so the run shares nothing with this checkout or with the test database.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import requests

SOURCE = Path(__file__).resolve().parent.parent

# Everything Taskhook reads from the environment (settings, gunicorn.conf.py, runstack, …): the
# run must see only what the test passes, as in a fresh shell. Found in the source, so that a
# setting added tomorrow is dropped too; the list covers what the patterns cannot see.
ENV_READ = re.compile(
    r"""(?:env\.\w+|environ\.get|getenv|setdefault)\(\s*["']([A-Z][A-Z0-9_]+)["']"""
    r"""|environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]"""
)
ALWAYS_DROPPED = frozenset(
    {
        "DATABASE_URL", "REDIS_URL", "DJANGO_ALLOW_ASYNC_UNSAFE", "DJANGO_SETTINGS_MODULE",
        "TEST_DATABASE_NAME", "RQ_WORKER_CLASS", "TASK_WORKERS", "CALLBACK_WORKERS", "PORT",
        "WEB_CONCURRENCY", "GUNICORN_BIND", "GUNICORN_THREADS",
        # Not Taskhook's, but they would change what runs: PYTHONPATH could import this
        # checkout instead of the copy; MAKEFLAGS/MAKELEVEL make the inner make a sub-make.
        "PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL",
    }
)  # fmt: skip


def taskhook_variables(source: Path = SOURCE) -> frozenset[str]:
    found = set(ALWAYS_DROPPED)
    for folder in ("dashboard", "tasks"):
        for path in (source / folder).rglob("*.py"):
            for match in ENV_READ.finditer(path.read_text(errors="replace")):
                found.add(match.group(1) or match.group(2))
    return frozenset(found)


# runstack names each child in its environment (see runstack.SUPERVISED_AS_VARIABLE).
SUPERVISED_AS = "TASKHOOK_SUPERVISED_AS"
STOP_TIMEOUT = 40  # runstack's own grace is 10 s per signal round; make waits for it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment without anything Taskhook reads, plus `extra`."""
    dropped = taskhook_variables()
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PYTHONUNBUFFERED"] = "1"  # the log shows each line as it happens
    env.update(extra or {})
    return env


def copy_tree(source: Path, target: Path) -> None:
    """What git would commit, with mtimes (cp -p), and `.venv` symlinked to the original."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=source, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    target.mkdir(parents=True, exist_ok=True)
    for relative in filter(None, listed):
        if relative == ".venv":
            continue  # a symlinked venv (`.venv/` in .gitignore matches only a directory)
        origin = source / relative
        if not origin.exists() and not origin.is_symlink():
            continue  # deleted in the working tree, still in the index
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, destination, follow_symlinks=False)
    (target / ".venv").symlink_to(source / ".venv", target_is_directory=True)


class MakeRun:
    """`make run PORT=<free port>` in a copy of the tree, in its own process group."""

    def __init__(self, tmp_path: Path, env: dict | None = None) -> None:
        self.root = Path(tmp_path) / "taskhook"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = clean_env(env)
        self.log_path = Path(tmp_path) / "make-run.log"
        self.process: subprocess.Popen | None = None
        self._seen: dict[int, psutil.Process] = {}  # every process of the run ever observed
        copy_tree(SOURCE, self.root)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        assert self.process is None, "already started"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                # The venv is the original's, symlinked: never reinstall it from this copy
                # (a pyproject.toml newer than its stamp would point it here, then vanish).
                ["make", "-o", ".venv/.installed", "run", f"PORT={self.port}"],
                cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, process_group=0,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /healthz and /readyz answer 200; fails early (with the log) if make exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None, "not started"
            if self.process.poll() is not None:
                raise AssertionError(
                    f"make run exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            if self._ok("/healthz") and self._ok("/readyz"):
                return
            time.sleep(0.2)
        raise AssertionError(f"make run not ready within {timeout} s:\n{self.log()[-4000:]}")

    def _ok(self, path: str) -> bool:
        try:
            return requests.get(self.base_url + path, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """SIGINT to make's process group (what Ctrl-C does), wait, and assert nothing is left:
        no process of the group, of the tree seen, or running from the copy."""
        if self.process is not None and self.process.poll() is None:
            self._remember(self._tree())
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        left = self._leftovers()
        for process in left:  # never leak processes into the next test, even when failing
            with contextlib.suppress(psutil.Error):
                process.kill()
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"make run did not stop on SIGINT:\n{self.log()[-4000:]}")
        assert not left, f"left behind: {[_describe(p) for p in left]}\n{self.log()[-4000:]}"

    # --- inspection ---------------------------------------------------------------------------

    def supervisor(self) -> psutil.Process:
        """The `manage.py runstack` process under make."""
        for process in self._tree():
            if "runstack" in _cmdline(process):
                return process
        raise AssertionError(f"no runstack process under make:\n{self.log()[-4000:]}")

    def children(self) -> dict[str, psutil.Process]:
        """The supervisor's direct children by name: web, task-worker-N, callback-worker-N,
        cron and (when runstack started one) redis."""
        found: dict[str, psutil.Process] = {}
        unnamed: list[tuple[str, psutil.Process]] = []
        for process in self.supervisor().children():
            try:
                kind = _kind(process)
                name = process.environ().get(SUPERVISED_AS) if kind != "redis" else "redis"
            except psutil.Error:
                continue  # exited while we looked
            if kind is None:
                continue
            if name:
                found[name] = process
            else:
                unnamed.append((kind, process))
        for kind, process in sorted(unnamed, key=lambda item: item[1].create_time()):
            index = 1 + sum(1 for key in found if key.startswith(f"{kind}-"))
            found[kind if kind in ("web", "cron", "redis") else f"{kind}-{index}"] = process
        self._remember(found.values())
        return found

    def manage(
        self, *args: str, input: str | None = None, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """`.venv/bin/python manage.py ARGS` in the copy, with the run's environment."""
        return subprocess.run(
            [str(self.root / ".venv" / "bin" / "python"), "manage.py", *args],
            cwd=self.root, env=self.env | (env or {}), input=input, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- helpers ------------------------------------------------------------------------------

    def _tree(self) -> list[psutil.Process]:
        if self.process is None:
            return []
        try:
            make = psutil.Process(self.process.pid)
            return [make, *make.children(recursive=True)]
        except psutil.Error:
            return []

    def _remember(self, processes) -> None:
        for process in processes:
            self._seen.setdefault(process.pid, process)

    def _leftovers(self) -> list[psutil.Process]:
        left = {p.pid: p for p in self._seen.values() if _alive(p)}
        root = str(self.root)
        for process in psutil.process_iter():
            try:
                in_group = self.process is not None and os.getpgid(process.pid) == self.process.pid
                ours = in_group or root in _cmdline(process) or process.cwd().startswith(root)
                if ours and _alive(process) and process.pid != os.getpid():
                    left.setdefault(process.pid, process)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return list(left.values())


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _kind(process: psutil.Process) -> str | None:
    argv = process.cmdline()
    line = " ".join(argv)
    if "redis-server" in line:
        return "redis"
    if "gunicorn" in line or "runserver" in argv:
        return "web"
    if "rqworker" in argv:
        return "callback-worker" if "callbacks" in argv else "task-worker"
    if "rqcron" in argv or "taskhookcron" in argv:
        return "cron"
    return None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> str:
    return f"{process.pid} {_cmdline(process)[:200]}"
