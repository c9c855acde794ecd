"""RQ cron configuration, loaded by `manage.py rqcron tasks.cron` (started by `make run`).

Intervals come from settings (CLEANUP_INTERVAL, RECONCILE_INTERVAL), which read the environment.
"""

from django.conf import settings
from rq import cron

from tasks.maintenance import reconcile_job

cron.register(
    reconcile_job,
    settings.MAINTENANCE_QUEUE,
    interval=settings.RECONCILE_INTERVAL,
    job_timeout=300,
    result_ttl=3600,
    name="reconcile",
)
