"""Destinations beyond HTTP (README: Destinations): a Redis Stream, a RabbitMQ exchange or a NATS
JetStream subject an application's finished tasks (and its batches' `batch.finished`) are
published to, besides (or instead of) its webhooks.

A message carries the webhook's exact body bytes and its signature values (`webhook-id`,
`webhook-timestamp`, `webhook-signature`, `x-dify-signature-v1` when HMAC signs) as fields,
headers or properties, so a consumer verifies it as a webhook receiver does. A publish counts as
delivered only when the broker took it: XADD returned an entry id, RabbitMQ confirmed it (and
routed it to a queue: published `mandatory`), JetStream acked it.

Each (task run or batch completion, destination) is its own job on the callbacks queue, retried
on the application's retry schedule (tasks.delivery.retry_policy); every attempt is recorded
with the destination's health. The reconciler re-enqueues first attempts and retries whose jobs
vanished.

A destination is isolated and broken like a webhook endpoint, by the same code: a publish takes
one of the destination's `endpoint_max_in_flight` slots (tasks.delivery.endpoints, under the
name `dest-<id>`) or parks in its waiting set, so a broker that accepts connections and never
answers holds at most that many delivery threads, each for at most the bounded time of one
publish (connect, publish and confirm each bounded by the callback timeout: publish). Its
circuit, probes and auto-disable are tasks.delivery.health's (record_destination).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from django.db import DatabaseError, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import get_current_job
from rq.job import Job

from tasks import credentials, jsonsafety
from tasks.applications import cached_application
from tasks.batches.follow import counts_of
from tasks.delivery import endpoints, health, retry_policy, signing
from tasks.execution.worker import KNOWN_WORKERS_KEY, alive_key
from tasks.models import (
    Application,
    AttemptTrigger,
    Batch,
    Destination,
    DestinationAttempt,
    Task,
)
from tasks.plumbing.queueing import delete_job, enqueue_delivery_job, redis_client
from tasks.presenters import batch_callback_body, callback_body
from tasks.statuses import DELIVERABLE

logger = logging.getLogger(__name__)
# pika logs every connection's steps, and a refused one as errors with a traceback: each
# attempt records its own error, one line.
logging.getLogger("pika").setLevel(logging.CRITICAL)

Kind = Destination.Kind
# `unix:` is a Redis socket (the embedded Redis's URL: unix:/path/redis.sock?db=N).
SCHEMES = {"redis": Kind.REDIS, "rediss": Kind.REDIS, "unix": Kind.REDIS, "amqp": Kind.AMQP,
           "amqps": Kind.AMQP, "nats": Kind.NATS, "tls": Kind.NATS}  # fmt: skip
# The query parameter that names where messages go, and the optional ones, per kind.
REQUIRED = {Kind.REDIS: "stream", Kind.AMQP: "exchange", Kind.NATS: "subject"}
OPTIONAL = {Kind.REDIS: (), Kind.AMQP: ("routing_key",), Kind.NATS: ()}
MAX_DESTINATIONS = 10  # per application

# Past the grace a missing attempt is lost, not late (a job waits for a callback worker).
RESUME_GRACE = timedelta(seconds=60)
# Tasks that finished longer ago than this are not looked at for a never-made first attempt.
RESUME_LOOKBACK = timedelta(hours=24)
RESUME_LIMIT = 200  # re-enqueued per rule per reconciler pass
BATCH_ENDED = (Batch.Status.FINISHED, Batch.Status.CANCELLED)  # a batch.finished was due
WAITING_INDEX = endpoints.DESTINATIONS_WAITING_KEY
# The steps of one publish each bounded by the callback timeout: connect, publish, confirm.
PUBLISH_STEPS = 3


class InvalidDestination(ValueError):
    pass


class PublishFailed(Exception):
    """The broker was not reached or did not take the message (what the attempt records)."""


@dataclass(frozen=True)
class Target:
    """Where one destination URL publishes: the broker's URL without Taskhook's parameters,
    and the stream, exchange (with its routing key) or subject."""

    kind: str
    connection_url: str
    name: str
    routing_key: str = ""


# --- URLs -------------------------------------------------------------------------------------


def parse(url: str) -> Target:
    """Check a destination URL; InvalidDestination says what is wrong with it."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 — raises ValueError on a port that is not a number
    except ValueError as exc:
        raise InvalidDestination(f"{mask_url(url)!r} is not a valid URL: {exc}") from exc
    kind = SCHEMES.get(parts.scheme.lower())
    if kind is None:
        schemes = ", ".join(f"{scheme}://" for scheme in SCHEMES)
        raise InvalidDestination(
            f"{mask_url(url)!r}: the scheme must be one of {schemes} (HTTP callbacks are the "
            "callback_url of a submit)"
        )
    unix_socket = parts.scheme.lower() == "unix"
    if not (parts.path if unix_socket else parts.hostname):
        raise InvalidDestination(
            f"{mask_url(url)!r}: no {'socket path' if unix_socket else 'host'}"
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    required = REQUIRED[kind]
    name = query.pop(required, "").strip()
    if not name:
        raise InvalidDestination(f"{mask_url(url)!r}: missing ?{required}=NAME")
    routing_key = query.pop("routing_key", "") if kind == Kind.AMQP else ""
    keep = {"db": query.pop("db")} if unix_socket and query.get("db", "").isdigit() else {}
    if query:
        allowed = ", ".join((required, *OPTIONAL[kind], *(["db"] if unix_socket else [])))
        raise InvalidDestination(
            f"{mask_url(url)!r}: unknown parameter(s) {', '.join(sorted(query))} "
            f"(a {kind} destination takes {allowed})"
        )
    path = parts.path
    if kind == Kind.REDIS and not unix_socket and path.strip("/") and not path.strip("/").isdigit():
        raise InvalidDestination(f"{mask_url(url)!r}: the path must be a database number")
    if kind == Kind.NATS and path.strip("/"):
        raise InvalidDestination(f"{mask_url(url)!r}: a NATS URL has no path")
    connection_url = urlunsplit((parts.scheme, parts.netloc, path, urlencode(keep), ""))
    if unix_socket:  # redis-py wants unix://PATH, the embedded Redis's URL is unix:PATH
        connection_url = f"unix://{path}" + (f"?{urlencode(keep)}" if keep else "")
    return Target(kind=kind, connection_url=connection_url, name=name, routing_key=routing_key)


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by `***`: what is ever shown."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(an invalid URL)"
    if not password:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# --- configuring ------------------------------------------------------------------------------


def check_urls(urls: Sequence[str]) -> list[Target]:
    """Every URL checked before anything changes (InvalidDestination on the first bad one)."""
    return [parse(url) for url in urls]


@transaction.atomic
def set_destinations(
    *, application_id: uuid.UUID | str, add: Sequence[str] = (), clear: bool = False
) -> list[Destination]:
    """Add destinations (a URL it has already is kept once), after removing all when `clear`.
    Bumps the application's `updated_at`: workers see the change at the next task's end."""
    targets = check_urls(add)
    application = Application.objects.select_for_update().get(pk=application_id)
    existing = application.destinations.all()
    if clear:
        existing.delete()
    have = set(existing.values_list("url", flat=True))
    for url, target in zip(add, targets, strict=True):
        if url.strip() not in have:
            have.add(url.strip())
            Destination.objects.create(application=application, kind=target.kind, url=url.strip())
    if len(have) > MAX_DESTINATIONS:
        raise InvalidDestination(f"at most {MAX_DESTINATIONS} destinations per application")
    if add or clear:
        application.save(update_fields=["updated_at"])
    return list(application.destinations.all())


def masked_urls(application_id: uuid.UUID | str) -> list[str]:
    urls = Destination.objects.filter(application_id=application_id).values_list("url", flat=True)
    return [mask_url(url) for url in urls]


# application id -> (its updated_at, enabled destination ids): a worker asks at every task's end.
_enabled: dict[str, tuple[datetime, list[int]]] = {}


def _enabled_ids(application: Application) -> list[int]:
    hit = _enabled.get(str(application.pk))
    if hit and hit[0] == application.updated_at:
        return hit[1]
    ids = list(
        Destination.objects.filter(application_id=application.pk, enabled=True).values_list(
            "pk", flat=True
        )
    )
    _enabled[str(application.pk)] = (application.updated_at, ids)
    return ids


# --- scheduling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """What one publish carries: a task run's `task.finished`, or a batch completion's
    `batch.finished` (`run` is then the completion)."""

    id: uuid.UUID
    run: int
    batch: bool = False

    @property
    def rows(self) -> dict[str, Any]:
        """Its attempts' filter."""
        return {"batch_id" if self.batch else "task_id": self.id, "run": self.run}

    def job_id(self, destination_id: int, auto_attempt: int | None) -> str:
        """Automatic attempts have one id each (a second enqueue is refused); manual ones are
        always new."""
        suffix = f"a{auto_attempt}" if auto_attempt else f"m{secrets.token_hex(6)}"
        kind = "b" if self.batch else "t"
        return f"dst-{destination_id}-{kind}{self.id.hex}-{self.run}-{suffix}"


def _item(*, task_id: uuid.UUID | str | None, batch_id: uuid.UUID | str | None, run: int) -> Item:
    if batch_id is not None:
        return Item(uuid.UUID(str(batch_id)), run, batch=True)
    return Item(uuid.UUID(str(task_id)), run)


@dataclass(frozen=True)
class ParkedPublish:
    """A publish waiting in its destination's waiting set (its cap or circuit): enough to
    enqueue it again. `job_id` is its first job's (a promoted copy gets `-p<hex>` after it)."""

    destination_id: int
    item: Item
    trigger: str
    auto_attempt: int | None
    job_id: str

    def encode(self) -> str:
        # The item first, so `_is_parked` finds any publish of an item by prefix.
        kind = "b" if self.item.batch else "t"
        return json.dumps([kind, str(self.item.id), self.item.run, self.destination_id,
                           self.trigger, self.auto_attempt, self.job_id],
                          separators=(",", ":"))  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes | str) -> ParkedPublish:
        kind, item_id, run, destination_id, trigger, auto_attempt, job_id = json.loads(raw)
        item = Item(uuid.UUID(item_id), run, batch=kind == "b")
        return cls(destination_id, item, trigger, auto_attempt, job_id)


def _is_parked(destination_id: int, item: Item) -> bool:
    """Whether a publish of the item waits on the destination (the reconciler leaves it)."""
    kind = "b" if item.batch else "t"
    return endpoints.has_parked(endpoint=health.destination_key(destination_id),
                                pattern=f'\\["{kind}","{item.id}",{item.run},*')  # fmt: skip


def publish_seconds(application: Application) -> float:
    """The longest one publish may take (what its slot is held for)."""
    return PUBLISH_STEPS * application.callback_timeout_seconds


def _enqueue(
    *,
    destination_id: int,
    item: Item,
    application: Application,
    trigger: str,
    auto_attempt: int | None = None,
    delay: float = 0.0,
    job_id: str = "",
    at_front: bool = False,
) -> bool:
    """One publish job on the callbacks queue (now or after `delay` seconds); False when it is
    there already or Redis is away (the reconciler schedules it from the database)."""
    task_id, batch_id = (None, str(item.id)) if item.batch else (str(item.id), None)
    what = f"{'batch' if item.batch else 'task'} {item.id} run {item.run}"
    try:
        return enqueue_delivery_job(
            "tasks.jobs.deliver_to_destination",
            job_id=job_id or item.job_id(destination_id, auto_attempt),
            delay=delay,
            at_front=at_front,
            args=(destination_id, task_id, item.run, trigger, auto_attempt, batch_id),
            job_timeout=math.ceil(publish_seconds(application)) + 30,
            failure_ttl=application.retention_hours * 3600,
            description=f"destination {destination_id} {what} ({trigger})",
        )
    except redis.RedisError:
        logger.warning("could not schedule a destination publish; the reconciler will",
                       extra={"item": what, "destination_id": destination_id},
                       exc_info=True)  # fmt: skip
        return False


def schedule_first(
    *, task_id: uuid.UUID | str, run: int, application: Application | None = None
) -> int:
    """After a task finished (executor.on_task_finished): attempt 1 to each enabled destination
    of its application. Returns how many were enqueued; never raises (the reconciler catches
    up)."""
    try:
        if application is None:
            found = Task.objects.filter(pk=task_id).values_list("application_id", flat=True)
            if (application_id := found.first()) is None:
                return 0
            application = cached_application(application_id)
        return _enqueue_first(_item(task_id=task_id, batch_id=None, run=run), application)
    except DatabaseError:
        logger.warning("could not schedule destination publishes of task %s", task_id,
                       exc_info=True)  # fmt: skip
        return 0


def schedule_batch(*, batch_id: uuid.UUID | str) -> int:
    """After a batch finished (tasks.batches.completion): its `batch.finished` to each enabled
    destination, once per completion. Never raises (the reconciler catches up)."""
    try:
        found = Batch.objects.filter(pk=batch_id).values_list("application_id", "completions")
        if (row := found.first()) is None:
            return 0
        application = cached_application(row[0])
        return _enqueue_first(_item(task_id=None, batch_id=batch_id, run=row[1]), application)
    except DatabaseError:
        logger.warning("could not schedule destination publishes of batch %s", batch_id,
                       exc_info=True)  # fmt: skip
        return 0


def _enqueue_first(item: Item, application: Application) -> int:
    return sum(
        _enqueue(destination_id=destination_id, item=item, application=application,
                 trigger=AttemptTrigger.AUTO, auto_attempt=1)
        for destination_id in _enabled_ids(application)
    )  # fmt: skip


# False inside `webhooks_only()`: a recover redelivers webhooks through callbacks.redeliver and
# republishes each destination's own failures itself, never to a destination that has the message.
_republishing: ContextVar[bool] = ContextVar("destinations_republishing", default=True)


@contextlib.contextmanager
def webhooks_only() -> Iterator[None]:
    """Within it, `redeliver` (which callbacks.redeliver calls) publishes nothing."""
    token = _republishing.set(False)
    try:
        yield
    finally:
        _republishing.reset(token)


def redeliver(*, task_ids: Sequence[uuid.UUID | str]) -> list[uuid.UUID]:
    """Operator's redelivery: one `manual` publish now to each enabled destination of each
    finished task. Returns the ids of the tasks with at least one publish enqueued."""
    if not _republishing.get():
        return []
    tasks = Task.objects.filter(pk__in=task_ids, status__in=DELIVERABLE).only(
        "id", "run", "application_id"
    )
    enqueued: list[uuid.UUID] = []
    for task in tasks:
        application = cached_application(task.application_id)
        destination_ids = Destination.objects.filter(
            application_id=task.application_id, enabled=True
        ).values_list("pk", flat=True)
        made = [
            _enqueue(destination_id=destination_id, item=Item(task.id, task.run),
                     application=application, trigger=AttemptTrigger.MANUAL)
            for destination_id in destination_ids
        ]  # fmt: skip
        if any(made):
            enqueued.append(task.id)
    return enqueued


# --- one attempt ------------------------------------------------------------------------------


def message(item: Item) -> tuple[Application, bytes, dict[str, str]] | None:
    """The item's application, its webhook's body bytes and signature values keyed in
    lowercase (the Standard Webhooks names; `x-dify-signature-v1` when HMAC signs); None when
    the item is gone or moved on (a task re-run, a batch reopened)."""
    if item.batch:
        batch = Batch.objects.filter(
            pk=item.id, completions=item.run, status__in=BATCH_ENDED
        ).first()
        if batch is None:
            return None
        payload = batch_callback_body(batch, counts=counts_of(batch_id=batch.id))
        message_id = signing.batch_webhook_id(batch.id, batch.completions)
        application_id = batch.application_id
    else:
        task = Task.objects.filter(pk=item.id, run=item.run, status__in=DELIVERABLE).first()
        if task is None:
            return None
        payload, message_id = callback_body(task), signing.webhook_id(task.id, task.run)
        application_id = task.application_id
    application = cached_application(application_id)
    body = signing.encode_body(payload)
    headers = signing.signature_headers(
        **credentials.signing_material(application),
        message_id=message_id,
        timestamp=int(time.time()),
        body=body,
    )
    return application, body, {name.lower(): value for name, value in headers.items()}


def publish(target: Target, *, body: bytes, headers: dict[str, str], timeout: float) -> None:
    """Publish one message; returns once the broker took it, raises otherwise."""
    if target.kind == Kind.REDIS:
        _publish_redis(target, body=body, headers=headers, timeout=timeout)
    elif target.kind == Kind.AMQP:
        _publish_amqp(target, body=body, headers=headers, timeout=timeout)
    else:
        # A private event loop per publish: delivery threads have none of their own.
        publishing = _publish_nats(target, body=body, headers=headers, timeout=timeout)
        asyncio.run(asyncio.wait_for(publishing, timeout=3 * timeout))


def _publish_redis(target: Target, *, body: bytes, headers: dict[str, str], timeout: float) -> None:
    # No retry: redis-py retries a timed-out command 3 times by default, which would multiply
    # the bound and could add the entry twice; the attempt's own retry policy decides.
    client = redis.Redis.from_url(
        target.connection_url, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    try:
        fields: dict[str | bytes, str | bytes] = {"body": body}
        fields.update(headers)
        client.xadd(target.name, fields)  # type: ignore[arg-type]  # redis-py's narrow Mapping
    finally:
        client.close()


def _publish_amqp(target: Target, *, body: bytes, headers: dict[str, str], timeout: float) -> None:
    import pika  # only callback workers publish
    from pika.exceptions import AMQPConnectionError, UnroutableError

    parameters = pika.URLParameters(target.connection_url)
    parameters.socket_timeout = timeout
    parameters.stack_timeout = timeout
    parameters.blocked_connection_timeout = timeout
    parameters.connection_attempts = 1
    # A broker that goes silent after the handshake (a confirm that never comes): pika closes a
    # connection that received nothing for a heartbeat interval (checked every interval + 5 s).
    parameters.heartbeat = max(1, math.ceil(timeout))
    try:
        connection = pika.BlockingConnection(parameters)
    except AMQPConnectionError as exc:  # its own text is often empty
        detail = str(exc) or "; ".join(map(str, exc.args)) or "refused"
        raise PublishFailed(
            f"could not connect to {parameters.host}:{parameters.port}: {detail}"
        ) from exc
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish waits for the broker's ack (or raises)
        properties = pika.BasicProperties(
            content_type="application/json",
            message_id=headers["webhook-id"],
            timestamp=int(headers["webhook-timestamp"]),
            delivery_mode=pika.DeliveryMode.Persistent,
            headers=headers,
        )
        # mandatory: a message no queue is bound to receive comes back as UnroutableError.
        try:
            channel.basic_publish(target.name, target.routing_key, body, properties, mandatory=True)
        except UnroutableError as exc:
            raise PublishFailed(
                f"no queue is bound to exchange {target.name!r} for routing key "
                f"{target.routing_key!r}: the message was returned"
            ) from exc
    finally:
        with contextlib.suppress(Exception):
            connection.close()


async def _publish_nats(
    target: Target, *, body: bytes, headers: dict[str, str], timeout: float
) -> None:
    import nats  # only callback workers publish
    from nats.js.errors import NoStreamResponseError

    async def quiet(_error: Exception) -> None:  # the publish's own exception reports it
        return None

    client = await nats.connect(
        target.connection_url,
        connect_timeout=timeout,
        allow_reconnect=False,
        max_reconnect_attempts=1,  # 0 would mean "try for ever" to nats-py
        reconnect_time_wait=0.1,
        error_cb=quiet,
    )
    try:
        # Nats-Msg-Id: JetStream drops a second copy of the same run within its duplicate window.
        await client.jetstream(timeout=timeout).publish(
            target.name, body, timeout=timeout,
            headers={**headers, "Nats-Msg-Id": headers["webhook-id"]},
        )  # fmt: skip
    except NoStreamResponseError as exc:
        raise PublishFailed(f"no JetStream stream takes subject {target.name!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def deliver(
    *,
    destination_id: int,
    task_id: uuid.UUID | str | None = None,
    batch_id: uuid.UUID | str | None = None,
    run: int,
    trigger: str,
    auto_attempt: int | None = None,
    job_id: str = "",
) -> str:
    """Make one publish attempt of a task run (or a batch completion) if the destination has a
    free slot and its circuit lets it through (else park it), record it with the destination's
    health, and schedule the next automatic one if it failed and the policy says so."""
    item = _item(task_id=task_id, batch_id=batch_id, run=run)
    auto = trigger == AttemptTrigger.AUTO
    attempts = DestinationAttempt.objects.filter(destination_id=destination_id, **item.rows)
    destination = Destination.objects.filter(pk=destination_id, enabled=True).first()
    skipped = ""
    if destination is None:
        skipped = "skipped: destination gone or disabled"
    elif auto and (
        attempts.filter(trigger=AttemptTrigger.AUTO).count() >= (auto_attempt or 1)
        or attempts.filter(delivered=True).exists()
    ):
        skipped = "skipped: attempt already made or published"
    if skipped or destination is None:
        return _nothing_awaits(attempts, auto, skipped)
    application = cached_application(destination.application_id)
    name, cap = health.destination_key(destination.pk), application.endpoint_max_in_flight
    if not job_id:
        job = get_current_job()
        job_id = job.id if job else f"direct-{secrets.token_hex(6)}"
    parked = ParkedPublish(destination.pk, item, trigger, auto_attempt, job_id.split("-p", 1)[0])
    taken = endpoints.acquire_or_park(
        endpoint=name, cap=cap, job_id=job_id, hold_seconds=publish_seconds(application),
        parked=parked, index=WAITING_INDEX,
    )  # fmt: skip
    if taken == endpoints.PARKED:
        return (
            "parked: the destination's circuit is open or its publishes in flight are at their cap"
        )
    if taken == endpoints.REFUSED:
        return _nothing_awaits(attempts, auto, "failed: destination disabled")
    try:
        return _publish_now(destination, item, trigger=trigger, auto_attempt=auto_attempt)
    finally:
        enqueue_promoted(endpoints.release_encoded(endpoint=name, cap=cap, job_id=job_id,
                                                   index=WAITING_INDEX))  # fmt: skip


def _nothing_awaits(attempts, auto: bool, outcome: str) -> str:
    if auto:  # nothing awaits a retry any more: the reconciler must not resume one
        attempts.filter(next_attempt_at__isnull=False).update(next_attempt_at=None)
    return outcome


def _publish_now(
    destination: Destination, item: Item, *, trigger: str, auto_attempt: int | None
) -> str:
    auto = trigger == AttemptTrigger.AUTO
    attempts = DestinationAttempt.objects.filter(destination_id=destination.pk, **item.rows)
    made = message(item)
    if made is None:
        return _nothing_awaits(attempts, auto, "skipped: its item gone or moved on")
    application, body, headers = made
    started_at = timezone.now()
    started = time.monotonic()
    error = ""
    try:
        publish(parse(destination.url), body=body, headers=headers,
                timeout=application.callback_timeout_seconds)  # fmt: skip
    except Exception as exc:  # a broker's refusal, a timeout, a bad URL: all an attempt's error
        error = jsonsafety.clean_text(f"{type(exc).__name__}: {exc}".strip(": "))[:2000]
    duration_ms = int((time.monotonic() - started) * 1000)
    delivered = not error
    delay = None
    if auto and not delivered:
        delay = retry_policy.next_delay(
            schedule=list(application.retry_schedule),
            auto_attempt=auto_attempt or 1,
            status_code=None,
        )
    now = timezone.now()
    with transaction.atomic():
        if auto and (auto_attempt or 1) > 1:  # the retry the previous attempt awaited is made
            attempts.filter(next_attempt_at__isnull=False).update(next_attempt_at=None)
        DestinationAttempt.objects.create(
            destination=destination, **item.rows, number=attempts.count() + 1,
            trigger=trigger, started_at=started_at, delivered=delivered, error=error,
            duration_ms=duration_ms,
            next_attempt_at=now + timedelta(seconds=delay) if delay is not None else None,
        )  # fmt: skip
        health.record_destination(destination_id=destination.pk, delivered=delivered,
                                  circuit_failures=application.circuit_failures)  # fmt: skip
    log_extra = {"item": f"{item.id} run {item.run}", "destination_id": destination.pk,
                 "trigger": trigger}  # fmt: skip
    if delivered:
        logger.info("published to destination", extra=log_extra)
        return "delivered"
    logger.info("destination publish failed: %s", error, extra=log_extra)
    if delay is None:
        return "failed"
    _enqueue(destination_id=destination.pk, item=item, application=application,
             trigger=AttemptTrigger.AUTO, auto_attempt=(auto_attempt or 1) + 1,
             delay=delay)  # fmt: skip
    return "retrying"


def enqueue_promoted(promoted: list[bytes]) -> None:
    """Parked publishes whose turn came, oldest first: each goes to the front of the queue, so
    the newest goes first and the oldest ends up in front."""
    for raw in reversed(promoted):
        enqueue_parked(ParkedPublish.decode(raw))


def enqueue_parked(parked: ParkedPublish) -> None:
    """A parked publish whose turn came (or the probe): back on the callbacks queue, at the
    front (it waited already), under a new id (its old job may still be ending)."""
    found = Destination.objects.filter(pk=parked.destination_id).values_list(
        "application_id", flat=True
    )
    if (application_id := found.first()) is None:
        return
    _enqueue(destination_id=parked.destination_id, item=parked.item,
             application=cached_application(application_id), trigger=parked.trigger,
             auto_attempt=parked.auto_attempt, at_front=True,
             job_id=f"{parked.job_id}-p{secrets.token_hex(4)}")  # fmt: skip


def promote_parked() -> int:
    """Reconciler: enqueue parked publishes of destinations whose slots freed without a release
    (a worker died holding one). Returns how many were enqueued."""
    promoted = 0
    for name in endpoints.endpoints_with_waiting(WAITING_INDEX):
        found = Destination.objects.filter(pk=int(name.removeprefix("dest-"))).values_list(
            "application_id", flat=True
        )
        application_id = found.first()
        cap = cached_application(application_id).endpoint_max_in_flight if application_id else 0
        waiting = endpoints.release_encoded(endpoint=name, cap=max(cap, 1), index=WAITING_INDEX)
        enqueue_promoted(waiting)
        promoted += len(waiting)
    return promoted


# --- recover since T ----------------------------------------------------------------------------


def failed_since(
    *, destination_id: int, since: datetime, batch_size: int = 500
) -> Iterator[list[Item]]:
    """The items (current task runs and batch completions) whose latest attempt to the
    destination failed since `since` and none of whose attempts to it was published, in
    batches by their latest attempt's id."""
    attempts = DestinationAttempt.objects.filter(destination_id=destination_id)
    for column, current in (("task_id", "task__run"), ("batch_id", "batch__completions")):
        later_or_published = attempts.filter(
            Q(delivered=True) | Q(pk__gt=OuterRef("pk")),
            **{column: OuterRef(column)}, run=OuterRef("run"),
        )  # fmt: skip
        rows = (
            attempts.filter(**{f"{column}__isnull": False}, started_at__gte=since,
                            delivered=False, run=F(current))
            .exclude(Exists(later_or_published))
            .order_by("pk")
        )  # fmt: skip
        after = 0
        while found := list(
            rows.filter(pk__gt=after).values_list("pk", column, "run")[:batch_size]
        ):
            after = found[-1][0]
            yield [Item(item_id, run, batch=column == "batch_id") for _, item_id, run in found]


def republish(*, destination_id: int, items: Sequence[Item]) -> int:
    """A recover's publishes: one `manual` publish of each item to the destination (parked
    like any other while its circuit is open). Returns how many were enqueued."""
    found = Destination.objects.filter(pk=destination_id, enabled=True).values_list(
        "application_id", flat=True
    )
    if (application_id := found.first()) is None:
        return 0
    application = cached_application(application_id)
    return sum(
        _enqueue(destination_id=destination_id, item=item, application=application,
                 trigger=AttemptTrigger.MANUAL)
        for item in items
    )  # fmt: skip


# --- the reconciler's hook --------------------------------------------------------------------


def resume_lost() -> int:
    """Re-enqueue automatic publishes whose jobs vanished (Redis lost them, or a worker died
    mid-attempt): retries overdue past the grace, and first attempts never recorded for tasks
    and batches that finished within the lookback; a publish parked on its destination's cap
    or circuit is waiting, not lost. Also promotes the parked publishes of destinations whose
    slots expired (promote_parked). Returns how many were enqueued."""
    now = timezone.now()
    resumed = promote_parked()
    overdue = (
        DestinationAttempt.objects.filter(
            next_attempt_at__lt=now - RESUME_GRACE, destination__enabled=True
        )
        .select_related("destination")
        .order_by("next_attempt_at")[:RESUME_LIMIT]
    )
    for attempt in overdue:
        item = _item(task_id=attempt.task_id, batch_id=attempt.batch_id, run=attempt.run)
        done = DestinationAttempt.objects.filter(
            destination_id=attempt.destination_id, **item.rows, trigger=AttemptTrigger.AUTO
        ).count()
        resumed += _resume(attempt.destination, item, done + 1)
    for destination in Destination.objects.filter(enabled=True):
        made = DestinationAttempt.objects.filter(destination_id=destination.pk)
        window = {
            "application_id": destination.application_id,
            "finished_at__gte": max(destination.created_at, now - RESUME_LOOKBACK),
            "finished_at__lt": now - RESUME_GRACE,
        }
        tasks = (
            Task.objects.filter(status__in=DELIVERABLE, **window)
            .exclude(Exists(made.filter(task_id=OuterRef("pk"), run=OuterRef("run"))))
            .values_list("pk", "run")[:RESUME_LIMIT]
        )
        batches = (
            Batch.objects.filter(status__in=BATCH_ENDED, **window)
            .exclude(Exists(made.filter(batch_id=OuterRef("pk"), run=OuterRef("completions"))))
            .values_list("pk", "completions")[:RESUME_LIMIT]
        )
        for task_id, run in tasks:
            resumed += _resume(destination, Item(task_id, run), 1)
        for batch_id, completion in batches:
            resumed += _resume(destination, Item(batch_id, completion, batch=True), 1)
    return resumed


def _abandoned(job_id: str) -> bool:
    """A job still marked started whose Taskhook worker is gone (its liveness key expired,
    tasks.execution.worker): it will never record its attempt."""
    client = redis_client()
    status, worker = cast(
        list[bytes | None], client.hmget(Job.key_for(job_id), "status", "worker_name")
    )
    if status != b"started" or not worker:
        return False
    name = worker.decode()
    return bool(client.sismember(KNOWN_WORKERS_KEY, name)) and not client.exists(alive_key(name))


def _resume(destination: Destination, item: Item, auto_attempt: int) -> int:
    if _is_parked(destination.pk, item):
        return 0
    # An ended job of the same id would refuse the unique enqueue every pass; so would one still
    # marked started whose worker was killed, until RQ's abandoned-job sweep, minutes later.
    job_id = item.job_id(destination.pk, auto_attempt)
    with contextlib.suppress(redis.RedisError):
        delete_job(job_id, unless_live=not _abandoned(job_id))
    application = cached_application(destination.application_id)
    made = _enqueue(destination_id=destination.pk, item=item, application=application,
                    trigger=AttemptTrigger.AUTO, auto_attempt=auto_attempt)  # fmt: skip
    if made:
        extra = {"item": f"{item.id} run {item.run}", "destination_id": destination.pk}
        logger.warning("re-enqueued a lost destination publish", extra=extra)
    return int(made)
