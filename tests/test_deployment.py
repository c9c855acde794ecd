"""The production configuration, booted from the Procfile as a platform would run it:
DEBUG off, gunicorn, separate worker, callback and cron processes, the database and Redis of the
run (PostgreSQL and the machine's Redis in CI's second pass)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import BASE_DIR, subprocess_env, wait_for
from tests.stack import free_port

pytestmark = pytest.mark.django_db(transaction=True)


def production_env(**extra: str) -> dict[str, str]:
    return subprocess_env(
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(50),
        CALLBACK_ALLOW_PRIVATE_NETWORKS="true",  # the receiver of this test is on 127.0.0.1
        **extra,
    )


def test_check_deploy_is_clean():
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=BASE_DIR, env=production_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def procfile() -> dict[str, str]:
    entries = {}
    for line in (BASE_DIR / "Procfile").read_text().splitlines():
        if line.strip():
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def test_procfile_boots_and_runs_a_task_with_a_callback(make_app, receiver):
    app = make_app("echo")
    port = free_port()
    env = production_env(PORT=str(port), WEB_CONCURRENCY="2", RECONCILE_INTERVAL="5",
                         METRICS_TOKEN="scrape-secret")  # fmt: skip
    commands = procfile()
    assert set(commands) == {"release", "web", "worker", "callbacks", "cron"}
    release = subprocess.run(shlex.split(commands["release"].replace("python", sys.executable, 1)),
                             cwd=BASE_DIR, env=env, capture_output=True, timeout=120)  # fmt: skip
    assert release.returncode == 0, release.stderr
    processes = []
    try:
        for name in ("web", "worker", "callbacks", "cron"):
            argv = shlex.split(commands[name])
            argv[0] = sys.executable if argv[0] == "python" else argv[0]
            if argv[0] == "gunicorn":
                argv = [sys.executable, "-m", "gunicorn", *argv[1:]]
            processes.append(subprocess.Popen(argv, cwd=BASE_DIR, env=env,
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL,
                                              start_new_session=True))  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ok(f"{base}/healthz"), timeout=30, interval=0.2)
        assert requests.get(f"{base}/readyz", timeout=5).json()["failing"] == []
        # Behind the TLS-terminating proxy, as deployed: plain HTTP would be redirected.
        https = {"X-Forwarded-Proto": "https"}
        plain = requests.post(f"{base}/api/applications/{app.application.id}/generate",
                              allow_redirects=False, timeout=5)  # fmt: skip
        assert plain.status_code == 301
        response = requests.post(
            f"{base}/api/applications/{app.application.id}/generate",
            headers={"Authorization": f"Bearer {app.api_key}",
                     "Content-Type": "application/json", **https},
            data=json.dumps({"inputs": {"q": "prod"}, "response_mode": "async",
                             "callback_url": receiver.url}),
            timeout=10,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        task_id = response.json()["task_id"]
        wait_for(lambda: receiver.received, timeout=30)
        assert receiver.received[0].json()["task_id"] == task_id
        poll = requests.get(
            f"{base}/api/tasks/{task_id}",
            timeout=5,
            headers={"Authorization": f"Bearer {app.api_key}", **https},
        )
        body = poll.json()
        assert body["status"] == "succeeded" and body["output"] == {"q": "prod"}
        wait_for(lambda: requests.get(f"{base}/api/tasks/{task_id}", timeout=5, headers={
            "Authorization": f"Bearer {app.api_key}", **https}).json()["callback"]["status"]
            == "delivered")  # fmt: skip

        def workers() -> float:
            metrics = requests.get(
                f"{base}/metrics", timeout=5, headers={"Authorization": "Bearer scrape-secret"}
            ).text
            return float(re.search(r"^taskhook_workers (\S+)$", metrics, re.M).group(1))

        # This stack's worker and callbacks processes (plus any others). The session's shared
        # worker may have run the task before these two finished starting: wait for them.
        wait_for(lambda: workers() >= 2, timeout=30, interval=0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
