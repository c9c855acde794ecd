"""RQ job functions. Thin by design: they take ids and call the domain services."""

from __future__ import annotations

from rq import get_current_job

from tasks.delivery import callbacks
from tasks.execution.executor import execute_task
from tasks.upkeep import bulk


def run_task(task_id: str, run: int) -> str:
    job = get_current_job()
    worker_name = (job.worker_name or "") if job else ""
    return execute_task(task_id=task_id, run=run, worker_name=worker_name)


def deliver_callback(
    task_id: str, run: int, trigger: str, auto_attempt: int | None, endpoint: str = ""
) -> str:
    job = get_current_job()
    return callbacks.deliver(
        task_id=task_id, run=run, trigger=trigger, auto_attempt=auto_attempt,
        endpoint=endpoint, job_id=job.id if job else "",
    )  # fmt: skip


def run_bulk_operation(operation_id: int) -> int:
    return bulk.run(operation_id=operation_id).affected
