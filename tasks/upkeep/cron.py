"""RQ cron configuration, run by `manage.py taskhookcron` (started by `make run`, and the
Procfile's `cron` process): RQ's cron scheduler with these registrations, which waits out a Redis
outage instead of exiting. `manage.py rqcron tasks.upkeep.cron` loads the same file.

Intervals come from settings (CLEANUP_INTERVAL, RECONCILE_INTERVAL, ROLLUP_INTERVAL), which read
the environment.
"""

from django.conf import settings
from rq import cron

from tasks.execution.deadlines import SWEEP_INTERVAL_SECONDS
from tasks.upkeep.maintenance import (
    cleanup_job,
    deadline_sweep_job,
    reconcile_job,
    rollup_job,
    sample_stats_job,
    triage_backfill_job,
)

cron.register(
    reconcile_job,
    settings.MAINTENANCE_QUEUE,
    interval=settings.RECONCILE_INTERVAL,
    job_timeout=300,
    result_ttl=3600,
    name="reconcile",
)

# Runs past their start_by (max_queue_seconds) or deadline_at (Cancel-After, deadline_seconds)
# fail within about this interval, however long the queue in front of them.
cron.register(
    deadline_sweep_job,
    settings.MAINTENANCE_QUEUE,
    interval=SWEEP_INTERVAL_SECONDS,
    job_timeout=60,
    result_ttl=60,
    name="deadline-sweep",
)

cron.register(
    sample_stats_job,
    settings.MAINTENANCE_QUEUE,
    interval=10,
    job_timeout=60,
    result_ttl=60,
    name="sample-stats",
)

cron.register(
    rollup_job,
    settings.MAINTENANCE_QUEUE,
    interval=settings.ROLLUP_INTERVAL,
    job_timeout=600,
    result_ttl=600,
    name="rollup",
)

cron.register(
    cleanup_job,
    settings.MAINTENANCE_QUEUE,
    interval=settings.CLEANUP_INTERVAL,
    job_timeout=3600,
    result_ttl=3600,
    name="cleanup",
)

# Failed rows from before failure triage get their fingerprints, 500 x 10 of each kind a minute.
cron.register(
    triage_backfill_job,
    settings.MAINTENANCE_QUEUE,
    interval=60,
    job_timeout=300,
    result_ttl=300,
    name="triage-backfill",
)
