"""Management commands, settings safety, and `make run`'s stack as a user starts it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from io import StringIO

import psutil
import pytest
import requests
from django.core.management import CommandError, call_command
from django.db import connection

from tasks.credentials import authenticate, hash_api_key
from tasks.models import ApiKey, Application, CallbackAttempt, Task
from tests.conftest import BASE_DIR, subprocess_env, wait_for


@pytest.mark.django_db
def test_createapplication_json_prints_exactly_the_three_keys():
    out = StringIO()
    call_command(
        "createapplication",
        "support-bot",
        "--runner",
        "http",
        "--runner-config",
        '{"url": "http://127.0.0.1:9/llm"}',
        "--retry-schedule",
        "5,30",
        "--retention-hours",
        "72",
        "--json",
        stdout=out,
    )
    values = json.loads(out.getvalue())
    assert set(values) == {"app_id", "api_key", "webhook_secret"}
    app = Application.objects.get(pk=values["app_id"])
    assert (app.runner, app.runner_config, app.retry_schedule, app.retention_hours) == (
        "http",
        {"url": "http://127.0.0.1:9/llm"},
        [5, 30],
        72,
    )
    assert values["webhook_secret"].startswith("whsec_")
    # Only the hash is stored, and the key authenticates.
    key = ApiKey.objects.get(application=app)
    assert key.key_hash == hash_api_key(values["api_key"]) and values["api_key"] not in key.key_hash
    assert authenticate(values["api_key"]).application_id == app.id


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args",
    [
        ["x", "--runner", "nope"],
        ["x", "--runner", "echo", "--runner-config", "{bad"],
        ["x", "--runner", "echo", "--retry-schedule", "10,abc"],
        ["x", "--runner", "echo", "--retention-hours", "0"],
    ],
)
def test_createapplication_rejects_bad_input(args):
    with pytest.raises(CommandError):
        call_command("createapplication", *args, stdout=StringIO())
    assert Application.objects.count() == 0


def test_production_settings_refuse_to_start_without_secret_key():
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY",)}
    env.update(DEBUG="false", DJANGO_SETTINGS_MODULE="dashboard.settings")
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_make_run_stack_serves_a_task_and_stops_cleanly(make_app, tmp_path):
    """What `make run` starts: gunicorn, workers, scheduler, cron and an embedded Redis."""
    app = make_app("echo")
    port = free_port()
    env = subprocess_env(
        REDIS_URL="",  # as on a fresh clone: the stack starts its own embedded Redis
        EMBEDDED_REDIS_SOCKET=str(tmp_path / "redis.sock"),
        PORT=str(port),
        TASK_WORKERS="1",
        CALLBACK_WORKERS="1",
    )
    # `make run` itself, as a user types it (the venv exists: make test built it).
    stack = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"PORT={port}"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/healthz"), timeout=30, interval=0.2)
        payload = {
            "inputs": {"query": "如何申请退款?"},
            "response_mode": "async",
            "user": "customer_007",
        }
        response = requests.post(
            f"{base}/api/applications/{app.application.id}/generate",
            headers={"Authorization": f"Bearer {app.api_key}", "Content-Type": "application/json"},
            data=json.dumps(payload),
            timeout=10,
        )
        assert response.status_code == 200
        task_id = response.json()["task_id"]

        def succeeded():
            poll = requests.get(
                f"{base}/api/tasks/{task_id}",
                headers={"Authorization": f"Bearer {app.api_key}"},
                timeout=5,
            )
            return poll.json()["status"] == "succeeded" and poll.json()

        body = wait_for(succeeded, timeout=30, interval=0.2)
        assert body["output"] == {"query": "如何申请退款?"}
        descendants = psutil.Process(stack.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in descendants)
        assert "gunicorn" in names and "rqworker" in names and "rqcron" in names
        assert "redis-server" in names
    finally:
        descendants = psutil.Process(stack.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stack.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        output = stack.communicate(timeout=60)[0].decode(errors="replace")
    assert "stopped." in output, output[-3000:]
    assert "createapplication" in output  # first-run hints
    time.sleep(0.5)
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"


def _get(url: str):
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.django_db
def test_rotatesecret_prints_the_new_secret_once(make_app):
    app = make_app("echo")
    out, err = StringIO(), StringIO()
    call_command("rotatesecret", str(app.application.id), "--grace-hours", "2",
                 stdout=out, stderr=err)  # fmt: skip
    new_secret = out.getvalue().strip()
    app.application.refresh_from_db()
    assert new_secret.startswith("whsec_") and app.application.webhook_secret == new_secret
    assert app.application.previous_webhook_secret == app.webhook_secret
    assert "2 h" in err.getvalue()
    for bad in ("not-a-uuid", "7f2c6a8e-0000-4000-8000-000000000000"):
        with pytest.raises(CommandError):
            call_command("rotatesecret", bad, stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db
def test_seed_tasks_bulk_loads_tasks_with_attempts_and_leaves_planner_statistics():
    call_command("seed_tasks", "300", "--apps", "2", "--days", "1", stdout=StringIO())
    assert Task.objects.count() == 300
    assert Task.objects.values("application").distinct().count() == 2
    with_callback = Task.objects.exclude(callback_url="").count()
    assert CallbackAttempt.objects.count() == with_callback > 0
    # ANALYZE ran: a benchmark right after the seed is planned against the rows it loaded.
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT reltuples FROM pg_class WHERE relname = %s",
                           [Task._meta.db_table])  # fmt: skip
            assert cursor.fetchone()[0] == 300
        else:
            cursor.execute("SELECT count(*) FROM sqlite_stat1 WHERE tbl = %s",
                           [Task._meta.db_table])  # fmt: skip
            assert cursor.fetchone()[0] > 0
