"""`manage.py taskhookcron`: RQ's cron scheduler for tasks.upkeep.cron, riding out Redis outages.

RQ's CronScheduler.start() ends with an exception on the first Redis error (while enqueueing,
or in its heartbeat), and django-rq's `rqcron` exits with it. This runs the same scheduler, with
the same registrations, and on a Redis error waits for Redis (1 s doubling to 30 s, the outage
logged once) and starts it again. A cron job whose enqueue failed is still due, so it is enqueued
once Redis is back; the schedule of the others is kept.
"""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand
from django_rq.cron import DjangoCronScheduler
from rq.exceptions import StopRequested

from tasks.execution.worker import REDIS_ERRORS, RedisOutage, wait_for_redis


class Command(BaseCommand):
    help = "RQ's cron scheduler (tasks.upkeep.cron), reconnecting to Redis after outages."

    def add_arguments(self, parser):
        parser.add_argument("config_path", nargs="?", default="tasks.upkeep.cron")
        parser.add_argument(
            "--logging-level",
            "-l",
            choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
            default="INFO",
        )

    def handle(self, *args, **options):
        scheduler = CronScheduler(logging_level=getattr(logging, options["logging_level"]))
        scheduler.load_config_from_file(options["config_path"])
        self.stdout.write(f"Starting cron scheduler with {len(scheduler.get_jobs())} jobs...")
        run(scheduler)


class CronScheduler(DjangoCronScheduler):
    stop_requested = False

    def _request_stop(self, signum, frame):
        # A stop during an outage ends in a Redis error (start()'s `finally` unregisters),
        # which must not be taken for one more outage to wait out.
        self.stop_requested = True
        super()._request_stop(signum, frame)


def run(scheduler: CronScheduler) -> None:
    """Until SIGINT/SIGTERM (the scheduler's handlers raise StopRequested, which start() turns
    into a clean return while it runs)."""
    outage = RedisOutage(f"cron {scheduler.name}")
    try:
        while not scheduler.stop_requested:
            try:
                scheduler.start()
                return
            except REDIS_ERRORS as error:  # its `finally` (register_death) may raise it again
                outage.failed(error)
            wait_for_redis(scheduler.connection, outage, lambda: scheduler.stop_requested)
    except (StopRequested, KeyboardInterrupt):
        pass  # stopped while waiting for Redis
