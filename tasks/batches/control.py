"""Acting on a batch as a whole: cancel what has not finished."""

from __future__ import annotations

import logging

import redis

from tasks import state
from tasks.batches import completion
from tasks.events import catalog
from tasks.events import stream as event_stream
from tasks.models import Batch, Task
from tasks.plumbing.queueing import publish_finished, redis_client, task_job_id
from tasks.scheduling import dispatch, fairness
from tasks.statuses import TaskStatus

logger = logging.getLogger(__name__)

CANCEL_CHUNK = 500  # items per UPDATE of a cancel


def _chunks[T](values: list[T], size: int) -> list[list[T]]:
    return [values[start : start + size] for start in range(0, len(values), size)]


def cancel_batch(*, batch: Batch) -> int:
    """Cancel every unfinished item (services.cancel_task's semantics, CANCEL_CHUNK items a
    statement): a waiting item is cancelled where it waits and its key's slot passes on, a
    running one is cancelled at once and its runner told to stop. Returns items cancelled."""
    from tasks.services import _stop_job as stop_job  # services imports submission too

    Batch.objects.filter(pk=batch.pk).update(cancel_requested=True)
    batch.cancel_requested = True
    application = batch.application
    cancelled = 0
    dropped: dict[fairness.Key, list[str]] = {}
    for status in (TaskStatus.PENDING, TaskStatus.RUNNING):
        after = -1
        while True:
            ids = list(
                Task.objects.filter(batch=batch, status=status, batch_index__gt=after)
                .order_by("batch_index")
                .values_list("pk", "batch_index")[:CANCEL_CHUNK]
            )
            if not ids:
                break
            after = ids[-1][1] or 0  # never None: items have an index
            won = state.cancel_many(task_ids=[pk for pk, _ in ids], expected=status)
            cancelled += len(won)
            _announce_finished(won)
            for task in won:
                if status == TaskStatus.RUNNING:
                    stop_job(task_job_id(task.id, task.run))
                elif (key := fairness.key_of(task, application)) is not None:
                    dropped.setdefault(key, []).append(task_job_id(task.id, task.run))
    for key, job_ids in dropped.items():
        for chunk in _chunks(job_ids, CANCEL_CHUNK):
            dispatch.runs_dropped(key=key, job_ids=chunk)
    completion.settle(batch_id=batch.pk)
    return cancelled


def _announce_finished(tasks: list[Task]) -> None:
    """executor.announce_finished for many tasks in one Redis trip; best effort as it is."""
    if not tasks:
        return
    pipeline = redis_client().pipeline(transaction=False)
    for task in tasks:
        event_stream.add(pipeline, task_id=task.id, run=task.run, event=catalog.FINISHED, data={})
        publish_finished(task.id, pipeline=pipeline)
    try:
        pipeline.execute()
    except redis.RedisError as exc:
        logger.warning("could not announce the end of %d cancelled items: %s", len(tasks), exc)
