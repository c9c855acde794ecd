"""Every process command is written once (dashboard/runtime/processes.py): the Procfile is its
rendering, and the dashboard's no-worker hint shows the same commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings

from dashboard.runtime import processes
from tasks.plumbing.queueing import redis_client
from tests.conftest import Client
from tests.xdist_isolation import spare_database

BASE_DIR = Path(__file__).resolve().parents[2]


def test_the_procfile_is_the_rendered_process_table():
    assert (BASE_DIR / "Procfile").read_text() == processes.render_procfile(), (
        "regenerate it: python -m dashboard.runtime.processes > Procfile"
    )


def test_the_commands_name_real_modules_and_the_settings_queues():
    from django.utils.module_loading import import_string

    for worker_class in processes.WORKER_CLASSES.values():
        import_string(worker_class)
    import_string(processes.WEB_APPLICATION + ".application")
    assert (BASE_DIR / processes.GUNICORN_CONFIG).is_file()
    assert settings.TASK_QUEUE in processes.WORKER_QUEUES["worker"]
    assert settings.CALLBACK_QUEUE in processes.WORKER_QUEUES["callbacks"]
    assert all(settings.MAINTENANCE_QUEUE in queues for queues in processes.WORKER_QUEUES.values())
    argv = processes.worker_argv("callbacks", name="w-1")
    assert argv[-2:] == ["--name", "w-1"] and "--with-scheduler" in argv


@pytest.mark.django_db
def test_the_no_worker_hint_shows_the_procfile_commands(django_user_model, settings):
    # A Redis database no worker of this run registers in: the overview finds no live worker.
    settings.REDIS_URL = spare_database(settings.REDIS_URL)
    redis_client.cache_clear()
    redis_client().flushdb()
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    client = Client()
    client.force_login(user)
    try:
        page = client.get("/").content.decode()
    finally:
        redis_client.cache_clear()
    assert "No live RQ worker" in page
    for name in processes.WORKER_QUEUES:
        assert " ".join(processes.procfile_commands()[name]) in page


def test_the_readmes_procfile_block_is_the_procfile():
    readme = (BASE_DIR / "README.md").read_text()
    block = readme.split("```\nrelease:", 1)[1].split("```", 1)[0]
    shown = {line.split(":", 1)[0]: " ".join(line.split(":", 1)[1].split())
             for line in ("release:" + block).strip().splitlines()}  # fmt: skip
    assert shown == {name: " ".join(argv) for name, argv in processes.procfile_commands().items()}
