"""RQ job functions. Thin by design: they take ids and call the domain services."""

from __future__ import annotations

from rq import get_current_job

from tasks.delivery import batch_callbacks, callbacks, destinations
from tasks.execution import auto_retry
from tasks.execution.executor import execute_task
from tasks.scheduling import dispatch
from tasks.upkeep import bulk


def run_task(task_id: str, run: int) -> str:
    job = get_current_job()
    worker_name = (job.worker_name or "") if job else ""
    outcome = execute_task(task_id=task_id, run=run, worker_name=worker_name)
    dispatch.run_ended()  # not after an exception: RQ runs the job again (queueing)
    return outcome


def deliver_callback(
    task_id: str, run: int, trigger: str, auto_attempt: int | None, endpoint: str = ""
) -> str:
    job = get_current_job()
    return callbacks.deliver(
        task_id=task_id, run=run, trigger=trigger, auto_attempt=auto_attempt,
        endpoint=endpoint, job_id=job.id if job else "",
    )  # fmt: skip


def deliver_to_destination(
    destination_id: int,
    task_id: str | None,
    run: int,
    trigger: str,
    auto_attempt: int | None,
    batch_id: str | None = None,
) -> str:
    return destinations.deliver(
        destination_id=destination_id, task_id=task_id, batch_id=batch_id, run=run,
        trigger=trigger, auto_attempt=auto_attempt,
    )  # fmt: skip


def deliver_batch_callback(batch_id: str, completion: int, attempt: int) -> str:
    return batch_callbacks.deliver(batch_id=batch_id, completion=completion, attempt=attempt)


def enqueue_due_run(task_id: str, run: int) -> bool:
    """An automatic retry's backoff is over (scheduled by tasks.execution.auto_retry)."""
    return auto_retry.enqueue_due_run(task_id=task_id, run=run)


def run_bulk_operation(operation_id: int) -> int:
    return bulk.run(operation_id=operation_id).affected
