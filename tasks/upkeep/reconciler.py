"""The reconciler: makes Redis agree with the database, which is the source of truth (§6).

(a) pending tasks whose job is missing from Redis, or failed before it could start the task
    (database unreachable), are enqueued again (RQ refuses a duplicate job
    id, so two reconcilers never enqueue a run twice); a run waiting out an automatic retry's
    backoff only once it is due;
(b) running tasks whose worker is gone, or that outlived their job timeout, are failed ("worker
    lost" / "timed out") or re-run when the application allows task retries;
(c) finished tasks whose callback delivery was never scheduled, or whose scheduled retry
    vanished, get it scheduled (a delivery parked on its endpoint's cap is not lost: left);
(d) parked deliveries of endpoints whose slots expired (a worker died holding one) are
    enqueued;
(e) publishes to destinations whose jobs vanished are enqueued again
    (tasks.delivery.destinations.resume_lost);
(f) endpoints failing too long are disabled, due circuit probes start, and each circuit's Redis
    copy is put back (tasks.delivery.health).
Each pass is bounded (BATCH rows per rule) and guarded by a Redis lock so passes never overlap.
Each rule walks its rows by keyset across passes (a cursor in Redis), so rows that a rule must
skip (a live job, a recent attempt) or cannot correct never hide the rows behind them.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import cast

import redis
from django.db.models import Q, QuerySet
from django.utils import timezone
from rq.job import Job
from rq.worker import BaseWorker

from tasks import state
from tasks.batches import completion, ingest
from tasks.delivery import batch_callbacks, callbacks, destinations, health
from tasks.execution.executor import on_task_finished
from tasks.execution.worker import KNOWN_WORKERS_KEY, alive_key
from tasks.models import CallbackAttempt, CallbackStatus, Task, TaskStatus
from tasks.plumbing.queueing import delete_job, queue, redis_client
from tasks.scheduling import dispatch, fairness, lanes
from tasks.statuses import DELIVERABLE
from tasks.submission import enqueue_pending_task
from tasks.telemetry.metrics import record_reconciler_corrections

logger = logging.getLogger(__name__)

BATCH = 500
# How long a fresh task may legitimately be pending without a job (between commit and enqueue).
PENDING_GRACE = timedelta(seconds=10)
# A task must have run this long before it can be called lost (covers worker registration).
WORKER_GRACE = timedelta(seconds=5)
# Extra slack past a job's timeout before the reconciler steps in (RQ's own timeout fires first).
TIMEOUT_GRACE = timedelta(seconds=60)
CALLBACK_GRACE = timedelta(seconds=60)
# Longer than any attempt can take (timeout <= 60 s, job timeout = timeout + 30 s).
STALLED_ATTEMPT = timedelta(seconds=180)
LOCK_KEY = "taskhook:lock:reconcile"
# Short, and renewed before each rule: a pass cut off by a Redis outage cannot release its lock,
# and Redis keeps the key (and its TTL) across a restart, so a long TTL would make every pass
# after the outage skip until it ran out, while the tasks submitted meanwhile wait.
LOCK_TTL = 30
CURSOR_KEY = "taskhook:reconcile:cursor:{rule}"


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    rerun: list[str] = field(default_factory=list)
    callbacks_rescheduled: list[str] = field(default_factory=list)
    promoted: int = 0  # parked deliveries enqueued because their endpoint's slots expired
    granted: int = 0  # runs moved from their key's line to their lane (tasks.scheduling)
    batches_abandoned: int = 0  # batches whose request died while storing them
    batches_settled: int = 0  # batches whose last item ended without settling them
    batch_callbacks_resumed: int = 0  # `batch.finished` attempts re-enqueued
    endpoints: health.SweepReport | None = None  # probes started, endpoints disabled
    destinations_resumed: int = 0  # destination publishes re-enqueued
    skipped: bool = False

    @property
    def corrections(self) -> int:
        return (
            len(self.requeued) + len(self.lost) + len(self.rerun) + len(self.callbacks_rescheduled)
        )


def reconcile() -> ReconcileReport:
    """One pass; returns what it corrected (skipped=True if another pass holds the lock)."""
    client = redis_client()
    lock = client.lock(LOCK_KEY, timeout=LOCK_TTL, blocking=False)
    if not lock.acquire(blocking=False):
        return ReconcileReport(skipped=True)
    try:
        report = ReconcileReport()
        _requeue_orphaned_pending(client, report)
        lock.reacquire()  # each rule is bounded (BATCH rows): the TTL covers one rule
        _recover_lost_running(client, report)
        lock.reacquire()
        _reschedule_callbacks(client, report)
        lock.reacquire()
        report.promoted = callbacks.promote_parked()
        lock.reacquire()
        report.endpoints = health.sweep()
        lock.reacquire()
        report.granted = dispatch.refill()
        lock.reacquire()
        report.batches_abandoned = ingest.abandon_stale()
        report.batches_settled = completion.sweep()
        report.batch_callbacks_resumed = batch_callbacks.resume_lost()
        lock.reacquire()
        report.destinations_resumed = destinations.resume_lost()
        record_reconciler_corrections({kind: len(getattr(report, kind))
            for kind in ("requeued", "lost", "rerun", "callbacks_rescheduled")})  # fmt: skip
        return report
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


def _walk(client: redis.Redis, rule: str, rows: QuerySet[Task], order_field: str) -> list[Task]:
    """The next BATCH of `rows` in (order_field, id) order after this rule's cursor. The cursor
    moves to the last row, or back to the start once the walk has reached the end."""
    key = CURSOR_KEY.format(rule=rule)
    cursor = cast(bytes | None, client.get(key))  # redis_client() does not decode responses
    if cursor:
        at_text, _, pk = cursor.decode().partition("|")
        at = datetime.fromisoformat(at_text)
        rows = rows.filter(
            Q(**{f"{order_field}__gt": at}) | Q(**{order_field: at, "pk__gt": uuid.UUID(pk)})
        )
    batch = list(rows.order_by(order_field, "pk")[:BATCH])
    if len(batch) < BATCH:
        client.delete(key)
    else:
        last = batch[-1]
        client.set(key, f"{getattr(last, order_field).isoformat()}|{last.pk}", ex=24 * 3600)
    return batch


def _requeue_orphaned_pending(client: redis.Redis, report: ReconcileReport) -> None:
    cutoff = timezone.now() - PENDING_GRACE
    # A run that waits out an automatic retry's backoff has no job before it is due (queued_at,
    # RQ's scheduled tasks.jobs.enqueue_due_run brings it then); past that it is rescued here.
    pending = Task.objects.select_related("application").filter(
        Q(queued_at__isnull=True) | Q(queued_at__lt=cutoff),
        status=TaskStatus.PENDING,
        created_at__lt=cutoff,
    )
    queued_ids: set[bytes] | None = set()  # the task queue's job ids, read once if needed
    read_queue = False
    for task in _walk(client, "pending", pending, "created_at"):
        if fairness.line_place(task) is not None:
            continue  # waits in its key's line, on purpose without a job (refill moves it)
        job_status = client.hget(Job.key_for(task.rq_job_id), "status")
        if job_status == b"queued" and not task.application.max_concurrency:
            if not read_queue:
                queued_ids, read_queue = _queued_job_ids(client), True
            if not _lost_in_transit(client, task, queued_ids):
                continue
            job_status = b"failed"  # handled as one that failed: deleted and enqueued again
        if job_status == b"failed":
            # The job failed before the task started: the worker could not reach the database
            # (its retries spent). The task is still pending, so run it again.
            delete_job(task.rq_job_id)
        elif job_status is not None:
            continue  # queued, scheduled, running or just finished: it will start the task
        if enqueue_pending_task(task=task):
            logger.warning("re-enqueued pending task without a live job", extra=_extra(task))
            report.requeued.append(str(task.id))


# A queue longer than this is not read whole each pass; the in-transit rule then waits.
MAX_QUEUE_SCAN = 100_000
SUSPECT_KEY = "taskhook:reconcile:suspect:{job_id}"


def _queued_job_ids(client: redis.Redis) -> set[bytes] | None:
    keys = [queue(name).key for name in lanes.lane_names()]
    if sum(client.llen(key) for key in keys) > MAX_QUEUE_SCAN:
        return None
    ids: set[bytes] = set()
    for key in keys:
        ids.update(cast(list[bytes], client.lrange(key, 0, -1)))  # responses are not decoded
    return ids


def _lost_in_transit(client: redis.Redis, task: Task, queued_ids: set[bytes] | None) -> bool:
    """A job that says `queued` but is on no queue: Redis handed it to a worker that had just
    been killed (its blocked connection was still open). It is called lost only when an earlier
    pass already saw it so, so a job being dequeued right now is left alone."""
    suspect = SUSPECT_KEY.format(job_id=task.rq_job_id)
    if queued_ids is None:
        return False
    if task.rq_job_id.encode() in queued_ids:
        client.delete(suspect)
        return False
    if client.set(suspect, "1", nx=True, ex=3600):
        return False  # first sighting: decide on the next pass
    client.delete(suspect)
    return True


def _lost_reason(client: redis.Redis, task: Task, registered: set[str]) -> str | None:
    """Why a running task's run can no longer finish, or None while it still can."""
    name = task.worker_name
    if client.sismember(KNOWN_WORKERS_KEY, name):
        # A Taskhook worker: its liveness key outlives it by at most WORKER_ALIVE_TTL seconds.
        if not client.exists(alive_key(name)):
            return f"worker lost: {name} stopped while running this task"
    elif name and name not in registered:
        return f"worker lost: {name} is no longer registered"
    status = cast(bytes | None, client.hget(Job.key_for(task.rq_job_id), "status"))  # not decoded
    if status is None and not name:
        return "worker lost: the task's job is gone from Redis"
    if status in (b"failed", b"stopped", b"canceled"):
        return f"worker lost: its job ended as {status.decode()} without a result"
    return None


def _recover_lost_running(client: redis.Redis, report: ReconcileReport) -> None:
    now = timezone.now()
    running = _walk(
        client,
        "running",
        Task.objects.select_related("application").filter(
            status=TaskStatus.RUNNING, started_at__lt=now - WORKER_GRACE
        ),
        "started_at",
    )
    if not running:
        return
    registered = {worker.name for worker in BaseWorker.all(connection=client)}
    for task in running:
        assert task.started_at is not None  # selected by started_at__lt
        timeout = timedelta(seconds=task.application.job_timeout_seconds)
        reason: str | None
        if task.started_at + timeout + TIMEOUT_GRACE < now:
            reason = f"timed out after {task.application.job_timeout_seconds} s (worker lost)"
        else:
            reason = _lost_reason(client, task, registered)
        if reason:
            _move_on(task, reason, report)


def _move_on(task: Task, reason: str, report: ReconcileReport) -> None:
    if task.run <= task.application.task_retries:
        new_run = state.start_new_run(
            task_id=task.id, expected=(TaskStatus.RUNNING,), lost_reason=reason
        )
        if new_run is not None:
            task.refresh_from_db()
            enqueue_pending_task(task=task, announce=True)
            logger.warning("re-running task: %s", reason, extra=_extra(task))
            report.rerun.append(str(task.id))
        return
    if state.fail(task_id=task.id, run=task.run, error=reason):
        logger.warning("failed lost task: %s", reason, extra=_extra(task))
        on_task_finished(task.id, run=task.run)
        report.lost.append(str(task.id))


def _reschedule_callbacks(client: redis.Redis, report: ReconcileReport) -> None:
    now = timezone.now()
    due = (
        Task.objects.select_related("application")
        .filter(status__in=DELIVERABLE)
        .filter(
            # never scheduled (or its first job vanished)
            Q(callback_status=CallbackStatus.PENDING, finished_at__lt=now - CALLBACK_GRACE)
            # a scheduled retry that is long overdue: its job vanished with Redis
            | Q(
                callback_status=CallbackStatus.DELIVERING,
                callback_next_attempt_at__lt=now - CALLBACK_GRACE,
            )
            # an attempt that never recorded its end: its worker died mid-delivery
            | Q(
                callback_status=CallbackStatus.DELIVERING,
                callback_next_attempt_at__isnull=True,
                finished_at__lt=now - STALLED_ATTEMPT,
            )
        )
    )
    for task in _walk(client, "callbacks", due, "finished_at"):
        if task.callback_next_attempt_at is None:
            recent = CallbackAttempt.objects.filter(
                task_id=task.id, run=task.run, started_at__gt=now - STALLED_ATTEMPT
            ).exists()
            if recent:
                continue  # an attempt just ran; its successor may be in flight
        if callbacks.resume_delivery(task=task):
            logger.warning("rescheduled lost callback delivery", extra=_extra(task))
            report.callbacks_rescheduled.append(str(task.id))


def _extra(task: Task) -> dict[str, str]:
    return {"task_id": str(task.id), "app_id": str(task.application_id)}
