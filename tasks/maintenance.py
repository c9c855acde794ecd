"""Periodic jobs, registered with RQ's cron by `tasks/cron.py` and run on the maintenance queue."""

from __future__ import annotations

from .reconciler import reconcile


def reconcile_job() -> dict[str, int | bool]:
    report = reconcile()
    return {
        "skipped": report.skipped,
        "requeued": len(report.requeued),
        "lost": len(report.lost),
        "rerun": len(report.rerun),
        "callbacks_rescheduled": len(report.callbacks_rescheduled),
    }
