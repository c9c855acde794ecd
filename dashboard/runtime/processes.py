"""How each Taskhook process is started, written once.

The Procfile, `make run` (the runstack supervisor), the test suite, the benchmarks and the
dashboard's "no worker" hint all take their command lines from here; a test checks that the
Procfile is exactly `render_procfile()`. Queue names are the settings' (TASK_QUEUE, ...), which
are fixed names, so the Procfile can spell them out.

Run `python -m dashboard.runtime.processes` to print the Procfile.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TypedDict

from tasks.plumbing.lane_names import task_lanes

BASE_DIR = Path(__file__).resolve().parents[2]

TASK_QUEUE = "tasks"
CALLBACK_QUEUE = "callbacks"
MAINTENANCE_QUEUE = "maintenance"


TASK_WORKER_CLASS = "tasks.execution.worker.TaskhookWorker"
DELIVERY_WORKER_CLASS = "tasks.execution.worker.TaskhookDeliveryWorker"
WEB_APPLICATION = "dashboard.runtime.asgi"
GUNICORN_CONFIG = "dashboard/runtime/gunicorn.conf.py"
CRON_CONFIG = "tasks.upkeep.cron"

# Procfile process name -> the queues its workers listen on, in the order a worker takes jobs
# (the maintenance queue on both, so periodic jobs run wherever there is a worker).
WORKER_QUEUES = {
    "worker": (*task_lanes(TASK_QUEUE), MAINTENANCE_QUEUE),
    "callbacks": (CALLBACK_QUEUE, MAINTENANCE_QUEUE),
}
WORKER_CLASSES = {"worker": TASK_WORKER_CLASS, "callbacks": DELIVERY_WORKER_CLASS}


def manage_argv(python: str = sys.executable, *, absolute: bool = True) -> list[str]:
    return [python, str(BASE_DIR / "manage.py") if absolute else "manage.py"]


def web_argv(python: str = sys.executable, *, absolute: bool = True) -> list[str]:
    """gunicorn with the project's config (bind address and sizes from the environment)."""
    config = str(BASE_DIR / GUNICORN_CONFIG) if absolute else GUNICORN_CONFIG
    return [python, "-m", "gunicorn", WEB_APPLICATION, "-c", config]


def dev_web_argv(port: int, python: str = sys.executable) -> list[str]:
    """uvicorn alone, reloading on code changes (`make dev`)."""
    return [python, "-m", "uvicorn", f"{WEB_APPLICATION}:application", "--reload",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip


def worker_argv(
    kind: str,
    python: str = sys.executable,
    *,
    absolute: bool = True,
    queues: tuple[str, ...] | None = None,
    worker_class: str | None = None,
    name: str | None = None,
) -> list[str]:
    """An RQ worker of `kind` ("worker" runs tasks, "callbacks" delivers), with RQ's scheduler
    (which enqueues callback retries when they are due)."""
    argv = [
        *manage_argv(python, absolute=absolute),
        "rqworker",
        *(queues or WORKER_QUEUES[kind]),
        "--with-scheduler",
        "--worker-class",
        worker_class or WORKER_CLASSES[kind],
    ]
    if name:
        argv += ["--name", name]
    return argv


def cron_argv(python: str = sys.executable, *, absolute: bool = True) -> list[str]:
    """RQ's cron scheduler for the periodic jobs (reconcile, cleanup, queue-depth samples)."""
    return [*manage_argv(python, absolute=absolute), "taskhookcron", CRON_CONFIG]


def release_argv(python: str = sys.executable, *, absolute: bool = True) -> list[str]:
    return [*manage_argv(python, absolute=absolute), "migrate", "--noinput"]


class _ArgvOptions(TypedDict):
    python: str
    absolute: bool


def procfile_commands() -> dict[str, list[str]]:
    """The Procfile's processes as a platform runs them: `python` and paths relative to the
    project root."""
    relative: _ArgvOptions = {"python": "python", "absolute": False}
    web = web_argv(**relative)
    return {
        "release": release_argv(**relative),
        "web": ["gunicorn", *web[3:]],
        "worker": worker_argv("worker", **relative),
        "callbacks": worker_argv("callbacks", **relative),
        "cron": cron_argv(**relative),
    }


def render_procfile() -> str:
    return "".join(f"{name}: {' '.join(argv)}\n" for name, argv in procfile_commands().items())


if __name__ == "__main__":
    sys.stdout.write(render_procfile())
