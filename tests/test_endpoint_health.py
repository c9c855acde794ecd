"""Endpoint health (tasks.delivery.health): each attempt's record, the circuit that opens after a
run of failures and parks deliveries without spending attempts, the probe that closes it and
drains the waiting deliveries in order, auto-disable, re-enable, and recover since T."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from tasks.delivery import callbacks, endpoints, health
from tasks.models import AuditEntry, BulkOperation, CallbackAttempt, Endpoint, Task
from tasks.plumbing.queueing import queue, redis_client
from tasks.upkeep import bulk, reconciler
from tests.conftest import api_submit, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def finished_task(app, url: str, **fields) -> Task:
    values = {"status": "succeeded", "output": {}, "finished_at": timezone.now(),
              "callback_status": "pending", **fields}  # fmt: skip
    return Task.objects.create(application=app.application, inputs={}, callback_url=url, **values)


def endpoint_key(app, url: str) -> str:
    return endpoints.endpoint_of(application_id=app.application.id, callback_url=url)


def run_queued(limit: int = 50) -> list[str]:
    """Run the callbacks queue's jobs in this process, front first, as a worker would."""
    results = []
    callbacks_queue = queue(settings.CALLBACK_QUEUE)
    for _ in range(limit):
        ids = callbacks_queue.get_job_ids()
        if not ids:
            break
        job = callbacks_queue.fetch_job(ids[0])
        callbacks_queue.remove(ids[0])
        task_id, run, trigger, auto_attempt, endpoint = job.args
        results.append(callbacks.deliver(task_id=task_id, run=run, trigger=trigger,
                                         auto_attempt=auto_attempt, endpoint=endpoint,
                                         job_id=job.id))  # fmt: skip
    return results


def deliver_first(task: Task, key: str) -> str:
    return callbacks.deliver(task_id=task.id, run=1, trigger="auto", auto_attempt=1, endpoint=key,
                             job_id=f"cb-{task.id}-1-a1")  # fmt: skip


def test_each_attempt_updates_the_endpoints_health(make_app, receiver, private_queues):
    app = make_app("echo", retry_schedule=[])
    receiver.respond(500)
    first = finished_task(app, receiver.url)
    second = finished_task(app, receiver.url)
    key = endpoint_key(app, receiver.url)
    assert callbacks.deliver(task_id=first.id, run=1, trigger="auto", auto_attempt=1,
                             endpoint=key) == "failed"  # fmt: skip
    row = Endpoint.objects.get()
    assert (row.origin, row.consecutive_failures, row.circuit) == (key.split("|")[1], 1, "closed")
    assert row.failing_since is not None and row.last_success_at is None
    assert callbacks.deliver(task_id=second.id, run=1, trigger="auto", auto_attempt=1,
                             endpoint=key) == "delivered"  # fmt: skip
    row.refresh_from_db()
    assert row.consecutive_failures == 0 and row.failing_since is None
    assert row.last_success_at is not None and row.last_failure_at is not None
    assert CallbackAttempt.objects.filter(endpoint=row).count() == 2
    found = health.health_of(row)
    assert found.attempts == 2 and found.success_rate == 0.5
    assert found.p50_ms is not None and found.p95_ms is not None


def open_circuit(app, receiver, failures: int = 3) -> str:
    key = endpoint_key(app, receiver.url)
    for _ in range(failures):
        receiver.respond(500)
        assert deliver_first(finished_task(app, receiver.url), key) == "failed"
    return key


def test_failures_open_the_circuit_and_a_probe_closes_it_and_drains_in_order(
    make_app, receiver, private_queues
):
    app = make_app("echo", retry_schedule=[], circuit_failures=3, endpoint_max_in_flight=1)
    key = open_circuit(app, receiver)
    row = Endpoint.objects.get()
    assert row.circuit == "open" and row.consecutive_failures == 3
    assert row.probe_interval_seconds == health.FIRST_PROBE_SECONDS
    assert row.next_probe_at is not None and row.next_probe_at > timezone.now()
    attempts = CallbackAttempt.objects.count()
    # While open, deliveries wait without spending attempts; the reconciler's rescue leaves them.
    waiting = [finished_task(app, receiver.url, finished_at=timezone.now() - timedelta(minutes=5))
               for _ in range(3)]  # fmt: skip
    for task in waiting:
        assert deliver_first(task, key).startswith("parked")
    assert health.sweep().probes == 0  # not due yet
    assert reconciler.reconcile().callbacks_rescheduled == []
    assert run_queued() == []
    assert CallbackAttempt.objects.count() == attempts
    assert set(Task.objects.filter(pk__in=[t.pk for t in waiting])
               .values_list("callback_attempts", flat=True)) == {0}  # fmt: skip
    # Due: the probe is the delivery that waited longest; its success drains the rest in order.
    Endpoint.objects.update(next_probe_at=timezone.now() - timedelta(seconds=1))
    received_before = len(receiver.received)
    assert health.sweep().probes == 1
    assert Endpoint.objects.get().circuit == "half_open"
    assert run_queued() == ["delivered"] * 3
    order = [r.json()["task_id"] for r in receiver.received[received_before:]]
    assert order == [str(task.id) for task in waiting]
    row.refresh_from_db()
    assert (row.circuit, row.consecutive_failures, row.next_probe_at) == ("closed", 0, None)
    assert endpoints.circuit_of(endpoint=key) is None


def test_a_failed_probe_opens_the_circuit_for_twice_as_long(make_app, receiver, private_queues):
    app = make_app("echo", retry_schedule=[], circuit_failures=2)
    key = open_circuit(app, receiver, failures=2)
    task = finished_task(app, receiver.url)
    assert deliver_first(task, key).startswith("parked")
    Endpoint.objects.update(next_probe_at=timezone.now() - timedelta(seconds=1))
    assert health.sweep().probes == 1
    receiver.respond(500)
    assert run_queued() == ["failed"]
    row = Endpoint.objects.get()
    assert row.circuit == "open" and row.probe_interval_seconds == 2 * health.FIRST_PROBE_SECONDS
    assert row.next_probe_at > timezone.now() + timedelta(seconds=health.FIRST_PROBE_SECONDS)
    assert endpoints.circuit_of(endpoint=key) == "open"


def test_the_circuit_comes_back_from_the_database_when_redis_lost_it(
    make_app, receiver, private_queues
):
    app = make_app("echo", retry_schedule=[], circuit_failures=2)
    key = open_circuit(app, receiver, failures=2)
    redis_client().delete(endpoints.CIRCUIT_KEY.format(endpoint=key))
    health.sweep()
    assert endpoints.circuit_of(endpoint=key) == "open"
    assert deliver_first(finished_task(app, receiver.url), key).startswith("parked")


def test_an_endpoint_failing_too_long_is_disabled_and_can_be_re_enabled(
    make_app, receiver, private_queues, admin_user
):
    app = make_app("echo", retry_schedule=[], circuit_failures=2, disable_after_hours=120)
    key = open_circuit(app, receiver, failures=2)
    parked = finished_task(app, receiver.url)
    assert deliver_first(parked, key).startswith("parked")
    Endpoint.objects.update(failing_since=timezone.now() - timedelta(hours=119))
    assert health.sweep().disabled == 0
    Endpoint.objects.update(failing_since=timezone.now() - timedelta(hours=121))
    assert health.sweep().disabled == 1
    row = Endpoint.objects.get()
    assert row.disabled_at is not None
    entry = AuditEntry.objects.get(action="endpoint.disable")
    assert entry.username == "system" and entry.target_id == str(row.pk)
    # The delivery that waited and any new one are given up with a clear error, no attempt made.
    attempts = CallbackAttempt.objects.count()
    fresh = finished_task(app, receiver.url)
    assert deliver_first(fresh, key).startswith("failed: endpoint disabled")
    assert run_queued() == [f"failed: {health.disabled_error(app.application)}"]  # the parked one
    for task in (parked, fresh):
        task.refresh_from_db()
        assert task.callback_status == "failed"
    assert CallbackAttempt.objects.count() == attempts
    # One whose worker died mid-attempt (delivering, nothing scheduled) settles too, rather
    # than come back from the reconciler on every pass.
    stalled = finished_task(app, receiver.url)
    Task.objects.filter(pk=stalled.pk).update(
        callback_status="delivering", callback_next_attempt_at=None
    )
    assert deliver_first(stalled, key).startswith("failed: endpoint disabled")
    stalled.refresh_from_db()
    assert stalled.callback_status == "failed"
    assert [h.state for h in health.all_health()] == ["disabled"]
    assert [e.pk for e in health.disabled_endpoints()] == [row.pk]
    health.reenable(endpoint_id=row.pk, user=admin_user)
    row.refresh_from_db()
    assert (row.disabled_at, row.circuit, row.consecutive_failures) == (None, "closed", 0)
    assert AuditEntry.objects.get(action="endpoint.reenable").username == admin_user.username
    assert deliver_first(finished_task(app, receiver.url), key) == "delivered"


def test_recover_since_t_redelivers_exactly_the_callbacks_that_failed_since_t(
    make_app, receiver, private_queues
):
    app = make_app("echo")
    other_url = receiver.url.replace("127.0.0.1", "localhost")
    now = timezone.now()
    since = now - timedelta(hours=1)
    failed = {"callback_status": "failed"}
    before = finished_task(app, receiver.url, finished_at=since - timedelta(minutes=1), **failed)
    after = [finished_task(app, receiver.url, finished_at=now - timedelta(minutes=n), **failed)
             for n in (1, 2)]  # fmt: skip
    delivered = finished_task(app, receiver.url, callback_status="delivered")
    elsewhere = finished_task(app, other_url, finished_at=now, **failed)
    health.record(endpoint=endpoint_key(app, receiver.url), delivered=False, circuit_failures=20)
    row = Endpoint.objects.get()
    operation = bulk.start_recover(since=since, endpoint_id=row.pk, username="ops")
    queue(settings.MAINTENANCE_QUEUE).empty()  # run here instead, step by step
    operation = bulk.run(operation_id=operation.pk)
    assert (operation.status, operation.processed, operation.affected) == ("done", 2, 2)
    assert run_queued() == ["delivered", "delivered"]
    assert sorted(r.json()["task_id"] for r in receiver.received) == sorted(
        str(t.pk) for t in after
    )
    expected = {before: "failed", delivered: "delivered", elsewhere: "failed", **{
        task: "delivered" for task in after}}  # fmt: skip
    for task, status in expected.items():
        task.refresh_from_db()
        assert task.callback_status == status, task
    # For the whole application, the other endpoint's too.
    Task.objects.filter(pk__in=[t.pk for t in after]).update(callback_status="failed")
    operation = bulk.start_recover(since=since, application_id=str(app.application.id),
                                   username="ops")  # fmt: skip
    queue(settings.MAINTENANCE_QUEUE).empty()
    assert bulk.run(operation_id=operation.pk).affected == 3
    assert operation.kind == BulkOperation.Kind.RECOVER


@pytest.mark.processes
def test_a_real_worker_opens_the_circuit_parks_and_drains_in_order(make_app, live_worker, receiver):
    """A receiver answering 500 three times opens the circuit (circuit_failures=3); the
    deliveries that follow through the real worker wait without attempts; a probe succeeds and
    the worker delivers every waiting one, in the order they waited."""
    app = make_app("echo", retry_schedule=[], circuit_failures=3, endpoint_max_in_flight=1)
    key = endpoint_key(app, receiver.url)
    for _ in range(3):
        receiver.respond(500)

    def submit() -> str:
        body = {"inputs": {"q": 1}, "response_mode": "async", "callback_url": receiver.url}
        return api_submit(app, body)

    failing = [submit() for _ in range(3)]
    wait_for(lambda: Task.objects.filter(pk__in=failing, callback_status="failed").count() == 3)
    assert Endpoint.objects.get().circuit == "open"
    waiting = [submit() for _ in range(3)]
    waiting_key = endpoints.WAITING_KEY.format(endpoint=key)
    wait_for(lambda: redis_client().zcard(waiting_key) == 3)
    parked_order = [endpoints.ParkedDelivery.decode(raw).task_id
                    for raw in redis_client().zrange(waiting_key, 0, -1)]  # fmt: skip
    assert sorted(parked_order) == sorted(waiting)
    assert CallbackAttempt.objects.count() == 3
    assert len(receiver.received) == 3
    Endpoint.objects.update(next_probe_at=timezone.now() - timedelta(seconds=1))
    assert reconciler.reconcile().endpoints.probes == 1
    wait_for(lambda: Task.objects.filter(pk__in=waiting, callback_status="delivered").count() == 3)
    assert [r.json()["task_id"] for r in receiver.received[3:]] == parked_order
    assert Endpoint.objects.get().circuit == "closed"
    assert CallbackAttempt.objects.count() == 6


def test_a_health_listing_reads_a_bounded_number_of_endpoints_the_worst_first(make_app):
    """Each endpoint's figures cost a read of its last attempts: a listing takes the `limit`
    worst by state and consecutive failures, whatever the number of endpoints."""
    app = make_app("echo")
    now = timezone.now()

    def endpoint(origin: str, **fields) -> Endpoint:
        return Endpoint.objects.create(application=app.application, origin=origin, **fields)

    endpoint("http://fine.example:80")
    flaky = endpoint("http://flaky.example:80", consecutive_failures=3, last_failure_at=now)
    opened = endpoint("http://open.example:80", circuit="open", consecutive_failures=20)
    gone = endpoint("http://gone.example:80", disabled_at=now, consecutive_failures=99)
    assert [h.endpoint for h in health.all_health(limit=3)] == [gone, opened, flaky]
    assert len(health.all_health()) == 4
