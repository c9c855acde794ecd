"""One dead receiver must not delay anyone else's callbacks: deliveries in flight are capped per
endpoint across all callback workers, and deliveries over the cap wait off the queue."""

from __future__ import annotations

import threading
import time

import pytest
from django.conf import settings
from django.utils import timezone

from dashboard.runtime.processes import DELIVERY_WORKER_CLASS
from tasks.delivery import callbacks, endpoints
from tasks.models import CallbackAttempt, Task
from tasks.plumbing.queueing import queue, redis_client
from tasks.upkeep import reconciler
from tests.conftest import WorkerProcess, api_submit, read_request, subprocess_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ENDPOINT = "00000000-0000-0000-0000-000000000001|http://127.0.0.1:9"


def parked(n: int) -> endpoints.ParkedDelivery:
    return endpoints.ParkedDelivery(f"task-{n}", 1, "auto", 1, f"cb-task-{n}-1-a1")


def test_slots_are_capped_and_parked_deliveries_come_back_oldest_first():
    client = redis_client()
    for key in client.scan_iter("taskhook:endpoint*"):
        client.delete(key)
    take = {"endpoint": ENDPOINT, "cap": 2, "hold_seconds": 10}
    assert endpoints.acquire_or_park(job_id="j1", parked=parked(1), **take)
    assert endpoints.acquire_or_park(job_id="j2", parked=parked(2), **take)
    assert not endpoints.acquire_or_park(job_id="j3", parked=parked(3), **take)
    assert not endpoints.acquire_or_park(job_id="j4", parked=parked(4), **take)
    assert not endpoints.acquire_or_park(job_id="j3b", parked=parked(3), **take)  # the same one
    assert endpoints.is_parked(endpoint=ENDPOINT, parked=parked(3))
    assert endpoints.waiting_count(application_id=ENDPOINT.split("|")[0]) == 2
    assert endpoints.release(endpoint=ENDPOINT, cap=2, job_id="j1") == [parked(3)]
    assert endpoints.release(endpoint=ENDPOINT, cap=2, job_id="j2") == [parked(4)]
    assert endpoints.release(endpoint=ENDPOINT, cap=2, job_id="nobody") == []
    assert endpoints.endpoints_with_waiting() == []


def test_a_slot_held_by_a_dead_worker_expires_and_the_reconciler_promotes(
    make_app, receiver, private_queues
):
    app = make_app("echo", endpoint_max_in_flight=1, callback_timeout_seconds=1)
    task = Task.objects.create(
        application=app.application, inputs={}, callback_url=receiver.url, status="succeeded",
        output={}, finished_at=timezone.now(), callback_status="pending",
    )  # fmt: skip
    endpoint = endpoints.endpoint_of(application_id=app.application.id, callback_url=receiver.url)
    # A worker took the only slot and died (no release), 1 s timeout + the margin ago.
    redis_client().zadd(endpoints.SLOTS_KEY.format(endpoint=endpoint), {"dead-job": time.time()})
    result = callbacks.deliver(task_id=task.id, run=1, trigger="auto", auto_attempt=1,
                               endpoint=endpoint, job_id=f"cb-{task.id}-1-a1")  # fmt: skip
    assert result == "delivered"  # the expired slot was freed on the way in
    # Now a live slot: the next one parks, and the reconciler neither loses nor doubles it.
    redis_client().zadd(endpoints.SLOTS_KEY.format(endpoint=endpoint),
                        {"live-job": time.time() + 60})  # fmt: skip
    Task.objects.filter(pk=task.pk).update(callback_status="pending")
    assert callbacks.deliver(task_id=task.id, run=1, trigger="manual", endpoint=endpoint,
                             job_id="cb-manual").startswith("parked")  # fmt: skip
    redis_client().zadd(endpoints.SLOTS_KEY.format(endpoint=endpoint), {"live-job": time.time()})
    report = reconciler.reconcile()
    assert report.promoted == 1
    jobs = queue("callbacks-reconciler-test").get_job_ids()
    assert any(job_id.startswith("cb-manual-p") for job_id in jobs)


def test_a_black_hole_endpoint_does_not_delay_a_healthy_one(make_app, live_worker, receiver):
    """12 callbacks to a receiver that accepts and never answers (2 s timeouts, one retry),
    then 12 to a healthy one, through a real delivery worker of 4 threads (plus the session's
    worker). The healthy ones are all delivered while the black hole has made only a few
    attempts; afterwards every black-hole callback got both attempts it was promised."""
    hold = threading.Event()

    def swallow(conn):
        read_request(conn)
        hold.wait(60)

    from tests.conftest import RawReceiver

    black_hole = RawReceiver(swallow)
    delivery = WorkerProcess(
        (settings.CALLBACK_QUEUE,), name="isolation",
        env=subprocess_env(CALLBACK_CONCURRENCY="4"),
        worker_class=DELIVERY_WORKER_CLASS,
    )  # fmt: skip
    try:
        # circuit_failures: its 24 attempts must all be made, none held by an open circuit.
        dead = make_app("echo", retry_schedule=[1], callback_timeout_seconds=2,
                        endpoint_max_in_flight=2, circuit_failures=100)  # fmt: skip
        healthy = make_app("echo", retry_schedule=[1])
        body = {"inputs": {}, "response_mode": "async"}
        dead_ids = [api_submit(dead, body | {"callback_url": black_hole.url}) for _ in range(12)]
        healthy_ids = [
            api_submit(healthy, body | {"callback_url": receiver.url}) for _ in range(12)
        ]

        wait_for(lambda: Task.objects.filter(pk__in=healthy_ids, callback_status="delivered")
                 .count() == 12, timeout=30)  # fmt: skip
        dead_attempts = CallbackAttempt.objects.filter(task_id__in=dead_ids).count()
        # Without the cap, the healthy jobs would queue behind all 12 first black-hole attempts.
        assert dead_attempts < 8, dead_attempts
        assert len(receiver.received) == 12

        wait_for(lambda: Task.objects.filter(pk__in=dead_ids, callback_status="failed").count()
                 == 12, timeout=90, interval=0.5)  # fmt: skip
        for task_id in dead_ids:
            rows = CallbackAttempt.objects.filter(task_id=task_id).order_by("number")
            assert [(r.number, r.trigger) for r in rows] == [(1, "auto"), (2, "auto")]
            assert all(r.error == "timed out after 2 s" for r in rows)
    finally:
        hold.set()
        black_hole.close()
        delivery.stop()


def test_the_cap_is_set_from_the_command_line_and_shown_on_the_application_page(make_app):
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from tasks.models import Application
    from tests.conftest import Client

    app = make_app("echo")
    call_command("setapplication", str(app.application.id), "--endpoint-max-in-flight", "7")
    assert Application.objects.get(pk=app.application.id).endpoint_max_in_flight == 7
    endpoint = endpoints.endpoint_of(application_id=app.application.id,
                                     callback_url="http://127.0.0.1:1/x")  # fmt: skip
    client = redis_client()
    client.zadd(endpoints.SLOTS_KEY.format(endpoint=endpoint), {"busy": time.time() + 60})
    for n in range(3):
        endpoints.acquire_or_park(endpoint=endpoint, cap=1, job_id=f"j{n}", hold_seconds=5,
                                  parked=parked(n))  # fmt: skip
    staff = Client()
    staff.force_login(User.objects.create_user("viewer", password="pw-viewer-1", is_staff=True))
    page = staff.get(f"/applications/{app.application.id}/").content.decode()
    assert (
        '<span class="n">3</span><span class="label">deliveries waiting on the endpoint cap' in page
    )
    assert "7 in flight per endpoint" in page
    for key in client.scan_iter("taskhook:endpoint*"):
        client.delete(key)


def test_a_parked_manual_redelivery_is_left_to_wait_by_the_reconciler(
    make_app, receiver, private_queues
):
    """A recover's redeliveries wait on the endpoint's cap as `manual` entries while their
    callbacks say pending: the reconciler must not send each a second, automatic one."""
    app = make_app("echo", endpoint_max_in_flight=1)
    long_ago = timezone.now() - timezone.timedelta(hours=1)
    task = Task.objects.create(
        application=app.application, inputs={}, callback_url=receiver.url, status="succeeded",
        output={}, finished_at=long_ago, callback_status="failed",
    )  # fmt: skip
    endpoint = endpoints.endpoint_of(application_id=app.application.id, callback_url=receiver.url)
    for key in redis_client().scan_iter("taskhook:endpoint*"):
        redis_client().delete(key)
    redis_client().zadd(endpoints.SLOTS_KEY.format(endpoint=endpoint), {"busy": time.time() + 60})
    assert callbacks.redeliver(task_ids=[task.id]) == [task.id]
    (job_id,) = queue(settings.CALLBACK_QUEUE).get_job_ids()
    result = callbacks.deliver(task_id=task.id, run=1, trigger="manual", endpoint=endpoint,
                               job_id=job_id)  # fmt: skip
    assert result.startswith("parked")
    queue(settings.CALLBACK_QUEUE).empty()
    assert Task.objects.get(pk=task.pk).callback_status == "pending"
    assert endpoints.run_is_parked(endpoint=endpoint, task_id=str(task.id), run=1)
    report = reconciler.reconcile()
    assert str(task.id) not in report.callbacks_rescheduled
    assert queue(settings.CALLBACK_QUEUE).get_job_ids() == []  # no second, automatic delivery
    assert not endpoints.run_is_parked(endpoint=endpoint, task_id=str(task.id), run=2)
