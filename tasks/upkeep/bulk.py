"""'Retry / redeliver / run now / deliver now / discard / delete all matching', 'cancel
batch' and 'recover since T': done in the background, in batches.

The operator's filter is stored with the operation; a maintenance job walks the matching tasks by
keyset (never loading them all), acts on each batch through the same services as the single-task
buttons, and records its progress so the dashboard can show it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from tasks import services, work_actions
from tasks.batches import control
from tasks.delivery import callbacks, destinations, health
from tasks.models import Batch, BulkOperation, CallbackStatus, Destination, TaskStatus
from tasks.plumbing.queueing import queue
from tasks.selectors import work
from tasks.selectors.task_lists import TaskFilters, iter_matching_ids

logger = logging.getLogger(__name__)


# The key of an operation's stored filter that names the Work page tab it walks.
WORK_TAB = "work_tab"


def start(*, kind: str, filters: TaskFilters, username: str, work_tab: str = "") -> BulkOperation:
    """Record the operation and enqueue its job. From the Tasks pages, retry narrows to failed
    tasks, redelivery to failed callbacks, whatever else the filter says (a batch's items, with
    `filters.batch`); from the Work page (`work_tab`), every kind walks that tab's work, and
    only a kind the tab offers (work_actions.TAB_ACTIONS) is accepted (ValueError otherwise).
    Cancelling a batch takes the batch's id in `filters.batch` and nothing else."""
    stored = filters.to_json()
    if work_tab:
        if kind not in work_actions.TAB_ACTIONS.get(work_tab, ()):
            raise ValueError(f"{kind} does not apply to the {work_tab} tab")
        stored[WORK_TAB] = work_tab
    elif kind == BulkOperation.Kind.RETRY:
        filters.status = TaskStatus.FAILED
        stored = filters.to_json()
    elif kind == BulkOperation.Kind.REDELIVER:
        filters.callback_status = CallbackStatus.FAILED
        stored = filters.to_json()
    elif kind == BulkOperation.Kind.CANCEL_BATCH:
        if not filters.batch:
            raise ValueError("cancelling a batch needs the batch's id")
        stored = TaskFilters(batch=filters.batch).to_json()
    else:
        raise ValueError(f"{kind} all matching needs a Work page tab")
    operation = BulkOperation.objects.create(kind=kind, filters=stored, created_by=username)
    queue(settings.MAINTENANCE_QUEUE).enqueue(
        "tasks.jobs.run_bulk_operation", args=(operation.id,), job_timeout=3600, result_ttl=3600
    )
    return operation


def run(*, operation_id: int) -> BulkOperation:
    operation = BulkOperation.objects.get(pk=operation_id)
    if operation.status != BulkOperation.Status.QUEUED:
        return operation  # a duplicate delivery of the job: the first one did the work
    BulkOperation.objects.filter(pk=operation.pk).update(status=BulkOperation.Status.RUNNING)
    filters = TaskFilters.from_json(operation.filters)
    try:
        if operation.kind == BulkOperation.Kind.CANCEL_BATCH:
            processed, affected = _cancel_batch(filters.batch)
        elif operation.kind == BulkOperation.Kind.RECOVER:
            processed, affected = _recover(operation)
        else:
            processed, affected = _walk(operation, filters)
    except Exception as exc:
        logger.exception("bulk operation %s failed", operation.pk)
        BulkOperation.objects.filter(pk=operation.pk).update(
            status=BulkOperation.Status.FAILED, error=str(exc)[:2000], finished_at=timezone.now()
        )
        raise
    BulkOperation.objects.filter(pk=operation.pk).update(
        status=BulkOperation.Status.DONE, processed=processed, affected=affected,
        finished_at=timezone.now(),
    )  # fmt: skip
    operation.refresh_from_db()
    return operation


def _walk(operation: BulkOperation, filters: TaskFilters) -> tuple[int, int]:
    """(tasks checked, tasks acted on): the matching tasks batch by batch, the progress
    recorded after each."""
    work_tab = operation.filters.get(WORK_TAB, "")
    processed = affected = 0
    batches = _work_ids(work_tab, filters) if work_tab else iter_matching_ids(filters)
    for ids in batches:
        if work_tab:
            done = work_actions.ACTIONS[operation.kind](task_ids=ids).done
        elif operation.kind == BulkOperation.Kind.RETRY:
            done = services.retry_tasks(task_ids=ids)
        else:
            done = callbacks.redeliver(task_ids=ids)
        processed += len(ids)
        affected += len(done)
        BulkOperation.objects.filter(pk=operation.pk).update(processed=processed, affected=affected)
    return processed, affected


def start_recover(
    *,
    since: datetime,
    username: str,
    application_id: str = "",
    endpoint_id: int | None = None,
    destination_id: int | None = None,
) -> BulkOperation:
    """'Redeliver everything that failed since T' for an endpoint, a destination or an
    application (tasks.delivery.health.failed_since, destinations.failed_since): recorded, then
    walked in the background."""
    if not application_id and endpoint_id is None and destination_id is None:
        raise ValueError("recovering needs an application, an endpoint or a destination")
    stored = {"application": application_id, "endpoint": endpoint_id,
              "destination": destination_id, "since": since.isoformat()}  # fmt: skip
    operation = BulkOperation.objects.create(
        kind=BulkOperation.Kind.RECOVER, filters=stored, created_by=username
    )
    queue(settings.MAINTENANCE_QUEUE).enqueue(
        "tasks.jobs.run_bulk_operation", args=(operation.id,), job_timeout=3600, result_ttl=3600
    )
    return operation


def _recover(operation: BulkOperation) -> tuple[int, int]:
    """An endpoint's failed callbacks; a destination's failed publishes; an application's
    failed callbacks and each of its destinations' failed publishes. A webhook redelivery here
    publishes to no destination (destinations.webhooks_only): each destination gets only what
    it failed, never again what it already has."""
    stored = operation.filters
    since = parse_datetime(stored["since"])
    assert since is not None  # written by start_recover
    application_id = stored.get("application") or ""
    done = [0, 0]  # processed, affected

    def progress(processed: int, affected: int) -> None:
        done[0], done[1] = done[0] + processed, done[1] + affected
        BulkOperation.objects.filter(pk=operation.pk).update(processed=done[0], affected=done[1])

    destination_ids: list[int] = []
    if (destination_id := stored.get("destination")) is not None:
        destination_ids = [destination_id]
    else:
        for ids in health.failed_since(
            since=since, application_id=application_id, endpoint_id=stored.get("endpoint")
        ):
            with destinations.webhooks_only():
                progress(len(ids), len(callbacks.redeliver(task_ids=ids)))
        if application_id:
            destination_ids = list(
                Destination.objects.filter(application_id=application_id, enabled=True)
                .order_by("pk")
                .values_list("pk", flat=True)
            )
    for pk in destination_ids:
        for items in destinations.failed_since(destination_id=pk, since=since):
            progress(len(items), destinations.republish(destination_id=pk, items=items))
    return done[0], done[1]


def _cancel_batch(batch_id: str) -> tuple[int, int]:
    """(items, items cancelled): every unfinished item, through the batch's own cancel."""
    batch = Batch.objects.select_related("application").get(pk=batch_id)
    return batch.total, control.cancel_batch(batch=batch)


def _work_ids(tab_name: str, filters: TaskFilters) -> Iterator[list]:
    """The task ids of a Work page tab, in batches: its database rows by their keyset, and the
    tab's runs that only RQ holds (deferred: the cap's lines; scheduled: RQ's retries)."""
    tab = work.tab_of(tab_name)
    if tab.redis:
        for job_ids in work.iter_deferred_job_ids(application_id=filters.application):
            yield [parsed[0] for job_id in job_ids if (parsed := work.task_of_job(job_id))]
        return
    yield from work.iter_db_ids(tab, filters)
    if tab.name == "scheduled":
        rows, _ = work.scheduled_task_jobs(application_id=filters.application,
                                           limit=work.REDIS_CAP)  # fmt: skip
        if ids := [row.task.id for row in rows if row.task]:
            yield ids
