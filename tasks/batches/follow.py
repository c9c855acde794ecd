"""Following a batch: its counts and status (read from its items, one aggregate query on the
partial index task_batch_part_idx, never kept in step) and its results, paged by index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Max
from django.utils import timezone

from tasks.models import Batch, Task
from tasks.statuses import FINISHED, UNFINISHED

RESULTS_LIMIT = 1000
RESULTS_MAX_LIMIT = 10_000
COUNTED = ("pending", "running", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Progress:
    counts: dict[str, int]  # total, then per status (COUNTED)
    percent: int  # finished items of the total, 0-100


def progress(batch: Batch) -> Progress:
    """The counts per status (one aggregate query on the partial index), and the batch's
    status brought up to date: `running` while an item has not finished, then `finished`
    (`cancelled` when a cancel was requested); an item retried later makes it running again."""
    counts = dict.fromkeys(COUNTED, 0)
    last_finished = None
    for status, count, finished_at in (
        Task.objects.filter(batch=batch)
        .values("status")
        .annotate(count=Count("pk"), last=Max("finished_at"))
        .values_list("status", "count", "last")
    ):
        counts[status] = count
        if finished_at is not None and (last_finished is None or finished_at > last_finished):
            last_finished = finished_at
    unfinished = sum(counts[status] for status in UNFINISHED)
    if unfinished:
        status, finished_at = Batch.Status.RUNNING, None
    else:
        status = Batch.Status.CANCELLED if batch.cancel_requested else Batch.Status.FINISHED
        finished_at = batch.finished_at or last_finished or timezone.now()
    if (status, finished_at) != (batch.status, batch.finished_at):
        Batch.objects.filter(pk=batch.pk).update(status=status, finished_at=finished_at)
        batch.status, batch.finished_at = status, finished_at
    finished = sum(counts[status] for status in FINISHED)
    percent = finished * 100 // batch.total if batch.total else 100
    return Progress({"total": batch.total, **counts}, percent)


@dataclass(frozen=True)
class ResultsPage:
    rows: Any  # an iterator of (task id, index, status, output, error, error_code)
    next_after: int | None  # the cursor of the next page, None when nothing more will follow


def results(*, batch: Batch, after: int = -1, limit: int = RESULTS_LIMIT) -> ResultsPage:
    """The finished items after index `after`, in index order, up to `limit` and never past
    the first unfinished item: so a client resuming at the last index it read misses no item
    that finishes later (a late item holds back the ones after it)."""
    first_unfinished = (
        Task.objects.filter(batch=batch, batch_index__gt=after, status__in=UNFINISHED)
        .order_by("batch_index")
        .values_list("batch_index", flat=True)
        .first()
    )
    end = batch.total if first_unfinished is None else first_unfinished  # exclusive
    page_end = max(after + 1, min(end, after + 1 + limit))
    rows = (
        Task.objects.filter(batch=batch, batch_index__gt=after, batch_index__lt=page_end)
        .order_by("batch_index")
        .values_list("pk", "batch_index", "status", "output", "error", "error_code")
        .iterator(chunk_size=500)
    )
    return ResultsPage(rows, page_end - 1 if page_end < batch.total else None)
