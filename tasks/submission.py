"""Accepting a task: validation of the request, idempotency, commit, then enqueue."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from django.db import IntegrityError, connection, transaction
from django.db.models.base import ModelState
from django.utils import timezone

from tasks import idempotency, jsonsafety
from tasks.delivery import ssrf
from tasks.events import catalog
from tasks.events import stream as event_stream
from tasks.execution import deadlines
from tasks.models import Application, IdempotencyRecord, Task
from tasks.plumbing import rawsql
from tasks.plumbing.ids import uuid7_many
from tasks.plumbing.queueing import enqueue_task_run, redis_client, task_job_id
from tasks.scheduling import estimates, fairness, lanes
from tasks.statuses import Priority

logger = logging.getLogger(__name__)

RESPONSE_MODES = ("async", "blocking")


class ValidationFailed(Exception):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SubmitRequest:
    inputs: dict[str, Any]
    response_mode: str
    user: str
    callback_url: str
    callback_events: str = ""  # Task.callback_events (tasks.events.catalog.store_kinds)
    priority: str | None = None  # None: the application's default_priority
    concurrency_key: str = ""
    retry: bool | None = None  # automatic retries (tasks.execution.auto_retry); None: allowed
    # The client's bound in seconds from the submit, the sooner of `Cancel-After` and
    # `deadline_seconds` (tasks.execution.deadlines); None: none.
    deadline_seconds: float | None = None

    @functools.cached_property
    def request_hash(self) -> str:
        """What an Idempotency-Key retry must repeat; only computed for a request with a key."""
        fields: dict[str, Any] = {
            "inputs": self.inputs,
            "response_mode": self.response_mode,
            "user": self.user,
            "callback_url": self.callback_url,
        }
        if self.callback_events:  # absent: the hash of requests from before it existed
            fields["callback_events"] = self.callback_events
        if self.priority is not None:
            fields["priority"] = self.priority
        if self.concurrency_key:
            fields["concurrency_key"] = self.concurrency_key
        if self.retry is not None:
            fields["retry"] = self.retry
        if self.deadline_seconds is not None:
            fields["deadline_seconds"] = self.deadline_seconds
        canonical = json.dumps(
            fields,
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_submit_body(
    body: Any, *, cancel_after: str | None = None, batch_head: SubmitRequest | None = None
) -> SubmitRequest:
    """Validate a decoded JSON body (and the `Cancel-After` header) against the README's API
    rules; raises ValidationFailed. `batch_head`: the body is a batch's item, which has none of
    the batch-level fields; the request takes the batch's (async, its callback, its priority)."""
    if not isinstance(body, dict):
        raise ValidationFailed(None, "The request body must be a JSON object.")
    for name, value in body.items():  # anywhere in the body, known fields or not
        _check_storable(value, name)
    if "inputs" not in body:
        raise ValidationFailed("inputs", "inputs is required.")
    inputs = body["inputs"]
    if not isinstance(inputs, dict):
        raise ValidationFailed("inputs", "inputs must be a JSON object.")

    response_mode = body.get("response_mode", "blocking")
    if response_mode not in RESPONSE_MODES:
        raise ValidationFailed("response_mode", 'response_mode must be "async" or "blocking".')

    user = body.get("user")
    if user is None:
        user = ""
    if not isinstance(user, str):
        raise ValidationFailed("user", "user must be a string.")
    if len(user) > 255:
        raise ValidationFailed("user", "user must be at most 255 characters.")

    callback_url = body.get("callback_url")
    if callback_url is None or callback_url == "":
        callback_url = ""
    elif not isinstance(callback_url, str):
        raise ValidationFailed("callback_url", "callback_url must be a string.")
    else:
        try:
            ssrf.check_callback_url(callback_url)
        except ssrf.UnsafeCallbackUrl as exc:
            raise ValidationFailed("callback_url", str(exc)) from exc

    concurrency_key = _concurrency_key(body.get("concurrency_key"))
    retry = _retry(body.get("retry"))
    deadline_seconds = _deadline_seconds(body.get("deadline_seconds"), cancel_after)
    if batch_head is not None:
        return SubmitRequest(
            inputs=inputs, response_mode="async", user=user,
            callback_url=batch_head.callback_url, callback_events=batch_head.callback_events,
            priority=batch_head.priority, concurrency_key=concurrency_key, retry=retry,
            deadline_seconds=deadline_seconds,
        )  # fmt: skip
    return SubmitRequest(
        inputs=inputs,
        response_mode=response_mode,
        user=user,
        callback_url=callback_url,
        callback_events=_callback_events(body.get("callback_events"), callback_url),
        priority=_priority(body.get("priority")),
        concurrency_key=concurrency_key,
        retry=retry,
        deadline_seconds=deadline_seconds,
    )


def _deadline_seconds(value: Any, cancel_after: str | None) -> float | None:
    try:
        return deadlines.client_bound(cancel_after=cancel_after, deadline_seconds=value)
    except deadlines.InvalidDeadline as exc:
        raise ValidationFailed(exc.field, exc.message) from None


def _retry(value: Any) -> bool | None:
    """`retry`: false opts this task out of its application's automatic retries."""
    if value is None or isinstance(value, bool):
        return value
    raise ValidationFailed("retry", "retry must be true or false.")


def _priority(value: Any) -> str | None:
    if value is None:
        return None
    if value not in Priority.values:
        raise ValidationFailed("priority", 'priority must be "high", "normal" or "low".')
    return str(value)


def _concurrency_key(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationFailed("concurrency_key", "concurrency_key must be a string.")
    if len(value) > 255:
        raise ValidationFailed("concurrency_key", "concurrency_key must be at most 255 characters.")
    return value


def _callback_events(value: Any, callback_url: str) -> str:
    """`callback_events`: a list out of catalog.CALLBACK_EVENT_KINDS (default ["finished"])."""
    if value is None:
        return ""
    kinds = ", ".join(f'"{kind}"' for kind in catalog.CALLBACK_EVENT_KINDS)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationFailed("callback_events", f"callback_events must be a list of {kinds}.")
    unknown = [item for item in value if item not in catalog.CALLBACK_EVENT_KINDS]
    if unknown:
        raise ValidationFailed(
            "callback_events", f"Unknown callback event {unknown[0]!r}; use {kinds}."
        )
    stored = catalog.store_kinds(value)
    if stored and not callback_url:
        raise ValidationFailed("callback_events", "callback_events needs a callback_url.")
    return stored


def _check_storable(value: Any, field: str) -> None:
    try:
        jsonsafety.check_value(value, field)
    except jsonsafety.UnstorableJson as exc:
        raise ValidationFailed(field, f"{exc.path or field}: {exc.reason}.") from None


def validate_idempotency_key(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if len(raw) > 255:
        raise ValidationFailed("Idempotency-Key", "Idempotency-Key must be at most 255 characters.")
    if not raw.isprintable() or not raw.isascii():
        raise ValidationFailed(
            "Idempotency-Key", "Idempotency-Key must be printable ASCII characters."
        )
    return raw


def new_task(
    *,
    application: Application,
    request: SubmitRequest,
    idempotency_key: str | None = None,
    now: datetime | None = None,
    **extra: Any,
) -> Task:
    """The unsaved row of an accepted submit (a single one, or a batch's item with `extra`)."""
    now = now or timezone.now()
    max_queue = application.max_queue_seconds
    return Task(
        application=application,
        created_at=now,
        queued_at=now,
        start_by=now + timedelta(seconds=max_queue) if max_queue else None,
        deadline_at=(
            now + timedelta(seconds=request.deadline_seconds)
            if request.deadline_seconds is not None
            else None
        ),
        inputs=request.inputs,
        response_mode=request.response_mode,
        user=request.user,
        callback_url=request.callback_url,
        callback_events=request.callback_events,
        priority=request.priority or application.default_priority,
        concurrency_key=request.concurrency_key,
        auto_retry=request.retry is not False,
        idempotency_key=idempotency_key,
        request_hash=request.request_hash if idempotency_key else "",
        **extra,
    )


# What new_tasks sets on each row of its own; every other column is the first row's value.
ITEM_OWN_FIELDS = frozenset(
    {"id", "inputs", "user", "concurrency_key", "auto_retry", "deadline_at", "idempotency_key",
     "request_hash", "batch_index"}
)  # fmt: skip


def new_tasks(
    *,
    application: Application,
    requests: list[SubmitRequest],
    keys: list[str | None],
    now: datetime,
    first_index: int | None = None,
    default_key: str = "",
    **shared: Any,
) -> list[Task]:
    """new_task's rows for many requests alike but for their own fields (ITEM_OWN_FIELDS; a
    batch's items, `shared` their batch fields): the first is built by new_task, the others
    copied from it with what differs set, at a small part of a model instance's construction.
    `first_index`: the rows' batch_index counts from it; `default_key`: the concurrency_key of
    a request that names none."""
    if not requests:
        return []
    if first_index is not None:
        shared["batch_index"] = first_index
    first = new_task(application=application, request=requests[0], idempotency_key=keys[0],
                     now=now, **shared)  # fmt: skip
    first.concurrency_key = first.concurrency_key or default_key
    # Time-ordered: a chunk's rows go to the end of the primary key's index (tasks.plumbing.ids).
    ids = uuid7_many(len(requests))
    first.id = ids[0]
    rows = [first]
    template = first.__dict__
    fields_cache = first._state.fields_cache  # the application, the batch
    index = first_index
    for request, key, task_id in zip(requests[1:], keys[1:], ids[1:], strict=True):
        row = Task.__new__(Task)
        values = row.__dict__
        values.update(template)
        state = values["_state"] = ModelState()
        state.fields_cache = fields_cache.copy()
        values["id"] = task_id
        values["inputs"] = request.inputs
        values["user"] = request.user
        values["concurrency_key"] = request.concurrency_key or default_key
        values["auto_retry"] = request.retry is not False
        values["deadline_at"] = (now + timedelta(seconds=request.deadline_seconds)
                                 if request.deadline_seconds is not None else None)  # fmt: skip
        values["idempotency_key"] = key
        values["request_hash"] = request.request_hash if key else ""
        if index is not None:
            index += 1
            values["batch_index"] = index
        rows.append(row)
    return rows


def submit_task(
    *,
    application: Application,
    request: SubmitRequest,
    idempotency_key: str | None = None,
) -> tuple[Task | IdempotencyRecord, bool]:
    """Commit a new pending task and enqueue it. Returns (task, created); a repeated
    Idempotency-Key returns the first task, or the record of it when retention removed it.

    The row is committed before the enqueue: if Redis is unreachable the task stays pending and
    the reconciler enqueues it later, so an accepted task is never lost.
    """
    if idempotency_key:
        existing = idempotency.existing_for_key(application, idempotency_key, request.request_hash)
        if existing is not None:
            return existing, False
    task = new_task(application=application, request=request, idempotency_key=idempotency_key)
    try:
        if connection.in_atomic_block:
            with transaction.atomic():  # a savepoint, so a key race leaves the caller's txn usable
                rawsql.insert(task)  # the ORM's save() without its per-call compilation
        else:
            rawsql.insert(task)  # autocommit: one round trip, committed on return
        # Runs at once in autocommit, or after the caller's transaction commits.
        transaction.on_commit(lambda: enqueue_pending_task(task=task, fresh=True, announce=True))
    except IntegrityError:
        if not idempotency_key:
            raise
        # A concurrent request with the same key won the insert: answer with its task.
        existing = idempotency.existing_for_key(application, idempotency_key, request.request_hash)
        if existing is None:
            raise
        return existing, False
    return task, True


def queued_event_data(task: Task, place: dict[str, Any] | None) -> dict[str, Any]:
    """The `task.queued` event of a new run; `place` its place (tasks.scheduling.estimates)."""
    position = place["position"] if place else None
    return {"status": task.status, "priority": task.priority, "position": position,
            "queue": place}  # fmt: skip


ENQUEUE_CHUNK = 300  # runs per Redis pipeline when many fresh tasks are enqueued at once


def enqueue_fresh_tasks(*, tasks: list[Task], application: Application) -> int:
    """`enqueue_pending_task(fresh=True, announce=True)` for many tasks inserted a moment ago (a
    batch's items): the per-key slots asked for together (one round trip, one script call per
    key), then the granted runs' jobs, tickets and `task.queued` events, one pipeline per
    ENQUEUE_CHUNK runs. A run left in its key's line announces itself when it
    is granted a slot (tasks.scheduling.dispatch).
    Returns the runs queued or lined; after a Redis failure the rest stay pending for the
    reconciler."""
    if application.max_concurrency:  # RQ's rate limit costs trips of its own per run
        return sum(enqueue_pending_task(task=task, fresh=True, announce=True) for task in tasks)
    # A batch's items mostly share one key: worked out once per distinct key's inputs.
    known_keys: dict[tuple[str, str, Any], fairness.Key | None] = {}

    def key_of(task: Task) -> fairness.Key | None:
        marker = (task.concurrency_key, task.user, task.batch_id)
        if marker not in known_keys:
            known_keys[marker] = fairness.key_of(task, application)
        return known_keys[marker]

    try:
        keys = [key_of(task) for task in tasks]
        granted = fairness.acquire_many(tasks, keys=keys)
    except Exception:  # Redis down, or anything else: the accepted tasks must not be lost
        logger.warning(
            "enqueue of %d tasks failed, they stay pending for the reconciler",
            len(tasks), extra={"app_id": str(application.id)}, exc_info=True,
        )  # fmt: skip
        return 0
    # A run left in its key's line is enqueued, and its `task.queued` announced, when a slot
    # frees (dispatch); a batch's items mostly wait there, at one line entry each.
    entering = [(task, key) for task, key, may_enter in zip(tasks, keys, granted, strict=True)
                if may_enter]  # fmt: skip
    done = len(tasks) - len(entering)
    for start in range(0, len(entering), ENQUEUE_CHUNK):
        chunk = entering[start : start + ENQUEUE_CHUNK]
        try:
            pipeline = redis_client().pipeline()
            pipeline.multi()  # RQ's enqueue asks for MULTI; no command may come before it
            places = {priority: estimates.for_new_run(priority)
                      for priority in {task.priority for task, _key in chunk}}  # fmt: skip
            for task, key in chunk:
                event_stream.add(
                    pipeline, task_id=task.id, run=task.run, event=catalog.QUEUED,
                    data=queued_event_data(task, places[task.priority]),
                )  # fmt: skip
                queue_name = lanes.queue_name(task.priority)
                job_id = task_job_id(task.id, task.run)
                enqueue_task_run(
                    task_id=task.id, run=task.run, timeout=application.job_timeout_seconds,
                    failure_ttl=application.retention_hours * 3600,
                    application_id=application.id, fresh=True, queue_name=queue_name,
                    meta={fairness.META_FIELD: key.member} if key else None,
                    also=functools.partial(lanes.take_ticket, queue=queue_name, job_id=job_id),
                    into=pipeline,
                )  # fmt: skip
            pipeline.execute()
        except Exception:  # as above: the rest stay pending for the reconciler
            logger.warning(
                "enqueue of %d tasks failed, they stay pending for the reconciler",
                len(entering) - start, extra={"app_id": str(application.id)}, exc_info=True,
            )  # fmt: skip
            return done
        done += len(chunk)
    return done


def enqueue_pending_task(*, task: Task, fresh: bool = False, announce: bool = False) -> bool:
    """Enqueue the task's current run in its priority lane, or put it in its key's line when
    the key has no free slot (tasks.scheduling.fairness); on a Redis failure log it and leave
    it pending for the reconciler. True when it was queued or put in a line.

    `fresh`: the task was inserted a moment ago (see queueing.enqueue_task_run). `announce`:
    this run is new (a submit, a retry), so its `task.queued` event goes in the same trip; a
    re-enqueue of a run already announced sends none."""
    application = task.application
    queue_name = lanes.queue_name(task.priority)
    job_id = task_job_id(task.id, task.run)

    def queued_event(place: dict[str, Any] | None) -> dict[str, Any]:
        return queued_event_data(task, place)

    def queued(pipeline: redis.client.Pipeline) -> None:
        lanes.take_ticket(pipeline, queue=queue_name, job_id=job_id)
        if announce:
            event_stream.add(
                pipeline, task_id=task.id, run=task.run, event=catalog.QUEUED,
                data=queued_event(estimates.for_new_run(task.priority)),
            )  # fmt: skip

    try:
        key = fairness.key_of(task)
        if key is not None and not fairness.acquire(task, key=key):
            if announce:
                event_stream.publish(
                    task_id=task.id, run=task.run, event=catalog.QUEUED,
                    data=queued_event(estimates.for_task(task)),
                )  # fmt: skip
            return True  # its key's line: enqueued when a slot frees
        return enqueue_task_run(
            task_id=task.id,
            run=task.run,
            timeout=application.job_timeout_seconds,
            failure_ttl=application.retention_hours * 3600,
            application_id=application.id,
            max_concurrency=application.max_concurrency,
            fresh=fresh,
            queue_name=queue_name,
            meta={fairness.META_FIELD: key.member} if key else None,
            also=queued,
        )
    except Exception:  # Redis down, or anything else: the accepted task must not be lost
        logger.warning(
            "enqueue failed, task stays pending for the reconciler",
            extra={"task_id": str(task.id), "app_id": str(application.id)},
            exc_info=True,
        )
        return False
