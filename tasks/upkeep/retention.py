"""Retention: the one place that decides what has expired and removes it (README: Retention).

A finished task (succeeded, failed, cancelled) expires at `finished_at + retention_hours` of its
application, and goes with its callback attempts, log lines and earlier runs; a batch goes with
its last item. Unfinished tasks are
never removed, whatever their age, and neither is a task whose callback is still being delivered.
Deletion runs in small batches (BATCH_SIZE ids per transaction, picked by the
(application, finished_at) index), so it never holds long locks nor loads rows into memory, and
submits keep flowing meanwhile. A Redis lock with a TTL keeps two cleanups from overlapping.
RQ's own job data expires by itself: a successful job is kept SUCCESSFUL_JOB_TTL (a minute; the
result lives in the database), a failed one for the application's retention (see
`plumbing.queueing.enqueue_task_run` and `delivery.callbacks`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.db import connection, models, transaction
from django.db.models import Exists, Min, OuterRef, QuerySet
from django.utils import timezone

from tasks import idempotency
from tasks.events import stream as event_stream
from tasks.models import (
    Application,
    Batch,
    BatchCallbackAttempt,
    CleanupRun,
    Task,
)
from tasks.plumbing import rawsql
from tasks.plumbing.queueing import redis_client
from tasks.statuses import CALLBACK_IN_FLIGHT, FINISHED, CallbackStatus
from tasks.telemetry.metrics import record_cleanup

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000
LOCK_KEY = "taskhook:lock:cleanup"
LOCK_TTL_SECONDS = 1800
PREVIEW_CAP = 10_000


def expired_tasks(application: Application, now: datetime | None = None) -> QuerySet[Task]:
    cutoff = (now or timezone.now()) - timedelta(hours=application.retention_hours)
    return (
        Task.objects.filter(application=application, status__in=FINISHED, finished_at__lt=cutoff)
        # A callback still being delivered keeps its task until delivery ends.
        .exclude(callback_status__in=CALLBACK_IN_FLIGHT)
    )


@dataclass(frozen=True)
class Preview:
    application: Application
    count: int
    capped: bool
    oldest_finished_at: datetime | None


def preview(*, application_id: uuid.UUID | str | None = None) -> list[Preview]:
    """How many tasks a cleanup would remove now (counted up to PREVIEW_CAP), oldest first."""
    apps = Application.objects.all()
    if application_id:
        apps = apps.filter(pk=application_id)
    result = []
    for app in apps:
        expired = expired_tasks(app)
        count = expired.order_by().values("pk")[:PREVIEW_CAP].count()
        oldest = expired.aggregate(oldest=Min("finished_at"))["oldest"] if count else None
        result.append(Preview(app, count, count >= PREVIEW_CAP, oldest))
    return result


# What goes with a task, deleted before it (their foreign keys are checked, not cascaded, by the
# database): every model whose foreign key to a task cascades.
def _task_children() -> list[tuple[type[models.Model], str]]:
    return [(relation.related_model, relation.field.name) for relation in Task._meta.related_objects
            if relation.on_delete is models.CASCADE]  # fmt: skip


def delete_batch(expired: QuerySet[Task], ids: list[uuid.UUID]) -> int:
    """Delete those of `ids` still in `expired` (re-checked under row locks), with their logs,
    attempts, runs and event streams; the number removed. Retention and the Work page's
    *delete* use it."""
    if connection.vendor == "postgresql" and _task_table_only(expired):
        ids = _delete_batch_postgresql(expired, ids)
        event_stream.delete(ids)
        return len(ids)
    with transaction.atomic():
        # Re-check under row locks: an operator's retry in between makes a task unfinished.
        ids = list(expired.filter(pk__in=ids).select_for_update().values_list("pk", flat=True))
        idempotency.keep_keys_of(ids)  # a key outlives its task (its window is 24 h)
        # Children first by plain DELETE ... WHERE task_id IN (...): nothing is loaded.
        for child, field in _task_children():
            child._default_manager.filter(**{f"{field}__in": ids}).delete()
        Task.objects.filter(pk__in=ids).only("pk").delete()
    event_stream.delete(ids)  # after the commit; a stream left behind expires on its own
    return len(ids)


def _task_table_only(tasks: QuerySet[Task]) -> bool:
    """The filter reads the task table alone (no join): its WHERE can be a DELETE's."""
    query = tasks.query
    used = {alias for alias in query.alias_map if query.alias_refcount.get(alias)}
    return used <= {Task._meta.db_table} and not query.combinator


def _delete_batch_postgresql(expired: QuerySet[Task], ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """delete_batch on PostgreSQL: one statement. The tasks' DELETE carries `expired`'s own
    conditions, which PostgreSQL re-checks on the current row version of a task changed
    meanwhile (a retry makes it unfinished: it stays); what it removed feeds, in the same
    statement, the kept idempotency keys and the deletes of the children. Ten statements a
    batch (a locking re-select, the keys, each child table, the tasks by Django's collector)
    made the retention of 10,000,000 tasks take an hour."""
    query = expired.filter(pk__in=ids).query
    where, where_params = query.get_compiler(connection=connection).compile(query.where)
    table = rawsql.quote(Task._meta.db_table)
    returned = ", ".join(rawsql.quote_column(rawsql.get_field(Task, name))
                         for name in idempotency.KEPT_FROM_TASK.values())  # fmt: skip
    keep_keys, keep_params = idempotency.keep_keys_statement("gone")
    deletes = "".join(
        f", gone_{n} AS (DELETE FROM {rawsql.quote(child._meta.db_table)} "  # noqa: S608
        f"WHERE {rawsql.quote_column(rawsql.get_field(child, field))} IN (SELECT id FROM gone))"
        for n, (child, field) in enumerate(_task_children())
    )
    statement = (
        f"WITH gone AS (DELETE FROM {table} WHERE {where} RETURNING {returned}), "  # noqa: S608
        f"kept AS ({keep_keys}){deletes} SELECT id FROM gone"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        # A lost commit of a cleanup's batch (a crash) only means its tasks go on the next
        # pass: it need not wait for its WAL to reach the disk.
        cursor.execute("SET LOCAL synchronous_commit = off")
        cursor.execute(statement, [*where_params, *keep_params])
        return [row[0] for row in cursor.fetchall()]


def purge_application(
    application: Application, *, dry_run: bool = False, batch_size: int = BATCH_SIZE
) -> int:
    """Remove (or, dry run, count) one application's expired tasks; returns how many."""
    now = timezone.now()
    expired = expired_tasks(application, now)
    if dry_run:
        return expired.count()  # the command's dry run gives the exact figure
    removed = 0
    while True:
        ids = list(expired.order_by("finished_at").values_list("pk", flat=True)[:batch_size])
        if not ids:
            break
        removed += delete_batch(expired, ids)
    purge_empty_batches(application, batch_size=batch_size)
    return removed


def empty_batches(application: Application) -> QuerySet[Batch]:
    """Batches whose last item is gone (expired, or deleted from the Work page). One whose
    `batch.finished` is still being delivered is kept until the delivery ends."""
    return (
        Batch.objects.filter(application=application)
        .exclude(status=Batch.Status.RUNNING)
        .exclude(callback_status=CallbackStatus.PENDING)
        .filter(~Exists(Task.objects.filter(batch_id=OuterRef("pk"))))
    )


def purge_empty_batches(application: Application, *, batch_size: int = BATCH_SIZE) -> int:
    """A batch goes with its last item, with its callback attempts; the number removed."""
    removed = 0
    while ids := list(empty_batches(application).values_list("pk", flat=True)[:batch_size]):
        with transaction.atomic():
            BatchCallbackAttempt.objects.filter(batch_id__in=ids).delete()
            removed += empty_batches(application).filter(pk__in=ids).delete()[0]
    return removed


def run_cleanup(
    *,
    trigger: str,
    application_id: uuid.UUID | str | None = None,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
) -> CleanupRun | None:
    """One retention pass over every application (or one); None if another pass holds the lock."""
    lock = None
    if not dry_run:
        try:
            lock = redis_client().lock(LOCK_KEY, timeout=LOCK_TTL_SECONDS, blocking=False)
            if not lock.acquire(blocking=False):
                logger.info("cleanup skipped: another run holds the lock")
                return None
        except redis.RedisError:
            logger.warning("cleanup lock unavailable (Redis); running without it")
            lock = None
    run = CleanupRun.objects.create(trigger=trigger, dry_run=dry_run)
    apps = Application.objects.all()
    if application_id:
        apps = apps.filter(pk=application_id)
    removed: dict[str, dict] = {}
    try:
        for app in apps:
            count = purge_application(app, dry_run=dry_run, batch_size=batch_size)
            removed[str(app.pk)] = {"name": app.name, "tasks": count}
        if not dry_run:
            idempotency.purge_expired_records()
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        logger.exception("cleanup failed")
        raise
    finally:
        run.removed = removed
        run.total_removed = sum(entry["tasks"] for entry in removed.values())
        run.finished_at = timezone.now()
        run.save(update_fields=["removed", "total_removed", "finished_at", "error"])
        if lock is not None:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()
    if not dry_run:
        record_cleanup(run.total_removed)
    logger.info("cleanup (%s) removed %s task(s)", trigger, run.total_removed)
    return run


def recent_runs(*, limit: int = 10) -> list[CleanupRun]:
    return list(CleanupRun.objects.order_by("-started_at")[:limit])
