"""Receivers that misbehave on a raw socket cannot wedge a callback; DNS answers that change
cannot move a delivery to an address the SSRF guard did not check; the reconciler's resume never
collides with a stale job and no batch of rows starves it.

Deliveries run through `callbacks.deliver` (what the callback worker's job calls), in this
process, against real sockets on 127.0.0.1; one test runs the whole path through a real worker.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from email.utils import format_datetime

import pytest
from django.utils import timezone
from rq.job import Job

from tasks.delivery import callbacks
from tasks.models import CallbackAttempt, Task
from tasks.plumbing.queueing import queue, redis_client
from tasks.upkeep import reconciler
from tests.conftest import RawReceiver, api_submit, read_request, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def finished_task(app, url: str) -> Task:
    return Task.objects.create(
        application=app.application,
        inputs={},
        callback_url=url,
        status="succeeded",
        output={"ok": True},
        finished_at=timezone.now(),
        callback_status="pending",
    )


def deliver(task: Task) -> str:
    return callbacks.deliver(task_id=task.id, run=task.run, trigger="auto", auto_attempt=1)


def only_attempt(task: Task) -> CallbackAttempt:
    (attempt,) = CallbackAttempt.objects.filter(task_id=task.id)
    return attempt


# --- odd answers ---------------------------------------------------------------------------


def test_a_500_with_nul_bytes_and_invalid_utf8_is_recorded(make_app, raw_receiver):
    def answer(conn):
        read_request(conn)
        body = b"oops\x00\x00\xff\xfe binary \x80"
        conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    server = raw_receiver(answer)
    app = make_app("echo", retry_schedule=[])
    task = finished_task(app, server.url)
    assert deliver(task) == "failed"
    attempt = only_attempt(task)
    assert attempt.status_code == 500 and not attempt.delivered
    assert attempt.response_excerpt == "oops\ufffd\ufffd\ufffd\ufffd binary \ufffd"
    assert attempt.error == "receiver answered HTTP 500"
    task.refresh_from_db()
    assert task.callback_status == "failed" and task.callback_attempts == 1


@pytest.mark.parametrize(
    "answer_bytes",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x01\x02\xff" * 20, b"HTTP/1.1 abc\r\n\r\n", b""],
)
def test_an_answer_that_is_not_http_is_a_failed_attempt(make_app, raw_receiver, answer_bytes):
    def answer(conn):
        read_request(conn)
        conn.sendall(answer_bytes)

    server = raw_receiver(answer)
    app = make_app("echo", retry_schedule=[])
    task = finished_task(app, server.url)
    assert deliver(task) == "failed"
    attempt = only_attempt(task)
    assert attempt.status_code is None and not attempt.delivered
    assert "not an HTTP answer or connection broken" in attempt.error
    assert "\x00" not in attempt.error
    assert Task.objects.get(pk=task.id).callback_status == "failed"


@pytest.mark.parametrize("where", ["status line", "headers", "body"])
def test_a_dripping_receiver_is_cut_off_at_the_callback_timeout(make_app, raw_receiver, where):
    """One byte every 0.3 s: every read succeeds, so only a deadline on the whole attempt ends
    it. The attempt is recorded, and lasts about the callback timeout, not as long as the
    receiver likes."""
    stop = threading.Event()
    prefix = {
        "status line": b"",
        "headers": b"HTTP/1.1 200 OK\r\n",
        "body": b"HTTP/1.1 500 Slow\r\nContent-Length: 1000\r\n\r\n",
    }[where]

    def drip(conn):
        read_request(conn)
        conn.sendall(prefix)
        filler = b"HTTP/1.1 200 OK\r\n" if where == "status line" else b"X-Drip: y\r\n"
        for byte in filler * 100 if where != "body" else b"z" * 1000:
            if stop.is_set():
                return
            conn.sendall(bytes([byte]))
            time.sleep(0.3)

    server = raw_receiver(drip)
    app = make_app("echo", retry_schedule=[], callback_timeout_seconds=1.5)
    task = finished_task(app, server.url)
    try:
        assert deliver(task) == "failed"
    finally:
        stop.set()
    attempt = only_attempt(task)
    assert not attempt.delivered
    assert "1.5 s" in attempt.error
    # Bounded by the callback timeout plus the watchdog's tick, not by the receiver.
    assert attempt.duration_ms < 1500 + 1000
    if where == "body":
        assert attempt.status_code == 500 and "cut off after 1.5 s" in attempt.error


def test_a_black_hole_times_out_and_is_recorded(make_app, raw_receiver):
    hold = threading.Event()

    def swallow(conn):
        read_request(conn)
        hold.wait(30)

    server = raw_receiver(swallow)
    app = make_app("echo", retry_schedule=[], callback_timeout_seconds=1)
    task = finished_task(app, server.url)
    try:
        assert deliver(task) == "failed"
    finally:
        hold.set()
    attempt = only_attempt(task)
    assert attempt.error == "timed out after 1 s" and attempt.status_code is None


@pytest.mark.parametrize("form", ["date", "seconds", "garbage"])
def test_retry_after_as_an_http_date_or_seconds_is_honoured(make_app, raw_receiver, form):
    later = timezone.now() + timedelta(seconds=120)
    header = {"date": format_datetime(later, usegmt=True), "seconds": "120", "garbage": "soon"}

    def answer(conn):
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 503 Busy\r\nRetry-After: %s\r\nContent-Length: 0\r\n\r\n"
            % header[form].encode()
        )

    server = raw_receiver(answer)
    app = make_app("echo", retry_schedule=[5])
    task = finished_task(app, server.url)
    before = timezone.now()
    assert deliver(task) == "retrying"
    task.refresh_from_db()
    wait = (task.callback_next_attempt_at - before).total_seconds()
    if form == "garbage":
        assert 5 <= wait < 7  # ignored: the schedule's own step
    else:
        assert 118 <= wait <= 125


def test_odd_receivers_do_not_wedge_callbacks_through_a_real_worker(
    make_app, live_worker, raw_receiver
):
    """The whole path: API submit, a real worker runs the task and makes every attempt."""

    def nul_500(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 500 X\r\nContent-Length: 3\r\n\r\n\x00\x00\x00")

    def not_http(conn):
        read_request(conn)
        conn.sendall(b"\xde\xad\xbe\xef garbage\r\n\r\n")

    app = make_app("echo", retry_schedule=[1])
    ids = [
        api_submit(app, {"inputs": {}, "response_mode": "async", "callback_url": s.url})
        for s in (raw_receiver(nul_500), raw_receiver(not_http))
    ]
    for task_id in ids:
        task = wait_for(
            lambda task_id=task_id: Task.objects.filter(
                pk=task_id, callback_status="failed"
            ).first(),
            timeout=30,
        )
        rows = list(CallbackAttempt.objects.filter(task_id=task_id).order_by("number"))
        assert [row.number for row in rows] == [1, 2] and task.callback_attempts == 2


# --- DNS and the address connected to --------------------------------------------------------


@pytest.fixture
def dns(monkeypatch) -> dict[str, list[list[str]]]:
    """`answers[name]` is a list of resolver answers, one consumed per lookup (the last one
    repeats): a resolver whose answer changes between lookups, as in DNS rebinding."""
    answers: dict[str, list[list[str]]] = {}
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        queue_ = answers[host]
        addresses = queue_.pop(0) if len(queue_) > 1 else queue_[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return answers


def test_rebinding_to_loopback_after_the_submit_check_is_refused(
    make_app, settings, raw_receiver, dns
):
    hits: list[bytes] = []

    def record(conn):
        hits.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    server = raw_receiver(record)
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    dns["hooks.customer.example"] = [["93.184.216.34"], ["127.0.0.1"]]
    app = make_app("echo", retry_schedule=[])
    url = f"http://hooks.customer.example:{server.port}/hook"
    from tests.conftest import Client

    response = Client().post(
        f"/api/applications/{app.application.id}/generate",
        data={"inputs": {}, "response_mode": "async", "callback_url": url},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )
    assert response.status_code == 200  # the first answer was public
    task = Task.objects.get(pk=response.json()["task_id"])
    Task.objects.filter(pk=task.pk).update(
        status="succeeded", finished_at=timezone.now(), callback_status="pending"
    )
    task.refresh_from_db()
    assert deliver(task) == "failed"
    attempt = only_attempt(task)
    assert "refused by the SSRF guard" in attempt.error and "127.0.0.1" in attempt.error
    assert hits == [] and server.connections == 0


def test_every_address_of_an_answer_is_checked(make_app, settings, dns):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    dns["mixed.example"] = [["93.184.216.34", "127.0.0.1"]]
    app = make_app("echo", retry_schedule=[])
    task = finished_task(app, "http://mixed.example/hook")
    assert deliver(task) == "failed"
    assert "loopback" in only_attempt(task).error


def test_delivery_connects_to_the_checked_address_with_host_on_the_name(
    make_app, raw_receiver, dns
):
    """The name resolves to 127.0.0.1, then to 127.0.0.2 (both listen on the same port): each
    attempt connects to the address it resolved, and the connection kept alive to the first is
    not reused for the second."""
    seen: dict[str, list[bytes]] = {"127.0.0.1": [], "127.0.0.2": []}

    def recorder(address):
        def handle(conn):
            while True:  # keep-alive: answer every request on this connection
                request = read_request(conn)
                if not request:
                    return
                seen[address].append(request)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        return handle

    first = raw_receiver(recorder("127.0.0.1"), host="127.0.0.1")
    second = raw_receiver(recorder("127.0.0.2"), host="127.0.0.2", port=first.port)
    dns["hooks.customer.example"] = [["127.0.0.1"], ["127.0.0.1"], ["127.0.0.2"]]
    app = make_app("echo", retry_schedule=[])
    url = f"http://hooks.customer.example:{first.port}/hook?x=1"
    for _ in range(3):
        assert deliver(finished_task(app, url)) == "delivered"
    assert len(seen["127.0.0.1"]) == 2 and len(seen["127.0.0.2"]) == 1
    assert first.connections == 1  # the first two shared one kept-alive connection
    assert second.connections == 1
    head = seen["127.0.0.2"][0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /hook?x=1 HTTP/1.1")
    assert f"Host: hooks.customer.example:{first.port}" in head.split("\r\n")


# --- the reconciler ----------------------------------------------------------------------------


def stalled_callback(app, url: str, minutes_ago: int = 10) -> Task:
    """A delivery that was claimed but never recorded its end: its worker died mid-attempt."""
    return Task.objects.create(
        application=app.application,
        inputs={},
        callback_url=url,
        status="succeeded",
        output={},
        finished_at=timezone.now() - timedelta(minutes=minutes_ago),
        callback_status="delivering",
        callback_attempts=1,
    )


def test_resume_never_collides_with_a_stale_job_id(make_app, receiver, private_queues):
    app = make_app("echo", retry_schedule=[])
    task = stalled_callback(app, receiver.url)
    # What RQ keeps after the attempt's job failed: a job under the id of auto attempt 1.
    client = redis_client()
    stale = Job.create(
        "tasks.jobs.deliver_callback", id=f"cb-{task.id}-1-a1", connection=client,
        args=(str(task.id), 1, "auto", 1),
    )  # fmt: skip
    stale.set_status("failed")
    stale.save()
    for _ in range(2):  # every pass, not just the first
        report = reconciler.reconcile()
        assert str(task.id) in report.callbacks_rescheduled
        job = Job.fetch(f"cb-{task.id}-1-a1", connection=client)
        assert job.get_status() == "queued"
        queue("callbacks-reconciler-test").remove(job)
        job.set_status("failed")


def test_a_stale_job_still_queued_is_left_alone(make_app, receiver, private_queues):
    app = make_app("echo", retry_schedule=[])
    task = stalled_callback(app, receiver.url)
    queue("callbacks-reconciler-test").enqueue(
        "tasks.jobs.deliver_callback", str(task.id), 1, "auto", 1, job_id=f"cb-{task.id}-1-a1"
    )
    report = reconciler.reconcile()
    assert str(task.id) not in report.callbacks_rescheduled
    assert queue("callbacks-reconciler-test").count == 1


def test_rows_the_reconciler_must_skip_never_starve_the_rows_behind_them(
    make_app, receiver, monkeypatch, private_queues
):
    monkeypatch.setattr(reconciler, "BATCH", 5)
    client = redis_client()
    app = make_app("echo")
    old = timezone.now() - timedelta(minutes=5)
    waiting = []
    for minute in range(12):  # pending tasks whose jobs are still queued: skipped, not lost
        task = Task.objects.create(
            application=app.application, inputs={}, created_at=old + timedelta(seconds=minute)
        )
        client.hset(Job.key_for(task.rq_job_id), "status", "queued")
        waiting.append(task)
    orphan = Task.objects.create(
        application=app.application, inputs={}, created_at=old + timedelta(minutes=1)
    )
    requeued: list[str] = []
    for _ in range(3):  # 13 rows, 5 a pass: the orphan is reached on the third pass
        requeued += reconciler.reconcile().requeued
    assert requeued == [str(orphan.id)]
    assert client.hget(Job.key_for(orphan.rq_job_id), "status") == b"queued"


def test_a_job_queued_on_no_queue_is_enqueued_again_on_the_second_pass(make_app, private_queues):
    """Redis handed the job to a worker killed a moment before: its hash says `queued`, but it
    is on no queue. The first pass only notes it (it may be in a worker's hands right now)."""
    app = make_app("echo")
    task = Task.objects.create(
        application=app.application, inputs={}, created_at=timezone.now() - timedelta(minutes=1)
    )
    client = redis_client()
    client.hset(Job.key_for(task.rq_job_id), mapping={"status": "queued"})
    assert reconciler.reconcile().requeued == []
    assert reconciler.reconcile().requeued == [str(task.id)]
    assert task.rq_job_id in queue("tasks-reconciler-test").get_job_ids()
    assert reconciler.reconcile().requeued == []  # now on its queue: left alone


@pytest.fixture
def tls_receiver(settings, tmp_path, dns):
    """An HTTPS receiver on 127.0.0.1 with a certificate for `hooks.customer.example` from a
    test CA that deliveries trust; it records the SNI name and the request of each connection."""
    import ssl

    import trustme

    from tasks.delivery import webhook_http

    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    settings.CALLBACK_CA_BUNDLE = str(bundle)
    webhook_http.pool_manager.cache_clear()
    seen: dict[str, list] = {"sni": [], "requests": []}

    def serve(name: str) -> RawReceiver:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        context.sni_callback = lambda sock, server_name, ctx: seen["sni"].append(server_name)

        def handle(conn):
            with context.wrap_socket(conn, server_side=True) as tls:
                seen["requests"].append(read_request(tls))
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        server = RawReceiver(handle)
        dns["hooks.customer.example"] = [["127.0.0.1"]]
        return server

    servers: list[RawReceiver] = []

    def start(name: str) -> RawReceiver:
        servers.append(serve(name))
        return servers[-1]

    yield start, seen
    for server in servers:
        server.close()
    settings.CALLBACK_CA_BUNDLE = ""
    webhook_http.pool_manager.cache_clear()


def test_tls_keeps_sni_certificate_check_and_host_on_the_name(make_app, tls_receiver):
    start, seen = tls_receiver
    server = start("hooks.customer.example")
    app = make_app("echo", retry_schedule=[])
    task = finished_task(app, f"https://hooks.customer.example:{server.port}/hook")
    assert deliver(task) == "delivered", only_attempt(task).error
    assert seen["sni"] == ["hooks.customer.example"]
    head = seen["requests"][0].split(b"\r\n\r\n")[0].decode()
    assert f"Host: hooks.customer.example:{server.port}" in head.split("\r\n")


def test_tls_with_a_certificate_for_another_name_is_a_failed_attempt(make_app, tls_receiver):
    start, _ = tls_receiver
    server = start("someone-else.example")
    app = make_app("echo", retry_schedule=[])
    task = finished_task(app, f"https://hooks.customer.example:{server.port}/hook")
    assert deliver(task) == "failed"
    error = only_attempt(task).error
    assert error.startswith("TLS error") and "hooks.customer.example" in error, error
