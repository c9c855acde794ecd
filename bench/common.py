"""Helpers shared by the benchmarks: a free port and a gunicorn serving this project."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(port: int, env: dict[str, str], workers: int = 2) -> subprocess.Popen:
    """gunicorn with the project's config on 127.0.0.1:port, once /healthz answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "dashboard.wsgi", "-c",
         str(BASE_DIR / "dashboard" / "gunicorn.conf.py")],
        cwd=BASE_DIR,
        env=env | {"GUNICORN_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(workers)},
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
