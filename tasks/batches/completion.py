"""A batch's end, decided once: the one statement that moves a batch from running to finished
(cancelled when a cancel was requested) when every item is stored and none is unfinished.
Whoever runs it first after the last item ended wins — the worker that finished that item, a
cancel, the poll, the end of the ingestion, or the reconciler's sweep — so `batch.finished`
is scheduled once per completion. An item run again (a retry) reopens the batch, and its next
end is a new completion.

The probe is one lookup on task_batch_unfinished_part_idx, whatever the batch's size.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from django.db.models import Case, Exists, F, OuterRef, Q, Value, When
from django.utils import timezone

from tasks.models import Batch, CallbackStatus, Task
from tasks.statuses import UNFINISHED

logger = logging.getLogger(__name__)

SWEEP_LIMIT = 200  # running batches the reconciler checks a pass, oldest first


def settle(*, batch_id: uuid.UUID | str) -> bool:
    """Finish the batch if its last item has ended; True for the one call that did. The
    winner schedules the batch's callback (tasks.delivery.batch_callbacks)."""
    from tasks.delivery import batch_callbacks  # delivery imports the batches' presenters

    now = timezone.now()
    unfinished = Task.objects.filter(batch_id=OuterRef("pk"), status__in=UNFINISHED)
    has_callback = ~Q(callback_url="")
    won = (
        Batch.objects.filter(pk=batch_id, status=Batch.Status.RUNNING, ingesting=False)
        .filter(~Exists(unfinished))
        .update(
            status=Case(
                When(cancel_requested=True, then=Value(Batch.Status.CANCELLED)),
                default=Value(Batch.Status.FINISHED),
            ),
            finished_at=now,
            completions=F("completions") + 1,
            callback_attempts=0,
            callback_status=Case(
                When(has_callback, then=Value(CallbackStatus.PENDING)),
                default=Value(CallbackStatus.NONE),
            ),
            callback_next_attempt_at=Case(When(has_callback, then=Value(now)), default=None),
        )
    )
    if not won:
        return False
    logger.info("batch finished", extra={"batch_id": str(batch_id)})
    batch_callbacks.schedule_first(batch_id=batch_id)
    return True


def item_finished(*, batch_id: uuid.UUID | str | None) -> None:
    """After an item reached a final status (executor.on_task_finished, a cancel)."""
    if batch_id is not None:
        settle(batch_id=batch_id)


def reopen(*, batch_ids: Iterable[uuid.UUID | str | None]) -> int:
    """Items of these batches run again: each finished batch is running again (its callback,
    if one is still being retried, stops: the next completion sends the new counts)."""
    wanted = {str(batch_id) for batch_id in batch_ids if batch_id is not None}
    if not wanted:
        return 0
    return (
        Batch.objects.filter(pk__in=wanted)
        .exclude(status=Batch.Status.RUNNING)
        .update(
            status=Batch.Status.RUNNING, finished_at=None, callback_next_attempt_at=None,
            callback_status=Case(
                When(callback_status=CallbackStatus.PENDING, then=Value(CallbackStatus.NONE)),
                default=F("callback_status"),
            ),
        )
    )  # fmt: skip


def sweep(*, limit: int = SWEEP_LIMIT) -> int:
    """The safety net (reconciler): settle running batches whose items all ended without the
    hook that settles them (a worker killed between an item's end and the hook). Returns how
    many finished."""
    unfinished = Task.objects.filter(batch_id=OuterRef("pk"), status__in=UNFINISHED)
    ids = list(
        Batch.objects.filter(status=Batch.Status.RUNNING, ingesting=False)
        .filter(~Exists(unfinished))
        .order_by("created_at")
        .values_list("pk", flat=True)[:limit]
    )
    return sum(settle(batch_id=batch_id) for batch_id in ids)
