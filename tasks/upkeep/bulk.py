"""'Retry / redeliver / run now / deliver now / discard / delete all matching': done in the
background, in batches.

The operator's filter is stored with the operation; a maintenance job walks the matching tasks by
keyset (never loading them all), acts on each batch through the same services as the single-task
buttons, and records its progress so the dashboard can show it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.conf import settings
from django.utils import timezone

from tasks import services, work_actions
from tasks.delivery import callbacks
from tasks.models import BulkOperation, CallbackStatus, TaskStatus
from tasks.plumbing.queueing import queue
from tasks.selectors import work
from tasks.selectors.task_lists import TaskFilters, iter_matching_ids

logger = logging.getLogger(__name__)


# The key of an operation's stored filter that names the Work page tab it walks.
WORK_TAB = "work_tab"


def start(*, kind: str, filters: TaskFilters, username: str, work_tab: str = "") -> BulkOperation:
    """Record the operation and enqueue its job. From the Tasks pages, retry narrows to failed
    tasks, redelivery to failed callbacks, whatever else the filter says; from the Work page
    (`work_tab`), every kind walks that tab's work, and only a kind the tab offers
    (work_actions.TAB_ACTIONS) is accepted (ValueError otherwise)."""
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
    work_tab = operation.filters.get(WORK_TAB, "")
    processed = affected = 0
    try:
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
