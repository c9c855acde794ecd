"""'Retry all matching' and 'Redeliver all matching': done in the background, in batches.

The operator's filter is stored with the operation; a maintenance job walks the matching tasks by
keyset (never loading them all), acts on each batch through the same services as the single-task
buttons, and records its progress so the dashboard can show it.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.utils import timezone

from tasks import services
from tasks.delivery import callbacks
from tasks.models import BulkOperation, CallbackStatus, TaskStatus
from tasks.plumbing.queueing import queue
from tasks.selectors.task_lists import TaskFilters, iter_matching_ids

logger = logging.getLogger(__name__)


def start(*, kind: str, filters: TaskFilters, username: str) -> BulkOperation:
    """Record the operation and enqueue its job. Retry narrows to failed tasks, redelivery to
    failed callbacks, whatever else the filter says."""
    if kind == BulkOperation.Kind.RETRY:
        filters.status = TaskStatus.FAILED
    else:
        filters.callback_status = CallbackStatus.FAILED
    operation = BulkOperation.objects.create(
        kind=kind, filters=filters.to_json(), created_by=username
    )
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
    processed = affected = 0
    try:
        for ids in iter_matching_ids(filters):
            if operation.kind == BulkOperation.Kind.RETRY:
                done = services.retry_tasks(task_ids=ids)
            else:
                done = callbacks.redeliver(task_ids=ids)
            processed += len(ids)
            affected += len(done)
            BulkOperation.objects.filter(pk=operation.pk).update(
                processed=processed, affected=affected
            )
    except Exception as exc:
        logger.exception("bulk operation %s failed", operation.pk)
        BulkOperation.objects.filter(pk=operation.pk).update(
            status=BulkOperation.Status.FAILED, error=str(exc)[:2000], finished_at=timezone.now()
        )
        raise
    BulkOperation.objects.filter(pk=operation.pk).update(
        status=BulkOperation.Status.DONE, finished_at=timezone.now()
    )
    operation.refresh_from_db()
    return operation
