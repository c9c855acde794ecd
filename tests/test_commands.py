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
from datetime import timedelta
from io import StringIO

import psutil
import pytest
import requests
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from tasks.credentials import authenticate, hash_api_key
from tasks.models import ApiKey, Application, AuditEntry, CallbackAttempt, Task
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
    env.update(DEBUG="false", DJANGO_SETTINGS_MODULE="dashboard.runtime.settings")
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
        assert "gunicorn" in names and "rqworker" in names and "taskhookcron" in names
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


@pytest.mark.django_db
def test_seed_tasks_rows_read_back_as_the_dashboard_reads_them():
    """What the pages of the 10M benchmark show exists, and every row reads back through the
    ORM (the loader writes text: ids, times, JSON as each backend stores them); on PostgreSQL
    the load runs with the task indexes dropped and built again."""
    from tasks import triage
    from tasks.models import Batch, Endpoint, ErrorGroup
    from tasks.statuses import FINISHED

    call_command("seed_tasks", "6000", "--apps", "3", "--days", "2", "--batch", "1000",
                 "--defer-indexes", stdout=StringIO())  # fmt: skip
    assert Task.objects.count() == 6000
    # Old tasks are finished; only the last minutes hold pending and running ones.
    recent = timezone.now() - timedelta(minutes=11)
    unfinished = Task.objects.exclude(status__in=FINISHED)
    assert not unfinished.filter(created_at__lt=recent).exists()
    failed = Task.objects.filter(status="failed")
    assert failed.count() > 300 and not failed.filter(error_fingerprint="").exists()
    # Each failure's fingerprint is triage's for its own message, and its group exists.
    for error, fingerprint in failed.values_list("error", "error_fingerprint"):
        assert fingerprint == triage.task_error(error).fingerprint
    groups = set(ErrorGroup.objects.filter(kind="task").values_list("fingerprint", flat=True))
    assert set(failed.values_list("error_fingerprint", flat=True)) == groups
    given_up = Task.objects.filter(callback_status="failed")
    assert given_up.exists() and not given_up.filter(callback_error_fingerprint="").exists()
    # Batches: their items in index order, as many as the batch's total.
    batch = Batch.objects.order_by("-total").first()
    assert batch is not None and batch.status == "finished"
    indexes = list(Task.objects.filter(batch=batch).order_by("batch_index")
                   .values_list("batch_index", flat=True))  # fmt: skip
    assert indexes == list(range(batch.total))
    # An endpoint per application, with the attempts of its callbacks.
    assert Endpoint.objects.count() == 3
    attempt = CallbackAttempt.objects.select_related("task", "endpoint").first()
    assert attempt.endpoint.application_id == attempt.task.application_id
    assert attempt.task.callback_url.startswith(attempt.endpoint.origin.removesuffix(":443"))
    task = Task.objects.filter(status="succeeded").first()
    assert task.output == {"answer": "synthetic"} and task.inputs["query"].startswith("question")
    assert task.created_at < task.started_at < task.finished_at <= timezone.now()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s",
                           [Task._meta.db_table])  # fmt: skip
            names = {row[0] for row in cursor.fetchall()}
        assert {index.name for index in Task._meta.indexes} <= names


# --- application settings from the command line ---------------------------------------------


def _set(app_id, *args) -> str:
    out = StringIO()
    call_command("setapplication", str(app_id), *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_setapplication_changes_every_setting_of_the_form_and_bumps_updated_at(make_app):
    from dashboard.ui.forms import ApplicationForm
    from tasks.applications import SETTINGS

    app = make_app("echo")
    before = Application.objects.get(pk=app.application.id).updated_at
    out = _set(
        app.application.id,
        "--name", "renamed", "--runner", "sleep", "--runner-config", '{"k": 1}',
        "--retry-schedule", "5,50", "--callback-timeout", "2.5", "--blocking-timeout", "3",
        "--job-timeout", "120", "--task-retries", "2", "--max-concurrency", "4",
        "--queue-threshold", "60", "--run-threshold", "90", "--rate-limit", "5/7",
        "--retention-hours", "72", "--endpoint-max-in-flight", "9",
        "--default-priority", "high", "--max-concurrency-per-key", "3",
        "--max-queue-seconds", "45", "--auto-retry", "4", "--auto-retry-backoff", "2.5",
        "--signing", "both", "--circuit-failures", "5", "--disable-after-hours", "48",
    )  # fmt: skip
    row = Application.objects.get(pk=app.application.id)
    assert {name: getattr(row, name) for name in SETTINGS} == {
        "name": "renamed", "runner": "sleep", "runner_config": {"k": 1},
        "retry_schedule": [5, 50], "callback_timeout_seconds": 2.5,
        "blocking_timeout_seconds": 3.0, "job_timeout_seconds": 120, "task_retries": 2,
        "max_concurrency": 4, "queue_threshold_seconds": 60, "run_threshold_seconds": 90,
        "rate_limit_per_second": 5.0, "rate_limit_burst": 7, "retention_hours": 72,
        "endpoint_max_in_flight": 9, "default_priority": "high", "max_concurrency_per_key": 3,
        "max_queue_seconds": 45, "auto_retry": 4, "auto_retry_backoff_seconds": 2.5,
        "signing": "both", "circuit_failures": 5, "disable_after_hours": 48,
    }  # fmt: skip
    assert row.updated_at > before  # the workers' caches key on it
    assert "rate_limit             5/7" in out and "retention_hours        72 h" in out
    assert "default_priority       high" in out and "concurrency_per_key    3" in out
    assert "max_queue              45 s" in out and "auto_retry             4 retries" in out
    assert "auto_retry_backoff     2.5 s, doubling" in out
    # Every setting of the dashboard's form has a flag (the form's extra fields map to two).
    form_settings = {*ApplicationForm.Meta.fields, "retry_schedule", "retention_hours"}
    assert form_settings == set(SETTINGS)


@pytest.mark.django_db
def test_setapplication_zero_lifts_the_rate_limit_and_clears_the_cap(make_app):
    app = make_app("echo", max_concurrency=3, blocking_timeout_seconds=2)
    out = _set(app.application.id, "--rate-limit", "0", "--max-concurrency", "none",
               "--blocking-timeout", "default", "--retry-schedule", "none")  # fmt: skip
    row = Application.objects.get(pk=app.application.id)
    assert (row.rate_limit_per_second, row.rate_limit_burst) == (0, 40)  # burst unchanged
    assert (row.max_concurrency, row.blocking_timeout_seconds, row.retry_schedule) == (
        None, None, [])  # fmt: skip
    assert "0 (unlimited)" in out and "none (no cap)" in out
    _set(app.application.id, "--max-concurrency", "0")
    assert Application.objects.get(pk=app.application.id).max_concurrency is None


@pytest.mark.django_db
@pytest.mark.parametrize("clear", ["0", "none", "default", ""])
def test_setapplication_zero_or_none_clears_the_per_key_cap_and_the_queue_bound(make_app, clear):
    app = make_app("echo", max_concurrency_per_key=2, max_queue_seconds=30, auto_retry=3)
    out = _set(app.application.id, "--max-concurrency-per-key", clear,
               "--max-queue-seconds", clear, "--auto-retry", "0")  # fmt: skip
    row = Application.objects.get(pk=app.application.id)
    assert (row.max_concurrency_per_key, row.max_queue_seconds, row.auto_retry) == (None, None, 0)
    assert "concurrency_per_key    none (no cap)" in out
    assert "max_queue              none (no bound)" in out
    assert "auto_retry             0 (off)" in out
    entry = AuditEntry.objects.get(action="application.update")
    assert entry.detail == {"changes": {"max_concurrency_per_key": [2, None],
                                        "max_queue_seconds": [30, None],
                                        "auto_retry": [3, 0]}}  # fmt: skip


@pytest.mark.django_db
def test_setapplication_without_flags_prints_and_changes_nothing(make_app):
    app = make_app("echo")
    before = Application.objects.get(pk=app.application.id).updated_at
    out = StringIO()
    call_command("setapplication", str(app.application.id), "--json", stdout=out)
    values = json.loads(out.getvalue())
    assert values["app_id"] == str(app.application.id) and values["rate_limit_per_second"] == 20
    assert values["rate_limit_burst"] == 40 and values["retry_schedule"] == [10, 60, 300]
    assert Application.objects.get(pk=app.application.id).updated_at == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--rate-limit", "-1"], "--rate-limit"),
        (["--rate-limit", "5/0"], "--rate-limit"),
        (["--rate-limit", "fast"], "--rate-limit"),
        (["--callback-timeout", "61"], "--callback-timeout"),
        (["--blocking-timeout", "0"], "--blocking-timeout"),
        (["--job-timeout", "0"], "--job-timeout"),
        (["--task-retries", "11"], "--task-retries"),
        (["--max-concurrency", "-2"], "--max-concurrency"),
        (["--queue-threshold", "soon"], "--queue-threshold"),
        (["--run-threshold", "-1"], "--run-threshold"),
        (["--retry-schedule", "10,abc"], "--retry-schedule"),
        (["--retention-hours", "9000"], "--retention-hours"),
        (["--runner", "no.such.module"], "--runner"),
        (["--runner-config", "[1, 2]"], "--runner-config"),
        (["--runner-config", "{bad"], "--runner-config"),
        (["--name", " "], "--name"),
        (["--default-priority", "urgent"], "--default-priority"),
        (["--default-priority", "HIGH"], "--default-priority"),
        (["--max-concurrency-per-key", "-1"], "--max-concurrency-per-key"),
        (["--max-concurrency-per-key", "two"], "--max-concurrency-per-key"),
        (["--max-queue-seconds", "604801"], "--max-queue-seconds"),
        (["--max-queue-seconds", "-5"], "--max-queue-seconds"),
        (["--auto-retry", "11"], "--auto-retry"),
        (["--auto-retry", "-1"], "--auto-retry"),
        (["--auto-retry-backoff", "3601"], "--auto-retry-backoff"),
        (["--auto-retry-backoff", "-0.5"], "--auto-retry-backoff"),
        (["--auto-retry-backoff", "soon"], "--auto-retry-backoff"),
    ],
)
def test_setapplication_errors_name_the_flag_and_change_nothing(make_app, args, flag):
    app = make_app("echo")
    before = Application.objects.values().get(pk=app.application.id)
    with pytest.raises(CommandError, match=f"^{flag}: "):
        _set(app.application.id, *args)
    assert Application.objects.values().get(pk=app.application.id) == before


@pytest.mark.django_db
def test_setapplication_unknown_application():
    for bad in ("not-a-uuid", "7f2c6a8e-0000-4000-8000-000000000000"):
        with pytest.raises(CommandError, match="no application"):
            _set(bad, "--rate-limit", "1")


@pytest.mark.django_db
def test_update_application_validates_as_the_model_does(make_app):
    from tasks.applications import InvalidApplication, update_application

    app = make_app("echo")
    with pytest.raises(InvalidApplication) as raised:
        update_application(application_id=app.application.id, callback_timeout_seconds=0.1)
    assert raised.value.field == "callback_timeout_seconds"
    assert "greater than or equal to 0.5" in raised.value.message  # the model's own validator
    with pytest.raises(InvalidApplication, match="not an application setting"):
        update_application(application_id=app.application.id, webhook_secret="whsec_x")
    updated = update_application(application_id=app.application.id, rate_limit_per_second="0")
    assert updated.rate_limit_per_second == 0.0


@pytest.mark.django_db
def test_createapplication_takes_the_setting_flags():
    out = StringIO()
    call_command("createapplication", "capped", "--runner", "echo", "--rate-limit", "0",
                 "--max-concurrency", "2", "--callback-timeout", "3", "--task-retries", "1",
                 "--default-priority", "low", "--max-concurrency-per-key", "1",
                 "--max-queue-seconds", "600", "--auto-retry", "2", "--auto-retry-backoff", "0",
                 "--json", stdout=out)  # fmt: skip
    app = Application.objects.get(pk=json.loads(out.getvalue())["app_id"])
    assert (app.rate_limit_per_second, app.max_concurrency, app.callback_timeout_seconds,
            app.task_retries) == (0, 2, 3.0, 1)  # fmt: skip
    assert (app.default_priority, app.max_concurrency_per_key, app.max_queue_seconds,
            app.auto_retry, app.auto_retry_backoff_seconds) == ("low", 1, 600, 2, 0.0)  # fmt: skip
    with pytest.raises(CommandError, match=r"^--max-queue-seconds: "):
        call_command("createapplication", "x", "--runner", "echo", "--max-queue-seconds",
                     "forever", stdout=StringIO())  # fmt: skip
    with pytest.raises(CommandError, match=r"^--callback-timeout: "):
        call_command("createapplication", "x", "--runner", "echo", "--callback-timeout", "0",
                     stdout=StringIO())  # fmt: skip
    with pytest.raises(CommandError, match=r"^NAME: "):
        call_command("createapplication", " ", "--runner", "echo", stdout=StringIO())
    assert Application.objects.count() == 1
    human = StringIO()
    call_command("createapplication", "shown", "--runner", "echo", stdout=human)
    assert "api_key           thk_" in human.getvalue() and "rate_limit" in human.getvalue()


@pytest.mark.django_db
def test_createapplication_shell_output_sets_the_three_variables_in_bash():
    out, err = StringIO(), StringIO()
    call_command("createapplication", "demo", "--runner", "echo", "--shell",
                 stdout=out, stderr=err)  # fmt: skip
    line = out.getvalue().strip()
    assert line.startswith("export ") and "\n" not in line
    shown = subprocess.run(
        ["bash", "-c", 'eval "$1"; echo "$APP_ID|$API_KEY|$WEBHOOK_SECRET"', "-", line],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    app_id, api_key, secret = shown.split("|")
    app = Application.objects.get(pk=app_id)
    assert authenticate(api_key).application_id == app.id and app.webhook_secret == secret
    assert "shown only this once" in err.getvalue()


# --- rate limit 0 = unlimited -------------------------------------------------------------------


@pytest.mark.django_db
def test_rate_limit_zero_skips_the_bucket(make_app, monkeypatch):
    from tasks.api import ratelimit

    limited = make_app("echo", rate_limit_per_second=1, rate_limit_burst=1)
    free = make_app("echo", rate_limit_per_second=0, rate_limit_burst=1)
    ratelimit.check_submit(key=authenticate(limited.api_key))
    with pytest.raises(ratelimit.RateLimited):
        ratelimit.check_submit(key=authenticate(limited.api_key))

    def no_redis(**kwargs):
        raise AssertionError("an unlimited key must not touch the bucket")

    monkeypatch.setattr(ratelimit, "take", no_redis)
    for _ in range(5):
        ratelimit.check_submit(key=authenticate(free.api_key))


@pytest.mark.django_db
def test_unlimited_key_is_never_answered_429_over_the_api(make_app):
    from tests.conftest import Client

    app = make_app("echo", rate_limit_per_second=0, rate_limit_burst=1)
    client = Client()
    for _ in range(5):
        response = client.post(
            f"/api/applications/{app.application.id}/generate",
            data=json.dumps({"inputs": {}, "response_mode": "async"}),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
        )
        assert response.status_code == 200, response.content


# --- revokekey and rotatekey ---------------------------------------------------------------


@pytest.mark.django_db
def test_revokekey_by_prefix_as_displayed(make_app):
    app, other = make_app("echo"), make_app("echo")
    key = ApiKey.objects.get(application=app.application)
    out = StringIO()
    call_command("revokekey", f"{key.prefix}…", stdout=out, stderr=StringIO())
    assert f"revoked {key.prefix}…" in out.getvalue()
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert authenticate(app.api_key) is None  # this process forgets it at once
    assert authenticate(other.api_key) is not None
    again = StringIO()
    call_command("revokekey", key.prefix, stdout=again, stderr=StringIO())
    assert "already revoked" in again.getvalue()
    for bad in (["thk_nosuchkey"], []):
        with pytest.raises(CommandError):
            call_command("revokekey", *bad, stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db
def test_revokekey_app_revokes_every_key_of_that_application(make_app):
    from tasks.applications import rotate_api_key

    app, other = make_app("echo"), make_app("echo")
    newer = rotate_api_key(application_id=app.application.id)  # two live keys now
    assert authenticate(app.api_key) and authenticate(newer)
    out = StringIO()
    call_command("revokekey", "--app", str(app.application.id), stdout=out, stderr=StringIO())
    assert out.getvalue().count("revoked thk_") == 2
    assert authenticate(app.api_key) is None and authenticate(newer) is None
    assert authenticate(other.api_key) is not None
    for bad in ("not-a-uuid", "7f2c6a8e-0000-4000-8000-000000000000"):
        with pytest.raises(CommandError, match="--app"):
            call_command("revokekey", "--app", bad, stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db
def test_rotatekey_grace_hours(make_app):
    from django.utils import timezone

    app = make_app("echo")
    out, err = StringIO(), StringIO()
    call_command("rotatekey", str(app.application.id), stdout=out, stderr=err)
    second = out.getvalue().strip()
    assert second.startswith("thk_") and "24 h" in err.getvalue()
    old = ApiKey.objects.get(key_hash=hash_api_key(app.api_key))
    hours = (old.expires_at - timezone.now()).total_seconds() / 3600
    assert 23.9 < hours <= 24
    assert authenticate(app.api_key) and authenticate(second)
    # 0: every earlier key stops at once, including one still in the first rotation's grace.
    out = StringIO()
    call_command("rotatekey", str(app.application.id), "--grace-hours", "0",
                 stdout=out, stderr=StringIO())  # fmt: skip
    third = out.getvalue().strip()
    assert authenticate(app.api_key) is None and authenticate(second) is None
    assert authenticate(third).application_id == app.application.id
    for bad in (["--grace-hours", "-1"], ["--grace-hours", "100000"]):
        with pytest.raises(CommandError, match="--grace-hours"):
            call_command("rotatekey", str(app.application.id), *bad,
                         stdout=StringIO(), stderr=StringIO())  # fmt: skip
    with pytest.raises(CommandError, match="no application"):
        call_command("rotatekey", "nope", stdout=StringIO(), stderr=StringIO())


# --- webhookreceiver -------------------------------------------------------------------------


def test_webhookreceiver_prints_verified_callbacks_and_refuses_bad_signatures(tmp_path):
    from tasks.credentials import new_webhook_secret
    from tasks.delivery import signing

    secret, port = new_webhook_secret(), free_port()
    log = (tmp_path / "receiver.out").open("w+b")
    receiver = subprocess.Popen(
        [sys.executable, str(BASE_DIR / "manage.py"), "webhookreceiver", "--port", str(port),
         "--secret", secret],
        cwd=BASE_DIR, env=subprocess_env(), stdout=log, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/hooks/taskhook"
    try:
        wait_for(lambda: _get(url), timeout=30, interval=0.1)
        payload = {"event": "task.finished", "task_id": "t-1", "status": "succeeded",
                   "output": {"answer": "退款"}}  # fmt: skip
        body = signing.encode_body(payload)
        headers = signing.signature_headers(
            secrets=[secret], message_id="msg_1_1", timestamp=int(time.time()), body=body
        )
        ok = requests.post(url, data=body, headers=headers, timeout=5)
        assert ok.status_code == 200
        forged = dict(headers, **{"webhook-signature": "v1,AAAA"})
        assert requests.post(url, data=body, headers=forged, timeout=5).status_code == 400
        unsigned = requests.post(url, data=body, timeout=5)
        assert unsigned.status_code == 400
        wrong_key = signing.signature_headers(
            secrets=[new_webhook_secret()],
            message_id="msg_2_1",
            timestamp=int(time.time()),
            body=body,
        )
        assert requests.post(url, data=body, headers=wrong_key, timeout=5).status_code == 400
    finally:
        os.killpg(receiver.pid, signal.SIGTERM)
        stderr = receiver.communicate(timeout=10)[1].decode()
    log.seek(0)
    lines = log.read().decode().splitlines()
    assert [json.loads(line) for line in lines] == [payload]  # one JSON line, verified only
    assert stderr.count("bad signature") == 3, stderr


@pytest.mark.django_db
def test_webhookreceiver_refuses_to_start_without_a_secret():
    with pytest.raises(CommandError, match="--secret"):
        call_command("webhookreceiver", "--port", str(free_port()), "--secret", "",
                     stdout=StringIO(), stderr=StringIO())  # fmt: skip
