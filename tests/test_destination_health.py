"""Destinations as delivery targets like webhook endpoints (tasks.delivery.destinations with
tasks.delivery.health and tasks.delivery.endpoints): an in-flight cap per destination that a
black-holed broker cannot get past, bounded publishes on every broker client, the circuit that
parks publishes without spending attempts and a probe that drains them in order, auto-disable
and re-enable, health figures, /metrics, recover since T, and the Destinations pages.

A failing Redis Stream destination is the suite's own Redis with the stream's key holding a
string (XADD answers WRONGTYPE); deleting the key makes it healthy again."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from tasks.delivery import callbacks, destinations, endpoints, health
from tasks.models import (
    Application,
    AuditEntry,
    BulkOperation,
    Destination,
    DestinationAttempt,
    Task,
)
from tasks.plumbing.queueing import queue, redis_client
from tasks.selectors import alerts
from tasks.upkeep import bulk
from tests.conftest import Client
from tests.test_destinations import NATS, RABBITMQ, reachable, stream_url

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _no_destination_state() -> Iterator[None]:
    """Destination ids repeat across test databases; their Redis state must not."""

    def clear() -> None:
        client = redis_client()
        for key in client.scan_iter("taskhook:endpoint:dest-*"):
            client.delete(key)
        client.delete(endpoints.DESTINATIONS_WAITING_KEY)

    clear()
    yield
    clear()


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"taskhook-test-{uuid.uuid4().hex}"
    yield name
    redis_client().delete(name)


def add_destination(app, url: str) -> Destination:
    destinations.set_destinations(application_id=app.application.pk, add=[url])
    return Destination.objects.get(application=app.application, url=url)


def finished_task(app, **fields) -> Task:
    values = {"status": "succeeded", "output": {"q": 1}, "finished_at": timezone.now(), **fields}
    return Task.objects.create(application=app.application, inputs={}, **values)


def publish_first(destination: Destination, task: Task) -> str:
    job_id = f"dst-{destination.pk}-t{task.pk.hex}-{task.run}-a1"
    return destinations.deliver(destination_id=destination.pk, task_id=task.pk, run=task.run,
                                trigger="auto", auto_attempt=1, job_id=job_id)  # fmt: skip


def run_queued(limit: int = 50) -> list[str]:
    """Run the callbacks queue's destination jobs in this process, front first, as a worker
    would."""
    results = []
    callbacks_queue = queue(settings.CALLBACK_QUEUE)
    for _ in range(limit):
        ids = callbacks_queue.get_job_ids()
        if not ids:
            break
        job = callbacks_queue.fetch_job(ids[0])
        callbacks_queue.remove(ids[0])
        destination_id, task_id, run, trigger, auto_attempt, batch_id = job.args
        results.append(destinations.deliver(
            destination_id=destination_id, task_id=task_id, batch_id=batch_id, run=run,
            trigger=trigger, auto_attempt=auto_attempt, job_id=job.id))  # fmt: skip
    return results


def broken(stream: str) -> None:
    redis_client().set(stream, "not a stream")  # XADD answers WRONGTYPE


def stream_task_ids(stream: str) -> list[str]:
    import json

    return [json.loads(fields[b"body"])["task_id"] for _, fields in redis_client().xrange(stream)]


def open_circuit(app, stream: str, failures: int) -> Destination:
    destination = add_destination(app, stream_url(stream))
    broken(stream)
    for _ in range(failures):
        assert publish_first(destination, finished_task(app)) == "failed"
    destination.refresh_from_db()
    return destination


# --- the circuit ---------------------------------------------------------------------------------


def test_failures_open_the_circuit_parked_publishes_spend_nothing_and_a_probe_drains_in_order(
    make_app, private_queues, stream
):
    app = make_app(retry_schedule=[], circuit_failures=3, endpoint_max_in_flight=1)
    destination = open_circuit(app, stream, failures=3)
    assert (destination.circuit, destination.consecutive_failures) == ("open", 3)
    assert destination.probe_interval_seconds == health.FIRST_PROBE_SECONDS
    assert destination.next_probe_at is not None and destination.next_probe_at > timezone.now()
    assert destination.failing_since is not None
    name = health.destination_key(destination.pk)
    assert endpoints.circuit_of(endpoint=name) == "open"
    # While open, publishes wait without spending attempts; the reconciler leaves them.
    Destination.objects.update(created_at=timezone.now() - timedelta(hours=1))
    waiting = [finished_task(app, finished_at=timezone.now() - timedelta(minutes=5))
               for _ in range(3)]  # fmt: skip
    for task in waiting:
        assert publish_first(destination, task).startswith("parked")
    assert DestinationAttempt.objects.count() == 3
    assert health.sweep().destination_probes == 0  # not due yet
    assert destinations.resume_lost() == 0
    assert run_queued() == []
    # Due: the probe is the publish that waited longest; its success drains the rest in order.
    redis_client().delete(stream)
    Destination.objects.update(next_probe_at=timezone.now() - timedelta(seconds=1))
    assert health.sweep().destination_probes == 1
    assert Destination.objects.get().circuit == "half_open"
    assert run_queued() == ["delivered"] * 3
    assert stream_task_ids(stream) == [str(task.pk) for task in waiting]
    destination.refresh_from_db()
    assert (destination.circuit, destination.consecutive_failures) == ("closed", 0)
    assert destination.next_probe_at is None and destination.failing_since is None
    assert endpoints.circuit_of(endpoint=name) is None
    assert DestinationAttempt.objects.filter(delivered=True).count() == 3


def test_a_failed_probe_opens_the_circuit_for_twice_as_long(make_app, private_queues, stream):
    app = make_app(retry_schedule=[], circuit_failures=2)
    destination = open_circuit(app, stream, failures=2)
    assert publish_first(destination, finished_task(app)).startswith("parked")
    Destination.objects.update(next_probe_at=timezone.now() - timedelta(seconds=1))
    assert health.sweep().destination_probes == 1
    assert run_queued() == ["failed"]
    destination.refresh_from_db()
    assert destination.circuit == "open"
    assert destination.probe_interval_seconds == 2 * health.FIRST_PROBE_SECONDS
    assert destination.next_probe_at > timezone.now() + timedelta(seconds=45)
    # Doubling stops at 10 minutes.
    Destination.objects.update(probe_interval_seconds=health.MAX_PROBE_SECONDS, circuit="half_open")
    health.record_destination(destination_id=destination.pk, delivered=False, circuit_failures=2)
    assert Destination.objects.get().probe_interval_seconds == health.MAX_PROBE_SECONDS


def test_the_circuit_comes_back_from_the_database_when_redis_lost_it(
    make_app, private_queues, stream
):
    app = make_app(retry_schedule=[], circuit_failures=2)
    destination = open_circuit(app, stream, failures=2)
    name = health.destination_key(destination.pk)
    redis_client().delete(endpoints.CIRCUIT_KEY.format(endpoint=name))
    health.sweep()
    assert endpoints.circuit_of(endpoint=name) == "open"
    assert publish_first(destination, finished_task(app)).startswith("parked")


def test_a_destination_failing_too_long_is_disabled_and_can_be_re_enabled(
    make_app, private_queues, stream, admin_user
):
    app = make_app(retry_schedule=[], circuit_failures=2, disable_after_hours=120)
    destination = open_circuit(app, stream, failures=2)
    parked = finished_task(app)
    assert publish_first(destination, parked).startswith("parked")

    def enabled_ids() -> list[int]:  # what a worker schedules first attempts to (it caches)
        return destinations._enabled_ids(Application.objects.get(pk=app.application.pk))

    assert enabled_ids() == [destination.pk]
    Destination.objects.update(failing_since=timezone.now() - timedelta(hours=119))
    assert health.sweep().destinations_disabled == 0
    Destination.objects.update(failing_since=timezone.now() - timedelta(hours=121))
    assert health.sweep().destinations_disabled == 1
    destination.refresh_from_db()
    assert destination.disabled_at is not None and not destination.enabled
    entry = AuditEntry.objects.get(action="destination.disable")
    assert entry.username == "system" and entry.target_id == str(destination.pk)
    assert endpoints.circuit_of(endpoint=health.destination_key(destination.pk)) == "disabled"
    assert enabled_ids() == []
    # The parked publish was sent on and ends without an attempt; so does any new one.
    attempts = DestinationAttempt.objects.count()
    assert run_queued() == ["skipped: destination gone or disabled"]
    assert publish_first(destination, finished_task(app)).startswith("skipped")
    assert DestinationAttempt.objects.count() == attempts
    assert [h.state for h in health.all_destination_health()] == ["disabled"]
    assert [d.pk for d in health.disabled_destinations()] == [destination.pk]
    # The Overview says so, linking the destination's page (where Re-enable is).
    (alert,) = [a for a in alerts.alerts() if a.kind == "destination_disabled"]
    assert alert.destination_id == destination.pk
    assert alert.message.startswith(f"Destination {destination.masked_url} of ")
    redis_client().delete(stream)
    health.reenable_destination(destination_id=destination.pk, user=admin_user)
    destination.refresh_from_db()
    assert destination.enabled and destination.disabled_at is None
    assert (destination.circuit, destination.consecutive_failures) == ("closed", 0)
    assert AuditEntry.objects.get(action="destination.reenable").username == admin_user.username
    assert enabled_ids() == [destination.pk]
    assert publish_first(destination, finished_task(app)) == "delivered"


# --- isolation and bounded publishes ------------------------------------------------------------


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[int, list[socket.socket]]]:
    """A broker that accepts TCP connections and never answers; yields (port, accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0?stream=s",
        "amqp://guest:guest@127.0.0.1:{port}/%2F?exchange=e",
        "nats://127.0.0.1:{port}?subject=s",
    ],
    ids=["redis", "amqp", "nats"],
)
def test_a_publish_to_a_black_holed_broker_fails_within_its_bound(url):
    timeout = 1.0
    with black_hole() as (port, accepted):
        target = destinations.parse(url.format(port=port))
        started = time.monotonic()
        with pytest.raises(Exception):  # each client raises its own timeout
            destinations.publish(target, body=b"{}", headers={"webhook-id": "msg_x",
                                 "webhook-timestamp": "1"}, timeout=timeout)  # fmt: skip
        elapsed = time.monotonic() - started
    assert accepted, "the client never connected: the test proves nothing"
    assert elapsed < destinations.PUBLISH_STEPS * timeout + 1, elapsed


def test_a_black_holed_destination_holds_only_its_cap_of_delivery_threads(
    make_app, private_queues, stream
):
    """Cap 2: two publishes hang on the black hole, a third parks at once and is promoted when
    a slot frees; the application's healthy destination publishes meanwhile."""
    app = make_app(retry_schedule=[], endpoint_max_in_flight=2, callback_timeout_seconds=2)
    healthy = add_destination(app, stream_url(stream))
    tasks = [finished_task(app) for _ in range(3)]
    with black_hole() as (port, accepted):
        bad = add_destination(app, f"redis://127.0.0.1:{port}/0?stream=s")
        results: dict[int, str] = {}

        def hang(n: int) -> None:
            try:
                results[n] = publish_first(bad, tasks[n])
            finally:
                connection.close()

        threads = [threading.Thread(target=hang, args=(n,)) for n in range(2)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while len(accepted) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(accepted) == 2
        quick = time.monotonic()
        assert publish_first(bad, tasks[2]).startswith("parked")
        assert publish_first(healthy, tasks[0]) == "delivered"
        assert time.monotonic() - quick < 1.5  # neither waited on the black hole
        assert len(accepted) == 2  # the parked one never connected
        for thread in threads:
            thread.join(15)
        assert results == {0: "failed", 1: "failed"}
        assert time.monotonic() - started < destinations.PUBLISH_STEPS * 2 + 2
    # The freed slot promoted the parked publish, at the front of the queue, under a new id.
    [job_id] = queue(settings.CALLBACK_QUEUE).get_job_ids()
    assert job_id.startswith(f"dst-{bad.pk}-t{tasks[2].pk.hex}-1-a1-p")
    errors = DestinationAttempt.objects.filter(destination=bad).values_list("error", flat=True)
    assert len(errors) == 2 and all("Timeout" in error for error in errors), errors


def test_the_reconciler_promotes_publishes_whose_slot_holder_died(make_app, private_queues):
    app = make_app(retry_schedule=[], endpoint_max_in_flight=1)
    destination = add_destination(app, "redis://127.0.0.1:1/0?stream=s")
    name = health.destination_key(destination.pk)
    parked = destinations.ParkedPublish(
        destination.pk, destinations.Item(finished_task(app).pk, 1), "auto", 1, "dst-x"
    )
    # A worker took the only slot and died: its slot expires, nothing releases it.
    slot = {"endpoint": name, "cap": 1, "hold_seconds": 0, "parked": parked,
            "index": destinations.WAITING_INDEX}  # fmt: skip
    assert endpoints.acquire_or_park(job_id="dead", **slot) == endpoints.TAKEN
    assert endpoints.acquire_or_park(job_id="dst-x", **slot) == endpoints.PARKED
    assert destinations.promote_parked() == 0  # the slot is still held
    redis_client().zadd(endpoints.SLOTS_KEY.format(endpoint=name), {"dead": 1})  # expired
    assert destinations.promote_parked() == 1
    [job_id] = queue(settings.CALLBACK_QUEUE).get_job_ids()
    assert job_id.startswith("dst-x-p")
    assert endpoints.endpoints_with_waiting(destinations.WAITING_INDEX) == []


# --- health figures and /metrics ------------------------------------------------------------------


def attempts_of(destination: Destination, app, outcomes: list[bool]) -> None:
    now = timezone.now()
    for n, delivered in enumerate(outcomes):
        health.record_destination(destination_id=destination.pk, delivered=delivered,
                                  circuit_failures=app.application.circuit_failures)  # fmt: skip
        DestinationAttempt.objects.create(
            destination=destination, task=finished_task(app), run=1, number=1, trigger="auto",
            started_at=now - timedelta(seconds=100 - n), delivered=delivered,
            duration_ms=10 * (n + 1), error="" if delivered else "refused",
        )  # fmt: skip


def test_health_figures_and_metrics_per_destination(viewer, make_app, settings):
    settings.METRICS_PUBLIC = True
    settings.METRICS_CACHE_SECONDS = 0
    app = make_app(circuit_failures=2)
    good = add_destination(app, "redis://127.0.0.1:6379/0?stream=good")
    bad = add_destination(app, "amqp://guest:secret-pw@127.0.0.1:5672/%2F?exchange=e")
    attempts_of(good, app, [True, True, True, False])
    attempts_of(bad, app, [True, False, False])
    found = health.destination_health_of(Destination.objects.get(pk=bad.pk))
    assert (found.attempts, found.p50_ms, found.p95_ms) == (3, 20, 30)
    assert found.success_rate == pytest.approx(1 / 3)
    assert found.destination.consecutive_failures == 2 and found.state == "open"
    assert found.destination.last_success_at and found.destination.last_failure_at
    assert [h.destination.pk for h in health.all_destination_health()] == [bad.pk, good.pk]
    text = viewer.get("/metrics").content.decode()
    assert "secret-pw" not in text
    labels = (
        'app="app-echo",destination="amqp://guest:***@127.0.0.1:5672/%2F?exchange=e",kind="amqp"'
    )
    assert f"taskhook_destination_consecutive_failures{{{labels}}} 2.0" in text
    assert f"taskhook_destination_circuit_open{{{labels}}} 1.0" in text
    assert f"taskhook_destination_disabled{{{labels}}} 0.0" in text
    assert re.search(rf"taskhook_destination_success_ratio\{{{re.escape(labels)}\}} 0\.333", text)
    assert f'taskhook_destination_latency_ms{{{labels},quantile="0.95"}} 30.0' in text


# --- recover since T ----------------------------------------------------------------------------


def failed_attempt(destination: Destination, task: Task, at, *, delivered: bool = False,
                   number: int = 1) -> None:  # fmt: skip
    DestinationAttempt.objects.create(
        destination=destination, task=task, run=task.run, number=number, trigger="auto",
        started_at=at, delivered=delivered, error="" if delivered else "refused",
    )  # fmt: skip


def test_recover_republishes_exactly_what_failed_since_t_to_that_destination(
    make_app, private_queues, stream
):
    app = make_app()
    destination = add_destination(app, stream_url(stream))
    other = add_destination(app, "redis://127.0.0.1:1/0?stream=other")
    now = timezone.now()
    since = now - timedelta(hours=1)
    after = [finished_task(app) for _ in range(2)]
    for task in after:
        failed_attempt(destination, task, now - timedelta(minutes=5))
    before = finished_task(app)
    failed_attempt(destination, before, since - timedelta(minutes=1))
    published = finished_task(app)  # failed, then published: it has the message
    failed_attempt(destination, published, now - timedelta(minutes=9))
    failed_attempt(destination, published, now - timedelta(minutes=8), delivered=True, number=2)
    rerun = finished_task(app, run=2)  # its run 1 failed, but it has moved on
    DestinationAttempt.objects.create(destination=destination, task=rerun, run=1, number=1,
                                      trigger="auto", started_at=now, error="refused")  # fmt: skip
    elsewhere = finished_task(app)  # failed to the other destination only
    failed_attempt(other, elsewhere, now)
    operation = bulk.start_recover(since=since, destination_id=destination.pk, username="ops")
    queue(settings.MAINTENANCE_QUEUE).empty()  # run here instead
    operation = bulk.run(operation_id=operation.pk)
    assert (operation.status, operation.processed, operation.affected) == ("done", 2, 2)
    assert run_queued() == ["delivered", "delivered"]
    assert sorted(stream_task_ids(stream)) == sorted(str(task.pk) for task in after)
    assert DestinationAttempt.objects.filter(destination=other, trigger="manual").count() == 0
    # A second recover finds nothing: they have the message now.
    operation = bulk.start_recover(since=since, destination_id=destination.pk, username="ops")
    queue(settings.MAINTENANCE_QUEUE).empty()
    assert bulk.run(operation_id=operation.pk).affected == 0


def test_an_applications_recover_republishes_only_to_destinations_that_failed(
    make_app, private_queues, stream, receiver
):
    """A task whose callback failed, published to one destination and failed to the other:
    the application's recover redelivers the callback and publishes to the failed one only."""
    app = make_app()
    got_it = add_destination(app, stream_url(stream))
    failed_to = add_destination(app, stream_url(f"{stream}-2"))
    now = timezone.now()
    task = finished_task(app, callback_url=receiver.url, callback_status="failed")
    failed_attempt(got_it, task, now - timedelta(minutes=2), delivered=True)
    failed_attempt(failed_to, task, now - timedelta(minutes=2))
    operation = bulk.start_recover(
        since=now - timedelta(hours=1), application_id=str(app.application.pk), username="ops"
    )
    queue(settings.MAINTENANCE_QUEUE).empty()
    operation = bulk.run(operation_id=operation.pk)
    assert (operation.processed, operation.affected) == (2, 2)  # the callback, one publish
    jobs = queue(settings.CALLBACK_QUEUE).get_job_ids()
    assert sorted(job.split("-")[0] for job in jobs) == ["cb", "dst"]
    assert next(job for job in jobs if job.startswith("dst-")).startswith(f"dst-{failed_to.pk}-")
    # The task page's Redeliver still publishes to every destination (outside a recover).
    queue(settings.CALLBACK_QUEUE).empty()
    callbacks.redeliver(task_ids=[task.pk])
    jobs = queue(settings.CALLBACK_QUEUE).get_job_ids()
    assert sorted(int(job.split("-")[1]) for job in jobs if job.startswith("dst-")) == sorted(
        [got_it.pk, failed_to.pk]
    )
    redis_client().delete(f"{stream}-2")


# --- the Destinations pages -----------------------------------------------------------------------


def htmx(client: Client, url: str, method: str = "get", **data):
    return getattr(client, method)(url, data, HTTP_HX_REQUEST="true")


def test_viewers_see_the_destinations_pages_and_operators_act(
    viewer, operator, make_app, private_queues, stream
):
    app = make_app(circuit_failures=2)
    ok = add_destination(app, "redis://127.0.0.1:6379/0?stream=fine")
    down = add_destination(app, "amqp://guest:hush-pw@127.0.0.1:1/%2F?exchange=e")
    attempts_of(ok, app, [True])
    attempts_of(down, app, [False, False])
    health.disable_destination(destination_id=down.pk)
    page = viewer.get("/destinations/").content.decode()
    assert [int(pk) for pk in re.findall(r'<tr data-destination="(\d+)"', page)] == [down.pk, ok.pk]
    assert "hush-pw" not in page and "amqp://guest:***@127.0.0.1:1/%2F?exchange=e" in page
    assert 'data-state="disabled"' in page and "Republish everything" not in page  # a viewer
    partial = htmx(viewer, "/destinations/").content.decode()
    assert partial.startswith('<div id="destinations"')
    detail = viewer.get(f"/destinations/{down.pk}/").content.decode()
    assert "Recent publishes" in detail and "Re-enable" not in detail
    assert viewer.post(f"/destinations/{down.pk}/re-enable").status_code == 403
    assert "Destinations" in viewer.get("/endpoints/").content.decode()
    # An operator re-enables it in place (audited), and starts a recover.
    assert "Re-enable" in operator.get(f"/destinations/{down.pk}/").content.decode()
    answer = htmx(operator, f"/destinations/{down.pk}/re-enable", method="post").content.decode()
    assert answer.startswith('<section id="destination"') and 'data-state="closed"' in answer
    assert Destination.objects.get(pk=down.pk).enabled
    assert AuditEntry.objects.filter(action="destination.reenable").count() == 1
    since = (timezone.localtime() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert viewer.post("/destinations/recover", {"destination": down.pk, "since": since}
                       ).status_code == 403  # fmt: skip
    answer = htmx(operator, "/destinations/recover", method="post", destination=down.pk,
                  since=since).content.decode()  # fmt: skip
    assert answer.startswith('<div class="operations" id="operations"')
    operation = BulkOperation.objects.get()
    assert operation.filters["destination"] == down.pk
    assert AuditEntry.objects.get(action="destinations.recover").target_id == str(operation.pk)
    refused = htmx(operator, "/destinations/recover", method="post", since=since).content.decode()
    assert "Not started" in refused and BulkOperation.objects.count() == 1
    queue(settings.MAINTENANCE_QUEUE).empty()
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(User.objects.get(username="operator"))
    assert strict.post(f"/destinations/{down.pk}/re-enable").status_code == 403


@pytest.mark.skipif(not reachable(RABBITMQ) or not reachable(NATS),
                    reason="RabbitMQ (127.0.0.1:5672) or NATS (127.0.0.1:4222) is not running "
                           "here: the brokers' refusals are not checked")  # fmt: skip
def test_refusing_real_brokers_count_towards_the_circuit(make_app, private_queues):
    """The real brokers' failures (an exchange that does not exist, a subject no stream takes)
    are failed attempts like any other: they open each destination's circuit."""
    app = make_app(retry_schedule=[], circuit_failures=2)
    for url in (f"amqp://guest:guest@127.0.0.1:5672/%2F?exchange=missing-{uuid.uuid4().hex}",
                f"nats://127.0.0.1:4222?subject=nobody.{uuid.uuid4().hex}"):  # fmt: skip
        destination = add_destination(app, url)
        for _ in range(2):
            assert publish_first(destination, finished_task(app)) == "failed"
        destination.refresh_from_db()
        assert destination.circuit == "open", url
        assert publish_first(destination, finished_task(app)).startswith("parked")
