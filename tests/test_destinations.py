"""Destinations beyond HTTP (README: Destinations): a Redis Stream, RabbitMQ and NATS JetStream,
each against the real broker with a real consumer, verified as a webhook receiver verifies."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.utils import timezone
from rq import Queue
from rq.registry import ScheduledJobRegistry
from standardwebhooks import Webhook

from tasks.applications import update_application
from tasks.batches import completion
from tasks.delivery import callbacks, destinations
from tasks.models import AttemptTrigger, Destination, DestinationAttempt, Task, TaskStatus
from tasks.plumbing.queueing import redis_client
from tests.conftest import Client, api_submit, wait_for
from tests.test_batches import submit_batch

pytestmark = pytest.mark.django_db(transaction=True)

RABBITMQ = ("127.0.0.1", 5672)
NATS = ("127.0.0.1", 4222)


def reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_url(name: str) -> str:
    """The suite's own Redis (embedded or a server), with the stream named."""
    parts = urlsplit(settings.REDIS_URL)
    query = "&".join(filter(None, (parts.query, f"stream={name}")))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def with_destination(app, url: str) -> Destination:
    update_application(application_id=app.application.pk, destinations=[url])
    return Destination.objects.get(application=app.application, url=url)


def submit(app) -> str:
    """A task with no callback_url: it reaches only the destinations."""
    return api_submit(app, {"inputs": {"q": "hello"}, "response_mode": "async"})


def published(task_id: str, destination: Destination, count: int = 1) -> list:
    return wait_for(lambda: (rows := list(DestinationAttempt.objects.filter(
        task_id=task_id, destination=destination, delivered=True))) and len(rows) >= count
        and rows)  # fmt: skip


def verify(app, body: bytes, headers: dict[str, str], task_id: str) -> dict:
    """What a consumer does: Standard Webhooks over the same body bytes, and the Dify HMAC."""
    expected = hmac.new(app.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-dify-signature-v1"], expected)
    payload = Webhook(app.webhook_secret).verify(body, headers)
    assert payload["event"] == "task.finished"
    assert payload["task_id"] == task_id
    assert payload["status"] == "succeeded"
    assert payload["output"] == {"q": "hello"}
    assert headers["webhook-id"] == f"msg_{uuid.UUID(task_id).hex}_1"
    return payload


# --- URLs, commands, the dashboard ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1:8080/hook", "the scheme must be one of"),
        ("redis://127.0.0.1:6379/0", "missing ?stream=NAME"),
        ("amqp://guest:guest@127.0.0.1:5672/%2F?routing_key=k", "missing ?exchange=NAME"),
        ("nats://127.0.0.1:4222", "missing ?subject=NAME"),
        ("redis://127.0.0.1:6379/zero?stream=s", "the path must be a database number"),
        ("redis://127.0.0.1:port/0?stream=s", "is not a valid URL"),
        ("nats://127.0.0.1:4222?subject=s&queue=q", "unknown parameter(s) queue"),
        ("redis:///0?stream=s", "no host"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url, complaint):
    with pytest.raises(destinations.InvalidDestination) as caught:
        destinations.parse(url)
    assert complaint in str(caught.value)


def test_forms_parse_and_passwords_are_masked():
    amqp = destinations.parse("amqp://u:s3cret@mq:5672/%2F?exchange=results&routing_key=tasks.done")
    assert (amqp.kind, amqp.name, amqp.routing_key) == ("amqp", "results", "tasks.done")
    assert amqp.connection_url == "amqp://u:s3cret@mq:5672/%2F"
    assert destinations.parse("nats://n:4222?subject=results").connection_url == "nats://n:4222"
    assert (
        destinations.parse("redis://r:6379/3?stream=results").connection_url == "redis://r:6379/3"
    )
    masked = destinations.mask_url("amqp://u:s3cret@mq:5672/%2F?exchange=results")
    assert masked == "amqp://u:***@mq:5672/%2F?exchange=results"
    with pytest.raises(destinations.InvalidDestination) as caught:
        destinations.parse("amqp://u:s3cret@mq/?exchange=e&x=1")
    assert "s3cret" not in str(caught.value)


def test_setapplication_adds_clears_and_refuses_bad_urls_changing_nothing(make_app):
    app = make_app()
    app_id = str(app.application.pk)
    good = ["redis://127.0.0.1:6379/0?stream=a", "nats://127.0.0.1:4222?subject=b"]
    out = StringIO()
    call_command("setapplication", app_id, "--destination", good[0], "--destination", good[1],
                 stdout=out)  # fmt: skip
    assert "--destination" in out.getvalue() and "stream=a (ok)" in out.getvalue()
    assert sorted(Destination.objects.values_list("kind", "url")) == [
        ("nats", good[1]), ("redis", good[0])
    ]  # fmt: skip

    with pytest.raises(CommandError) as caught:
        call_command("setapplication", app_id, "--clear-destinations",
                     "--destination", "nats://127.0.0.1:4222", stdout=StringIO())  # fmt: skip
    assert str(caught.value) == "--destination: 'nats://127.0.0.1:4222': missing ?subject=NAME"
    assert Destination.objects.count() == 2  # the clear did not happen either

    call_command("setapplication", app_id, "--clear-destinations", "--destination",
                 "amqp://guest:pw@127.0.0.1:5672/%2F?exchange=e", stdout=out)  # fmt: skip
    assert list(Destination.objects.values_list("kind", flat=True)) == ["amqp"]
    described = StringIO()
    call_command("setapplication", app_id, "--json", stdout=described)
    shown = json.loads(described.getvalue())["destinations"]
    assert shown[0]["url"] == "amqp://guest:***@127.0.0.1:5672/%2F?exchange=e"
    assert "pw@" not in described.getvalue()


def test_createapplication_takes_destinations(make_app):
    out = StringIO()
    call_command("createapplication", "buses", "--runner", "echo", "--json",
                 "--destination", "redis://127.0.0.1:6379/0?stream=s", stdout=out)  # fmt: skip
    app_id = json.loads(out.getvalue())["app_id"]
    assert Destination.objects.get(application_id=app_id).kind == "redis"
    with pytest.raises(CommandError, match="--destination: 'ftp://x/': the scheme"):
        call_command("createapplication", "bad", "--runner", "echo",
                     "--destination", "ftp://x/", stdout=StringIO())  # fmt: skip


def test_application_page_lists_destinations_with_health_and_no_password(make_app):
    app = make_app()
    destination = with_destination(app, "amqp://guest:topsecret@127.0.0.1:5672/%2F?exchange=e")
    Destination.objects.filter(pk=destination.pk).update(consecutive_failures=3)
    user = User.objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    client = Client()
    client.force_login(user)
    page = client.get(f"/applications/{app.application.pk}/").content.decode()
    assert "amqp://guest:***@127.0.0.1:5672/%2F?exchange=e" in page
    assert "3 failing in a row" in page
    assert "topsecret" not in page


# --- the reconciler's hook --------------------------------------------------------------------


def test_reconciler_resumes_lost_first_attempts_and_retries(make_app, private_queues):
    app = make_app()
    destination = with_destination(app, "redis://127.0.0.1:1/0?stream=s")
    Destination.objects.filter(pk=destination.pk).update(
        created_at=timezone.now() - timedelta(hours=1)
    )
    long_ago = timezone.now() - timedelta(minutes=5)
    never = Task.objects.create(application=app.application, status=TaskStatus.SUCCEEDED,
                                finished_at=long_ago, output={})  # fmt: skip
    retrying = Task.objects.create(application=app.application, status=TaskStatus.SUCCEEDED,
                                   finished_at=long_ago, output={})  # fmt: skip
    DestinationAttempt.objects.create(
        destination=destination, task=retrying, run=1, number=1, trigger=AttemptTrigger.AUTO,
        started_at=long_ago, error="refused", next_attempt_at=long_ago,
    )  # fmt: skip
    assert destinations.resume_lost() == 2
    queued = set(Queue(settings.CALLBACK_QUEUE, connection=redis_client()).job_ids)
    assert queued == {
        f"dst-{destination.pk}-t{never.pk.hex}-1-a1",
        f"dst-{destination.pk}-t{retrying.pk.hex}-1-a2",
    }
    assert destinations.resume_lost() == 0  # the jobs wait: nothing lost any more


@pytest.fixture
def scheduled(private_queues, settings) -> Iterator[ScheduledJobRegistry]:
    """The private callbacks queue's scheduled jobs, emptied around the test (private_queues
    empties only the queue itself)."""
    registry = ScheduledJobRegistry(queue=Queue(settings.CALLBACK_QUEUE, connection=redis_client()))

    def drop() -> None:
        for job_id in registry.get_job_ids():
            registry.remove(job_id, delete_job=True)

    drop()
    yield registry
    drop()


def test_a_failed_publish_schedules_the_retry_and_a_success_settles_health(make_app, scheduled):
    app = make_app(retry_schedule=[30])
    port = free_port()
    destination = with_destination(app, f"redis://127.0.0.1:{port}/0?stream=results")
    task = Task.objects.create(application=app.application, status=TaskStatus.SUCCEEDED,
                               finished_at=timezone.now(), output={"q": "hello"})  # fmt: skip
    args = {"destination_id": destination.pk, "task_id": str(task.pk), "run": 1}
    assert destinations.deliver(**args, trigger="auto", auto_attempt=1) == "retrying"
    assert scheduled.get_job_ids() == [f"dst-{destination.pk}-t{task.pk.hex}-1-a2"]
    first = DestinationAttempt.objects.get()
    assert "Connection refused" in first.error and first.next_attempt_at is not None
    destination.refresh_from_db()
    assert destination.consecutive_failures == 1 and destination.last_failure_at

    with redis_server(port) as server:
        assert destinations.deliver(**args, trigger="auto", auto_attempt=2) == "delivered"
        [(_, fields)] = server.xrange("results")
    assert json.loads(fields[b"body"])["task_id"] == str(task.pk)
    destination.refresh_from_db()
    assert destination.consecutive_failures == 0 and destination.last_success_at
    assert not DestinationAttempt.objects.filter(next_attempt_at__isnull=False).exists()
    # The same automatic attempt again (a duplicate job) publishes nothing more.
    assert destinations.deliver(**args, trigger="auto", auto_attempt=2).startswith("skipped")


@contextlib.contextmanager
def redis_server(port: int) -> Iterator[redis.Redis]:
    """A real redis-server on `port`, started late: the destination comes up."""
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", "/tmp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(up, timeout=10)
        yield client
    finally:
        process.terminate()
        process.wait(10)


def test_a_batch_end_publishes_its_batch_finished(make_app, client, private_queues):
    app = make_app()
    name = f"taskhook-test-{uuid.uuid4().hex}"
    destination = with_destination(app, stream_url(name))
    batch_id = submit_batch(client, app, [{"inputs": {"n": n}} for n in range(2)])["batch_id"]
    Task.objects.filter(batch_id=batch_id).update(status="succeeded", finished_at=timezone.now())
    assert completion.settle(batch_id=batch_id)
    job_id = f"dst-{destination.pk}-b{uuid.UUID(batch_id).hex}-1-a1"
    assert job_id in Queue(settings.CALLBACK_QUEUE, connection=redis_client()).job_ids
    # The job, run here: the item-level publishes are the tests below, through a worker.
    args = {"destination_id": destination.pk, "batch_id": batch_id, "run": 1}
    client_redis = redis_client()
    try:
        assert destinations.deliver(**args, trigger="auto", auto_attempt=1) == "delivered"
        [(_, fields)] = client_redis.xrange(name)
    finally:
        client_redis.delete(name)
    headers = {key.decode(): value.decode() for key, value in fields.items() if key != b"body"}
    payload = Webhook(app.webhook_secret).verify(fields[b"body"], headers)
    assert payload["event"] == "batch.finished" and payload["batch_id"] == batch_id
    assert payload["counts"]["succeeded"] == 2
    assert headers["webhook-id"] == f"msg_batch_{uuid.UUID(batch_id).hex}_1"
    [attempt] = DestinationAttempt.objects.filter(batch_id=batch_id)
    assert attempt.delivered and attempt.task_id is None


# --- end to end, through a real worker --------------------------------------------------------


@pytest.mark.processes
def test_redis_stream_consumer_reads_and_verifies(make_app, live_worker):
    app = make_app()
    name = f"taskhook-test-{uuid.uuid4().hex}"
    destination = with_destination(app, stream_url(name))
    task_id = submit(app)
    published(task_id, destination)
    client = redis_client()
    try:
        [(_, [(_, fields)])] = client.xread({name: "0"}, count=10, block=1000)
        headers = {key.decode(): value.decode() for key, value in fields.items() if key != b"body"}
        assert set(headers) == {
            "webhook-id", "webhook-timestamp", "webhook-signature", "x-dify-signature-v1"
        }  # fmt: skip
        verify(app, fields[b"body"], headers, task_id)

        # Redelivery (the task page's button) publishes again, as a manual attempt.
        assert callbacks.redeliver(task_ids=[task_id]) == [uuid.UUID(task_id)]
        attempts = published(task_id, destination, count=2)
        assert [a.trigger for a in attempts] == ["auto", "manual"]
        assert client.xlen(name) == 2
    finally:
        client.delete(name)


@pytest.mark.processes
def test_rabbitmq_consumer_receives_confirmed_message_and_verifies(make_app, live_worker):
    if not reachable(RABBITMQ):
        pytest.skip("RabbitMQ is not reachable at 127.0.0.1:5672")
    import pika

    exchange = f"taskhook-test-{uuid.uuid4().hex}"
    connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"))
    channel = connection.channel()
    try:
        channel.exchange_declare(exchange, exchange_type="direct", auto_delete=False)
        queue_name = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue_name, exchange, routing_key="tasks.finished")
        app = make_app()
        destination = with_destination(
            app, f"amqp://guest:guest@127.0.0.1:5672/%2F?exchange={exchange}"
            "&routing_key=tasks.finished",
        )  # fmt: skip
        task_id = submit(app)
        published(task_id, destination)
        method, properties, body = channel.basic_get(queue_name, auto_ack=True)
        assert method is not None, "the confirmed message is not in the bound queue"
        assert properties.content_type == "application/json"
        headers = {key: str(value) for key, value in properties.headers.items()}
        assert properties.message_id == headers["webhook-id"]
        verify(app, body, headers, task_id)
    finally:
        channel.exchange_delete(exchange)
        connection.close()


@pytest.mark.processes
def test_rabbitmq_unroutable_message_is_a_failed_attempt(make_app, live_worker):
    if not reachable(RABBITMQ):
        pytest.skip("RabbitMQ is not reachable at 127.0.0.1:5672")
    app = make_app(retry_schedule=[])
    destination = with_destination(
        app, "amqp://guest:guest@127.0.0.1:5672/%2F?exchange=amq.direct&routing_key=nobody-here"
    )
    task_id = submit(app)
    attempt = wait_for(lambda: DestinationAttempt.objects.filter(task_id=task_id).first())
    assert not attempt.delivered
    assert "no queue is bound to exchange 'amq.direct'" in attempt.error
    destination.refresh_from_db()
    assert destination.consecutive_failures == 1


@pytest.mark.processes
def test_nats_jetstream_consumer_receives_acked_message_and_verifies(make_app, live_worker):
    if not reachable(NATS):
        pytest.skip("NATS is not reachable at 127.0.0.1:4222")
    import nats

    suffix = uuid.uuid4().hex
    stream, subject = f"TASKHOOK_TEST_{suffix}", f"taskhook.test.{suffix}"

    async def create() -> None:
        client = await nats.connect("nats://127.0.0.1:4222")
        await client.jetstream().add_stream(name=stream, subjects=[subject])
        await client.close()

    async def consume() -> list:
        client = await nats.connect("nats://127.0.0.1:4222")
        try:
            subscription = await client.jetstream().pull_subscribe(subject, durable="test")
            messages = await subscription.fetch(10, timeout=2)
            for message in messages:
                await message.ack()
            return messages
        finally:
            await client.jetstream().delete_stream(stream)
            await client.close()

    asyncio.run(create())
    app = make_app()
    destination = with_destination(app, f"nats://127.0.0.1:4222?subject={subject}")
    task_id = submit(app)
    published(task_id, destination)
    # A redelivery within JetStream's duplicate window carries the same Nats-Msg-Id: acked, and
    # dropped by the stream as the copy it is.
    callbacks.redeliver(task_ids=[task_id])
    published(task_id, destination, count=2)
    [message] = asyncio.run(consume())
    headers = dict(message.headers)
    assert headers["Nats-Msg-Id"] == headers["webhook-id"]
    verify(app, message.data, headers, task_id)


@pytest.mark.processes
def test_down_destination_is_retried_until_it_comes_up(make_app, live_worker):
    app = make_app(retry_schedule=[1] * 20)
    port = free_port()
    destination = with_destination(app, f"redis://127.0.0.1:{port}/0?stream=results")
    task_id = submit(app)
    wait_for(lambda: DestinationAttempt.objects.filter(task_id=task_id).count() >= 2)
    with redis_server(port) as server:
        attempts = published(task_id, destination)
        [(_, fields)] = server.xrange("results")
    verify(app, fields[b"body"], {k.decode(): v.decode() for k, v in fields.items()
                                  if k != b"body"}, task_id)  # fmt: skip
    failed = [a for a in DestinationAttempt.objects.filter(task_id=task_id) if not a.delivered]
    assert len(failed) >= 2 and all("Connection refused" in a.error for a in failed)
    assert attempts[0].number == len(failed) + 1
    destination.refresh_from_db()
    assert destination.consecutive_failures == 0 and destination.last_failure_at


@pytest.mark.processes
def test_down_destination_fails_after_the_schedule(make_app, live_worker):
    app = make_app(retry_schedule=[1, 1])
    port = free_port()
    destination = with_destination(app, f"nats://127.0.0.1:{port}?subject=results")
    task_id = submit(app)
    rows = wait_for(lambda: (found := list(DestinationAttempt.objects.filter(task_id=task_id)))
                    and len(found) == 3 and found)  # fmt: skip
    assert [a.number for a in rows] == [1, 2, 3]
    assert not any(a.delivered for a in rows)
    assert rows[-1].next_attempt_at is None  # the schedule is over: nothing more comes
    destination.refresh_from_db()
    assert destination.consecutive_failures == 3
