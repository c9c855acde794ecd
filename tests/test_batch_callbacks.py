"""A batch's end and its `batch.finished` callback (tasks.batches.completion,
tasks.delivery.batch_callbacks, README: Batches): one winner per completion, the signed body with
the counts and an absolute results_url, retries on the application's schedule with every
attempt recorded, the reconciler's safety nets (a lost hook, a lost job, a killed attempt), a
retried item reopening the batch, and per-item callbacks only when asked for."""

from __future__ import annotations

import hashlib
import hmac
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry
from standardwebhooks import Webhook

from tasks import services, state
from tasks.batches import completion, control
from tasks.delivery import batch_callbacks, endpoints, health
from tasks.models import Batch, BatchCallbackAttempt, Endpoint, Task
from tasks.plumbing.queueing import redis_client
from tasks.upkeep import retention
from tasks.upkeep.reconciler import reconcile
from tests.conftest import clean_redis, wait_for
from tests.test_batches import get, submit_batch

ITEMS = [{"inputs": {"n": n}} for n in range(3)]


def _drop_scheduled(settings) -> None:
    queue = Queue(settings.CALLBACK_QUEUE, connection=redis_client())
    registry = ScheduledJobRegistry(queue=queue)
    for job_id in registry.get_job_ids():
        registry.remove(job_id, delete_job=True)


@pytest.fixture
def _clean(private_queues, transactional_db, settings):
    clean_redis()
    _drop_scheduled(settings)  # the private queue's: clean_redis knows the shared ones
    yield
    _drop_scheduled(settings)
    clean_redis()


def callback_jobs(settings) -> list[str]:
    return Queue(settings.CALLBACK_QUEUE, connection=redis_client()).get_job_ids()


def scheduled_callback_jobs(settings) -> list[str]:
    queue = Queue(settings.CALLBACK_QUEUE, connection=redis_client())
    return ScheduledJobRegistry(queue=queue).get_job_ids()


def finish_items(batch_id: str, status: str = "succeeded") -> None:
    """The items' end as a worker records it, without the hook that settles the batch."""
    Task.objects.filter(batch_id=batch_id).update(status=status, finished_at=timezone.now())


def job_of(batch: Batch, attempt: int) -> str:
    return f"bcb-{batch.id.hex}-{batch.completions}-a{attempt}"


# --- the end of a batch, decided once ----------------------------------------------------


@pytest.mark.usefixtures("_clean")
def test_the_last_item_settles_the_batch_once_and_schedules_its_callback(
    make_app, client, receiver, settings
):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    assert completion.settle(batch_id=batch_id) is False  # items still pending
    finish_items(batch_id)
    assert completion.settle(batch_id=batch_id) is True
    assert completion.settle(batch_id=batch_id) is False  # the second caller loses
    batch = Batch.objects.get(pk=batch_id)
    assert (batch.status, batch.completions, batch.callback_status) == ("finished", 1, "pending")
    assert batch.finished_at is not None
    assert callback_jobs(settings) == [job_of(batch, 1)]


@pytest.mark.usefixtures("_clean")
def test_concurrent_last_items_make_one_winner(make_app, client, receiver):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    finish_items(batch_id)
    barrier = threading.Barrier(4)
    wins: list[bool] = []

    def settle() -> None:
        barrier.wait()
        try:
            wins.append(completion.settle(batch_id=batch_id))
        finally:
            connection.close()

    threads = [threading.Thread(target=settle) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False, False, False, True]
    assert Batch.objects.get(pk=batch_id).completions == 1


@pytest.mark.usefixtures("_clean")
def test_a_batch_without_a_callback_url_finishes_without_one(make_app, client, settings):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS)["batch_id"]
    finish_items(batch_id)
    assert get(client, app, f"/api/batches/{batch_id}").json()["status"] == "finished"
    batch = Batch.objects.get(pk=batch_id)
    assert (batch.callback_status, batch.completions) == ("none", 1)
    assert callback_jobs(settings) == []


@pytest.mark.usefixtures("_clean")
def test_cancelling_a_batch_settles_it_as_cancelled(make_app, client, receiver, settings):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    control.cancel_batch(batch=Batch.objects.get(pk=batch_id))
    batch = Batch.objects.get(pk=batch_id)
    assert (batch.status, batch.callback_status) == ("cancelled", "pending")
    assert callback_jobs(settings) == [job_of(batch, 1)]


@pytest.mark.usefixtures("_clean")
def test_cancelling_the_last_item_settles_the_batch(make_app, client, receiver):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS[:2], callback_url=receiver.url)["batch_id"]
    first, last = Task.objects.filter(batch_id=batch_id).order_by("batch_index")
    state.fail(task_id=first.id, run=1, error="boom", expected=("pending",))
    services.cancel_task(task_id=last.id)
    batch = Batch.objects.get(pk=batch_id)
    assert (batch.status, batch.callback_status) == ("finished", "pending")


# --- the callback itself -----------------------------------------------------------------


@pytest.mark.usefixtures("_clean")
def test_the_callback_is_signed_and_carries_the_counts_and_results_url(make_app, client, receiver):
    app = make_app("echo")
    batch_id = submit_batch(
        client, app, ITEMS, callback_url=receiver.url, metadata={"report": "daily"}
    )["batch_id"]
    finish_items(batch_id, status="failed")
    Task.objects.filter(batch_id=batch_id, batch_index=0).update(status="succeeded")
    completion.settle(batch_id=batch_id)
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1) == "delivered"
    (request,) = receiver.received
    headers = {name.lower(): value for name, value in request.headers.items()}
    expected = hmac.new(app.webhook_secret.encode(), request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-dify-signature-v1"], expected)
    payload = Webhook(app.webhook_secret).verify(request.body, headers)
    assert list(payload) == [
        "event", "batch_id", "app_id", "status", "counts", "results_url", "created_at",
        "finished_at", "metadata",
    ]  # fmt: skip
    assert payload["event"] == "batch.finished" and payload["batch_id"] == batch_id
    assert payload["status"] == "finished" and payload["metadata"] == {"report": "daily"}
    assert payload["counts"] == {"total": 3, "pending": 0, "running": 0, "succeeded": 1,
                                 "failed": 2, "cancelled": 0}  # fmt: skip
    assert payload["results_url"] == f"http://testserver/api/batches/{batch_id}/results"
    assert headers["webhook-id"] == f"msg_batch_{batch_id.replace('-', '')}_1"
    assert headers["x-taskhook-attempt"] == "1"
    batch = Batch.objects.get(pk=batch_id)
    assert (batch.callback_status, batch.callback_attempts) == ("delivered", 1)
    assert batch.callback_next_attempt_at is None
    (attempt,) = BatchCallbackAttempt.objects.filter(batch_id=batch_id)
    assert (attempt.number, attempt.status_code, attempt.delivered) == (1, 200, True)
    # A duplicate job of the same attempt makes no second POST.
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1).startswith("skip")
    assert len(receiver.received) == 1


@pytest.mark.usefixtures("_clean")
def test_a_failed_attempt_is_retried_on_the_schedule_then_given_up(
    make_app, client, receiver, settings
):
    app = make_app("echo", retry_schedule=[30])
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    finish_items(batch_id)
    completion.settle(batch_id=batch_id)
    receiver.default = (500, {}, b"down", 0.0)
    before = timezone.now()
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1) == "retrying"
    batch = Batch.objects.get(pk=batch_id)
    assert batch.callback_status == "pending"
    assert batch.callback_next_attempt_at >= before + timedelta(seconds=30)
    assert scheduled_callback_jobs(settings) == [job_of(batch, 2)]
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=2) == "failed"
    batch.refresh_from_db()
    assert (batch.callback_status, batch.callback_attempts) == ("failed", 2)
    rows = BatchCallbackAttempt.objects.filter(batch_id=batch_id).order_by("number")
    assert [(row.number, row.status_code, row.delivered) for row in rows] == [
        (1, 500, False), (2, 500, False),
    ]  # fmt: skip
    assert len(receiver.received) == 2


@pytest.mark.usefixtures("_clean")
def test_an_unsafe_callback_url_is_refused_as_an_attempt(make_app, client, receiver, settings):
    app = make_app("echo", retry_schedule=[])
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    finish_items(batch_id)
    completion.settle(batch_id=batch_id)
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1) == "failed"
    (attempt,) = BatchCallbackAttempt.objects.filter(batch_id=batch_id)
    assert "SSRF" in attempt.error and receiver.received == []


# --- the endpoint's circuit -----------------------------------------------------------------


def finished_batch(client, app, receiver) -> str:
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    finish_items(batch_id)
    completion.settle(batch_id=batch_id)
    return batch_id


def open_the_circuit(app, receiver) -> str:
    """Two failed task callbacks (circuit_failures=2): the endpoint's circuit opens."""
    key = endpoints.endpoint_of(application_id=app.application.id, callback_url=receiver.url)
    for _ in range(2):
        health.record(endpoint=key, delivered=False, circuit_failures=2)
    assert endpoints.circuit_of(endpoint=key) == "open"
    return key


@pytest.mark.usefixtures("_clean")
def test_while_the_circuit_is_open_the_batch_callback_waits_spending_no_attempt(
    make_app, client, receiver, settings
):
    app = make_app("echo", retry_schedule=[30], circuit_failures=2)
    batch_id = finished_batch(client, app, receiver)
    open_the_circuit(app, receiver)
    before = timezone.now()
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1).startswith("waiting")
    batch = Batch.objects.get(pk=batch_id)
    assert (batch.callback_status, batch.callback_attempts) == ("pending", 0)
    assert batch.callback_next_attempt_at >= before + timedelta(
        seconds=batch_callbacks.CIRCUIT_WAIT_SECONDS
    )
    assert not BatchCallbackAttempt.objects.exists() and receiver.received == []
    # Due again: the reconciler puts attempt 1 (still unspent) back on the queue.
    Queue(settings.CALLBACK_QUEUE, connection=redis_client()).empty()
    Batch.objects.filter(pk=batch_id).update(callback_next_attempt_at=before)
    assert reconcile().batch_callbacks_resumed == 1
    assert callback_jobs(settings) == [job_of(batch, 1)]


@pytest.mark.usefixtures("_clean")
def test_a_half_open_circuit_makes_the_batch_callback_its_probe(
    make_app, client, receiver, settings
):
    app = make_app("echo", retry_schedule=[], circuit_failures=2)
    batch_id = finished_batch(client, app, receiver)
    key = open_the_circuit(app, receiver)
    endpoints.set_circuit(endpoint=key, circuit="half")
    Endpoint.objects.update(circuit="half_open")
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1) == "delivered"
    assert len(receiver.received) == 1
    row = Endpoint.objects.get()
    assert (row.circuit, row.consecutive_failures) == ("closed", 0)
    assert endpoints.circuit_of(endpoint=key) is None


@pytest.mark.usefixtures("_clean")
def test_a_disabled_endpoint_fails_the_batch_callback_with_its_reason(
    make_app, client, receiver, settings
):
    app = make_app("echo", retry_schedule=[30], circuit_failures=2)
    batch_id = finished_batch(client, app, receiver)
    key = open_the_circuit(app, receiver)
    endpoints.set_circuit(endpoint=key, circuit="disabled")
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1) == (
        "failed: the endpoint is disabled"
    )
    batch = Batch.objects.get(pk=batch_id)
    assert (batch.callback_status, batch.callback_next_attempt_at) == ("failed", None)
    (attempt,) = BatchCallbackAttempt.objects.filter(batch_id=batch_id)
    assert attempt.error == health.disabled_error(app.application) and not attempt.delivered
    assert receiver.received == [] and scheduled_callback_jobs(settings) == []


# --- the safety nets ---------------------------------------------------------------------


@pytest.mark.usefixtures("_clean")
def test_the_reconciler_settles_a_batch_whose_hook_was_lost(make_app, client, receiver, settings):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    finish_items(batch_id)  # no hook ran: the batch still says running
    assert Batch.objects.get(pk=batch_id).status == "running"
    report = reconcile()
    assert report.batches_settled == 1
    batch = Batch.objects.get(pk=batch_id)
    assert batch.status == "finished" and callback_jobs(settings) == [job_of(batch, 1)]


@pytest.mark.usefixtures("_clean")
def test_the_reconciler_reenqueues_a_lost_or_killed_attempt(make_app, client, receiver, settings):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    finish_items(batch_id)
    completion.settle(batch_id=batch_id)
    batch = Batch.objects.get(pk=batch_id)
    # The job vanished with Redis: due since the settle, so the next pass puts it back.
    Queue(settings.CALLBACK_QUEUE, connection=redis_client()).empty()
    redis_client().delete(f"rq:job:{job_of(batch, 1)}")
    assert reconcile().batch_callbacks_resumed == 1
    assert callback_jobs(settings) == [job_of(batch, 1)]
    assert reconcile().batch_callbacks_resumed == 0  # still waiting: not enqueued twice
    # A worker killed mid-attempt: claimed (attempt 1 counted), never recorded; once its lease
    # is over, attempt 2 is enqueued.
    Queue(settings.CALLBACK_QUEUE, connection=redis_client()).empty()
    Batch.objects.filter(pk=batch_id).update(
        callback_attempts=1, callback_next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    assert reconcile().batch_callbacks_resumed == 1
    assert callback_jobs(settings) == [job_of(batch, 2)]
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=2) == "delivered"
    assert reconcile().batch_callbacks_resumed == 0


@pytest.mark.usefixtures("_clean")
def test_a_retried_item_reopens_the_batch_and_its_end_is_a_new_completion(
    make_app, client, receiver, settings
):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    finish_items(batch_id, status="failed")
    completion.settle(batch_id=batch_id)
    batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1)
    failed = Task.objects.filter(batch_id=batch_id).order_by("batch_index").first()
    services.retry_tasks(task_ids=[failed.id])
    batch = Batch.objects.get(pk=batch_id)
    assert (batch.status, batch.finished_at) == ("running", None)
    # The old completion's pending attempt (if any) no longer sends: reopened.
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=2).startswith("skip")
    Task.objects.filter(pk=failed.pk).update(status="succeeded")
    assert completion.settle(batch_id=batch_id) is True
    batch.refresh_from_db()
    assert (batch.completions, batch.callback_attempts) == (2, 0)
    assert batch_callbacks.deliver(batch_id=batch_id, completion=2, attempt=1) == "delivered"
    second = receiver.received[-1]
    assert second.headers["webhook-id"] == f"msg_batch_{batch.id.hex}_2"
    assert second.json()["counts"]["succeeded"] == 1


# --- through a real worker ---------------------------------------------------------------


@pytest.mark.processes
def test_a_batch_sends_one_batch_finished_and_no_item_callbacks(
    make_app, client, live_worker, receiver
):
    app = make_app("echo")
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    wait_for(lambda: receiver.received, timeout=60)
    wait_for(lambda: Batch.objects.get(pk=batch_id).callback_status == "delivered", timeout=30)
    (request,) = receiver.received
    payload = Webhook(app.webhook_secret).verify(request.body, request.headers)
    assert payload["event"] == "batch.finished"
    assert payload["counts"]["succeeded"] == 3
    assert set(
        Task.objects.filter(batch_id=batch_id).values_list("callback_status", flat=True)
    ) == {"none"}


@pytest.mark.processes
def test_item_callbacks_when_asked_for_then_the_batch_callback(
    make_app, client, live_worker, receiver
):
    app = make_app("echo")
    batch_id = submit_batch(
        client, app, ITEMS, callback_url=receiver.url, callback_events=["finished"]
    )["batch_id"]
    wait_for(lambda: len(receiver.received) == 4, timeout=60)
    events = sorted(request.json()["event"] for request in receiver.received)
    assert events == ["batch.finished", "task.finished", "task.finished", "task.finished"]
    assert {request.json()["batch_id"] for request in receiver.received} == {batch_id}


# --- retention -----------------------------------------------------------------------------


@pytest.mark.usefixtures("_clean")
def test_retention_removes_a_batch_with_its_last_item(make_app, client, receiver):
    app = make_app("echo", retention_hours=1)
    batch_id = submit_batch(client, app, ITEMS, callback_url=receiver.url)["batch_id"]
    finish_items(batch_id)
    completion.settle(batch_id=batch_id)
    long_ago = timezone.now() - timedelta(hours=2)
    first, *rest = Task.objects.filter(batch_id=batch_id).order_by("batch_index")
    Task.objects.filter(pk__in=[task.pk for task in rest]).update(finished_at=long_ago)
    retention.run_cleanup(trigger="command")
    assert Batch.objects.filter(pk=batch_id).exists()  # one item is left
    Task.objects.filter(pk=first.pk).update(finished_at=long_ago)
    retention.run_cleanup(trigger="command")
    # Its batch.finished is still due: kept until that delivery ends.
    assert Batch.objects.filter(pk=batch_id).exists()
    batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1)
    assert BatchCallbackAttempt.objects.filter(batch_id=batch_id).exists()
    retention.run_cleanup(trigger="command")
    assert not Batch.objects.filter(pk=batch_id).exists()
    assert not BatchCallbackAttempt.objects.filter(batch_id=batch_id).exists()
    assert get(client, app, f"/api/batches/{batch_id}").status_code == 404
