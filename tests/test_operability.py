"""Operability: /metrics after real work, /healthz and /readyz against a real Redis that stops,
and log lines that carry task context but never a secret."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import time

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from dashboard.runtime.embedded_redis import EmbeddedRedis
from dashboard.runtime.logging import JsonFormatter, TextFormatter, redact
from tasks.models import Task
from tasks.plumbing.queueing import redis_client
from tasks.telemetry import counters
from tests.conftest import Client, api_submit, wait_for, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_public_metrics(settings):
    # Tests run with DEBUG off: /metrics needs a token or METRICS_PUBLIC, and each scrape here
    # must see the work just done, not figures a previous scrape cached.
    settings.METRICS_PUBLIC = True
    settings.METRICS_CACHE_SECONDS = 0


def scrape(client: Client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


submit = api_submit


def test_metrics_after_real_work(make_app, live_worker, receiver):
    for key in redis_client().scan_iter("taskhook:metrics:*"):
        redis_client().delete(key)
    app = make_app("echo")
    failing = make_app("fail")
    ids = [submit(app, {"inputs": {"i": i}, "response_mode": "async",
                        "callback_url": receiver.url}) for i in range(3)]  # fmt: skip
    submit(failing, {"inputs": {}, "response_mode": "async"})
    from tasks.models import Task

    wait_for(lambda: Task.objects.filter(pk__in=ids, callback_status="delivered").count() == 3)
    wait_for(lambda: Task.objects.filter(application=failing.application, status="failed").exists())
    name = app.application.name
    delivered = ("taskhook_callback_attempts_total", (("app", name), ("outcome", "delivered")))
    # Workers write their counters about once a second (tasks.telemetry.counters).
    samples = wait_for(lambda: (s := scrape(Client())).get(delivered) == 3 and s, timeout=5)
    assert samples[("taskhook_tasks_total", (("app", name), ("status", "succeeded")))] == 3
    assert samples[("taskhook_tasks_total", (("app", failing.application.name),
                                             ("status", "failed")))] == 1  # fmt: skip
    assert samples[("taskhook_task_duration_seconds_count", (("app", name),))] == 3
    assert samples[("taskhook_task_duration_seconds_bucket", (("app", name), ("le", "+Inf")))] == 3
    assert samples[("taskhook_queue_depth", (("queue", "tasks"),))] == 0
    assert samples[("taskhook_workers", ())] >= 1
    assert ("taskhook_cleanup_removed_total", ()) in samples


def test_rq_suspend_stops_workers_within_a_second_and_resume_restarts_them(make_app, live_worker):
    from rq.suspension import resume, suspend

    app = make_app("echo")
    body = {"inputs": {"q": 1}, "response_mode": "async"}
    suspend(redis_client())
    try:
        # A worker already blocked on its queue takes one more job, as RQ's own workers do;
        # it looks at the flag again before the next one (at most a second after its last look).
        time.sleep(1.2)
        wait_for_status(submit(app, body), ("succeeded",))
        held = submit(app, body)
        time.sleep(2)
        assert Task.objects.get(pk=held).status == "pending"
    finally:
        resume(redis_client())
    wait_for_status(held, ("succeeded",))


def test_counters_are_written_at_once_outside_a_worker():
    redis_client().delete("taskhook:test:counter")
    counters.add("taskhook:test:counter", field="a")
    counters.add("taskhook:test:counter", 0.5, field="sum")
    assert redis_client().hgetall("taskhook:test:counter") == {b"a": b"1", b"sum": b"0.5"}


def test_counters_in_a_worker_wait_for_the_flush_and_survive_redis_errors(settings, monkeypatch):
    monkeypatch.setattr(counters, "_batching", True)
    client = redis_client()
    client.delete("taskhook:test:batched")
    for _ in range(3):
        counters.add("taskhook:test:batched", expire=60)
    assert client.get("taskhook:test:batched") is None  # nothing written yet

    with socket.socket() as sock:  # a port where no Redis listens
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    real_url = settings.REDIS_URL
    settings.REDIS_URL = f"redis://127.0.0.1:{dead_port}/0"
    redis_client.cache_clear()
    try:
        assert counters.flush() is False  # kept for the next flush
    finally:
        settings.REDIS_URL = real_url
        redis_client.cache_clear()
    counters.add("taskhook:test:batched")
    assert counters.flush() is True
    assert redis_client().get("taskhook:test:batched") == b"4"
    assert 0 < redis_client().ttl("taskhook:test:batched") <= 60


def test_metrics_token(settings):
    settings.METRICS_TOKEN = "scrape-secret"
    settings.METRICS_PUBLIC = False
    client = Client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert scrape(client, HTTP_AUTHORIZATION="Bearer scrape-secret")


def test_metrics_need_a_token_unless_debug_or_declared_public(settings):
    settings.METRICS_PUBLIC = False
    settings.METRICS_TOKEN = ""
    client = Client()
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert "METRICS_TOKEN" in refused.json()["error"]["message"]
    settings.DEBUG = True  # a local run
    assert scrape(client)
    settings.DEBUG = False
    settings.METRICS_PUBLIC = True
    assert scrape(client)


def test_a_scrape_reuses_its_figures_for_a_few_seconds(settings, make_app):
    settings.METRICS_CACHE_SECONDS = 60
    client = Client()
    app = make_app("echo")
    scrape(client)  # fills the cache
    Task.objects.create(application=app.application, inputs={})
    key = ("taskhook_tasks_total", (("app", "app-echo"), ("status", "pending")))
    assert key not in scrape(client)  # the cached figures
    settings.METRICS_CACHE_SECONDS = 0
    assert scrape(client)[key] == 1


def test_readyz_fails_when_redis_stops(settings, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = EmbeddedRedis(tmp_path, port=port, persist=False)
    settings.REDIS_URL = server.start()
    redis_client.cache_clear()
    try:
        client = Client()
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["failing"] == []
        server.stop()
        ready = client.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["failing"] == ["redis"] and body["checks"]["database"] == "ok"
        assert body["checks"]["redis"].startswith("error: ")
        assert client.get("/healthz").status_code == 200  # alive, just not ready
    finally:
        server.stop()
        redis_client.cache_clear()


def test_log_lines_carry_context_and_no_secret(make_app, live_worker, receiver, caplog):
    caplog.set_level(logging.INFO)
    app = make_app("echo")
    submit(app, {"inputs": {"q": 1}, "response_mode": "async", "callback_url": receiver.url})
    wait_for(lambda: receiver.received)
    worker_log = wait_for(lambda: "callback delivered" in live_worker.output() and
                          live_worker.output())  # fmt: skip
    everything = worker_log + "\n".join(r.getMessage() for r in caplog.records)
    assert app.api_key not in everything
    assert app.webhook_secret not in everything
    assert app.webhook_secret.removeprefix("whsec_") not in everything
    assert re.search(r"callback delivered \[task_id=[0-9a-f-]{36} app_id=[0-9a-f-]{36} attempt=1\]",
                     worker_log)  # fmt: skip


def test_formatters():
    record = logging.LogRecord("tasks", logging.INFO, __file__, 1, "key thk_abcdefgh12345678xyz "
                               "secret whsec_QUJD+/==", None, None)  # fmt: skip
    record.task_id = "t-1"
    record.attempt = 2
    line = json.loads(JsonFormatter().format(record))
    assert line["task_id"] == "t-1" and line["attempt"] == 2 and line["level"] == "INFO"
    assert "12345678xyz" not in line["message"] and "QUJD" not in line["message"]
    text = TextFormatter("%(message)s").format(record)
    assert text.endswith("[task_id=t-1 attempt=2]") and "whsec_QUJD" not in text
    assert redact("nothing secret") == "nothing secret"


def test_redis_sentinel_is_followed(settings, tmp_path, make_app):
    """A real Sentinel (the same redis-server binary in sentinel mode) in front of a real Redis."""
    from dashboard.runtime.embedded_redis import server_binary
    from tasks.plumbing.queueing import queue
    from tests.stack import free_port

    master_port, sentinel_port = free_port(), free_port()
    master = EmbeddedRedis(tmp_path / "master", port=master_port, persist=False)
    master.start()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor taskhook 127.0.0.1 {master_port} 1\n"
    )
    sentinel = subprocess.Popen(
        [server_binary(), str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        settings.REDIS_SENTINELS = [("127.0.0.1", sentinel_port)]
        settings.REDIS_SENTINEL_MASTER = "taskhook"
        redis_client.cache_clear()
        wait_for(lambda: _pings(redis_client), timeout=10)
        queue("tasks").enqueue("bench.noop.noop", result_ttl=1)
        direct = redis.Redis(port=master_port, db=settings.REDIS_DB)  # REDIS_URL picks the db
        assert direct.llen("rq:queue:tasks") == 1  # it went to the master Sentinel named
        assert Client().get("/readyz").json()["checks"]["redis"] == "ok"
    finally:
        sentinel.kill()
        sentinel.wait()
        master.stop()
        redis_client.cache_clear()


def _pings(client_factory) -> bool:
    try:
        return client_factory().ping()
    except Exception:
        return False
