"""Following a batch: its counts and status (read from its items, one aggregate query on the
partial index task_batch_part_idx, never kept in step) and its results, paged by index."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from django.db.models import Count

from tasks.batches import completion
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
    """The counts per status, and the batch's status: `running` while an item has not
    finished, then `finished` (`cancelled` when a cancel was requested; tasks.batches.completion
    decides it); an item retried later makes it running again."""
    counts = counts_of(batch_id=batch.pk)
    unfinished = sum(counts[status] for status in UNFINISHED)
    # Normally the item's end settled the batch already; this catches up with a lost hook.
    if (unfinished == 0) == (batch.status == Batch.Status.RUNNING):
        if unfinished:
            completion.reopen(batch_ids=[batch.pk])
        else:
            completion.settle(batch_id=batch.pk)
        batch.status, batch.finished_at = Batch.objects.values_list("status", "finished_at").get(
            pk=batch.pk
        )
    finished = sum(counts[status] for status in FINISHED)
    percent = finished * 100 // batch.total if batch.total else 100
    return Progress({"total": batch.total, **counts}, percent)


def counts_of(*, batch_id: uuid.UUID) -> dict[str, int]:
    """Items per status (COUNTED): one aggregate query on the partial index."""
    counts = dict.fromkeys(COUNTED, 0)
    for status, count in (
        Task.objects.filter(batch_id=batch_id)
        .values("status")
        .annotate(count=Count("pk"))
        .values_list("status", "count")
    ):
        counts[status] = count
    return counts


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
