"""The RQ queue names of the priority lanes (tasks.scheduling.lanes), on their own so that the
process definitions (dashboard.runtime.processes) and the settings can name them too."""

from __future__ import annotations


def task_lanes(task_queue: str) -> tuple[str, str, str]:
    """Highest first. `normal` is the task queue itself, so jobs queued before lanes existed
    still run."""
    return (f"{task_queue}-high", task_queue, f"{task_queue}-low")
