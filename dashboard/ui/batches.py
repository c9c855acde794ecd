"""The Batches pages: every batch, newest first, with its items' counts (one grouped query for
the whole page), and one batch with its items in index order. Retrying a batch's failed items
and cancelling a batch run in the background as bulk operations (tasks.upkeep.bulk), audited,
and answer in place with the operation's progress."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.http import HttpResponse, QueryDict
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils.http import urlencode

from dashboard.ui.access import operator_required, staff_required
from dashboard.ui.forms import BatchFilterForm
from dashboard.ui.responses import HtmxHttpRequest, answer, page_or_partial, safe_next
from tasks import audit
from tasks.batches import follow
from tasks.models import Batch, BatchCallbackAttempt, BulkOperation
from tasks.selectors import task_lists
from tasks.selectors.task_lists import BatchFilters, TaskFilters
from tasks.statuses import FINISHED, UNFINISHED, CallbackStatus
from tasks.upkeep import bulk

LIST_TEMPLATE = "dashboard/batches.html"
TEMPLATE = "dashboard/batch_detail.html"
PAGE_SIZE = 50
ITEMS_PAGE_SIZE = 100


@dataclass
class BatchRow:
    batch: Batch
    counts: list[tuple[str, int]]  # items per status, in follow.COUNTED's order
    finished: int
    percent: int


def _row(batch: Batch, counts: dict[str, int]) -> BatchRow:
    finished = sum(counts.get(status, 0) for status in FINISHED)
    percent = finished * 100 // batch.total if batch.total else 100
    return BatchRow(batch, [(status, counts.get(status, 0)) for status in follow.COUNTED],
                    finished, percent)  # fmt: skip


@staff_required
def batch_list(request: HtmxHttpRequest) -> HttpResponse:
    form = BatchFilterForm(request.GET or None)
    filters = form.filters() if request.GET else BatchFilters()
    cursor = request.GET.get("cursor", "")
    page = task_lists.batch_page(filters=filters, cursor=cursor, size=PAGE_SIZE)
    params = request.GET.copy()
    params.pop("cursor", None)
    rows = [_row(batch, page.counts[batch.id]) for batch in page.rows]
    context = {
        "form": form,
        "page": page,
        "rows": rows,
        "statuses": follow.COUNTED,
        "query": params.urlencode(),
        "first_page": not cursor,
        # What the rows poll to refresh (this very list), while one of them is running.
        "list_url": request.get_full_path(),
        "live": any(row.batch.status == Batch.Status.RUNNING for row in rows),
    }
    return page_or_partial(request, LIST_TEMPLATE, "batches", context)


def _status(data: QueryDict) -> str:
    status = data.get("status", "")
    return status if status in follow.COUNTED else ""


def _after(data: QueryDict) -> int:
    try:
        return max(-1, int(data.get("after", -1)))
    except ValueError:
        return -1


def _batch_context(batch: Batch, *, status: str, after: int, live_url: str) -> dict:
    progress = follow.progress(batch)  # also brings the batch's status up to date
    page = task_lists.item_page(batch=batch, status=status, after=after, size=ITEMS_PAGE_SIZE)
    operations = list(BulkOperation.objects.filter(filters__batch=str(batch.pk))[:3])
    busy = any(op.status in (BulkOperation.Status.QUEUED, BulkOperation.Status.RUNNING)
               for op in operations)  # fmt: skip
    unfinished = sum(progress.counts[name] for name in UNFINISHED)
    return {
        "batch": batch,
        "progress": progress,
        "finished": sum(progress.counts[name] for name in FINISHED),
        "counts": [(name, progress.counts[name]) for name in follow.COUNTED],
        "page": page,
        "status": status,
        "status_query": urlencode({"status": status}) if status else "",
        "first_page": after < 0,
        "live_url": live_url,
        # Polls while items may still change (the batch runs, or an operation on it is under way)
        # or its batch.finished is being delivered.
        "live": bool(unfinished) or busy or batch.callback_status == CallbackStatus.PENDING,
        "can_retry": bool(progress.counts["failed"]),
        "can_cancel": bool(unfinished),
        "operations": operations,
        "callback_attempts": list(
            BatchCallbackAttempt.objects.filter(batch=batch).order_by("-started_at")[:10]
        ),
    }


def _batch(batch_id: uuid.UUID) -> Batch:
    return get_object_or_404(Batch.objects.select_related("application"), pk=batch_id)


@staff_required
def batch_detail(request: HtmxHttpRequest, batch_id: uuid.UUID) -> HttpResponse:
    context = _batch_context(
        _batch(batch_id),
        status=_status(request.GET),
        after=_after(request.GET),
        live_url=request.get_full_path(),
    )
    return page_or_partial(request, TEMPLATE, "live", context)


def _label(batch: Batch) -> str:
    return f"{batch.application.name} · {str(batch.pk)[:8]}"


def _answer(request: HtmxHttpRequest, batch: Batch, *, message: str, ok: bool) -> HttpResponse:
    """The batch's live part after the action (the filter it was posted from), the operations
    panel out of band, and the message; a plain form is sent back to the batch page."""
    page_url = reverse("dashboard:batch", args=[batch.pk])
    status = _status(request.POST)
    live_url = f"{page_url}?{urlencode({'status': status})}" if status else page_url
    context = _batch_context(batch, status=status, after=-1, live_url=live_url)
    return answer(request, message=message, ok=ok, template=TEMPLATE, partial="live",
                  context=context, also=("operations",),
                  fallback=safe_next(request, page_url))  # fmt: skip


def _start(request: HtmxHttpRequest, batch: Batch, *, kind: str, action: str, detail: dict):
    operation = bulk.start(kind=kind, filters=TaskFilters(batch=str(batch.pk)),
                           username=request.user.username)  # fmt: skip
    audit.record(user=request.user, action=action, target_type="batch", target_id=batch.pk,
                 target_label=_label(batch),
                 detail={"operation": operation.pk, **detail})  # fmt: skip


@operator_required
def batch_retry(request: HtmxHttpRequest, batch_id: uuid.UUID) -> HttpResponse:
    """Retry every failed item (services.retry_tasks, as the task page's Retry) in the
    background."""
    batch = _batch(batch_id)
    failed = follow.progress(batch).counts["failed"]
    if not failed:
        return _answer(request, batch, message="No item of this batch has failed.", ok=False)
    _start(request, batch, kind=BulkOperation.Kind.RETRY, action="batch.retry",
           detail={"failed": failed})  # fmt: skip
    message = f"Retry: the {failed} failed item(s), in the background (progress below)."
    return _answer(request, batch, message=message, ok=True)


@operator_required
def batch_cancel(request: HtmxHttpRequest, batch_id: uuid.UUID) -> HttpResponse:
    """Cancel every unfinished item (tasks.batches.control.cancel_batch) in the background."""
    batch = _batch(batch_id)
    counts = follow.progress(batch).counts
    unfinished = sum(counts[name] for name in UNFINISHED)
    if not unfinished:
        return _answer(request, batch, message="Every item of this batch has finished.", ok=False)
    _start(request, batch, kind=BulkOperation.Kind.CANCEL_BATCH, action="batch.cancel",
           detail={"unfinished": unfinished})  # fmt: skip
    message = f"Cancel: the {unfinished} unfinished item(s), in the background (progress below)."
    return _answer(request, batch, message=message, ok=True)
