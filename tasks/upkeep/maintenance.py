"""Periodic jobs, registered with RQ's cron by `tasks/upkeep/cron.py`, run on the maintenance
queue."""

from __future__ import annotations

from tasks.telemetry.stats_history import sample_queue_depth
from tasks.upkeep.reconciler import reconcile


def reconcile_job() -> dict[str, int | bool]:
    report = reconcile()
    return {
        "skipped": report.skipped,
        "requeued": len(report.requeued),
        "lost": len(report.lost),
        "rerun": len(report.rerun),
        "callbacks_rescheduled": len(report.callbacks_rescheduled),
    }


def deadline_sweep_job() -> dict[str, int]:
    """Fail the runs past their start_by or deadline_at (tasks.execution.deadlines)."""
    from tasks.execution.deadlines import sweep

    report = sweep()
    return {"pending": len(report.expired_pending), "running": len(report.expired_running)}


def sample_stats_job() -> dict[str, int]:
    from tasks.execution.pausing import reassert

    # Every 10 s: the workers' copy of the paused queues is put back from the table (a Redis
    # restart or flush lost it); workers that find it missing rebuild it themselves too.
    reassert()
    return sample_queue_depth()


def rollup_job() -> dict[str, int]:
    from tasks.telemetry.rollups import roll_up

    report = roll_up()
    return {"minutes": report.minutes, "hours": report.hours, "pruned": report.pruned}


def cleanup_job() -> int | None:
    from tasks.models import CleanupRun
    from tasks.upkeep.retention import run_cleanup

    run = run_cleanup(trigger=CleanupRun.Trigger.SCHEDULED)
    return run.total_removed if run else None


def triage_backfill_job() -> dict[str, int]:
    """Fingerprint failed rows written before failure triage (tasks.triage), a bounded number a
    run; once none are left each run is two empty index probes."""
    from tasks.triage import backfill

    report = backfill(batch=500, batches=10)
    return {"tasks": report.tasks, "callbacks": report.callbacks}
