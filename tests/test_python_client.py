"""The Python client's own suite (clients/python/tests) as part of `make test`, on this run's
database backend: it starts `manage.py runstack` on the test database and this run's Redis db,
then exercises `taskhook_client` against it (submit/wait/stream/cancel, batches, errors, 429
retries, webhook verification of real HMAC and Ed25519 deliveries; sync and async).

One test here, so a failure shows the client suite's own report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from tasks.models import Application
from tests.conftest import BASE_DIR, clean_redis
from tests.conftest import test_database_url as database_url  # not collected as a test

CLIENT = BASE_DIR / "clients" / "python"


@pytest.mark.processes
@pytest.mark.timeout(900)
@pytest.mark.django_db(transaction=True)  # the stack's processes write the committed test db
def test_python_client_suite(tmp_path: Path) -> None:
    pytest.importorskip("taskhook_client", reason="pip install -e clients/python")
    clean_redis()
    dropped = {"PYTEST_ADDOPTS", "DJANGO_SETTINGS_MODULE", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env |= {
        "TASKHOOK_TEST_DATABASE_URL": database_url(),
        "TASKHOOK_TEST_REDIS_URL": settings.REDIS_URL,
        "TASKHOOK_ROOT": str(BASE_DIR),
        "TASKHOOK_PYTHON": sys.executable,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--basetemp={tmp_path / 'client'}", "tests"],
            cwd=CLIENT, env=env, capture_output=True, text=True, timeout=840,
        )  # fmt: skip
    finally:
        clean_redis()  # the stack's queues and keys are not the next test's
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
    # the stack ran on this run's database (SQLite or PostgreSQL), not one of its own
    assert Application.objects.filter(name__startswith="client-").count() >= 5
