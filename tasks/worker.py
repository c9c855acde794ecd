"""RQ worker classes with a liveness key, so a killed worker is noticed within seconds.

RQ alone notices a `kill -9`'d worker late: a SimpleWorker sends no heartbeat while a job runs
(its key lives job timeout + 60 s), and the abandoned-job sweep runs every 10 minutes. These
workers run a small thread that refreshes `taskhook:alive:<name>` every HEARTBEAT_SECONDS with a
TTL of WORKER_ALIVE_TTL seconds (default 30), whatever the job is doing. The reconciler treats a
running task whose worker is a Taskhook worker without a live key as lost. The same thread writes
the worker's batched counters (tasks.counters) once a second.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from django.conf import settings
from django.db import close_old_connections
from rq.worker import SimpleWorker, Worker

from . import counters

logger = logging.getLogger(__name__)

ALIVE_KEY = "taskhook:alive:{name}"
KNOWN_WORKERS_KEY = "taskhook:heartbeat-workers"


def alive_key(name: str) -> str:
    return ALIVE_KEY.format(name=name)


class LivenessMixin:
    def work(self, *args, **kwargs):
        # django-rq's rqworker sets RQ's logger to INFO (a line per job) whatever LOGGING says;
        # RQ_LOG_LEVEL decides.
        kwargs["logging_level"] = settings.RQ_LOG_LEVEL
        ttl = settings.WORKER_ALIVE_TTL
        stop = threading.Event()
        connection = self.connection
        counters.start_batching()

        def beat() -> None:
            next_alive = 0.0
            while not stop.is_set():
                if time.monotonic() >= next_alive:
                    try:
                        connection.set(alive_key(self.name), "1", ex=ttl)
                    except redis.RedisError:
                        logger.warning("liveness heartbeat failed; Redis unreachable")
                    next_alive = time.monotonic() + max(1.0, ttl / 3)
                try:
                    counters.flush()  # Redis errors are handled there; nothing may stop liveness
                except Exception:
                    logger.exception("could not write counters")
                stop.wait(counters.FLUSH_SECONDS)

        try:
            connection.sadd(KNOWN_WORKERS_KEY, self.name)
        except redis.RedisError:
            pass
        thread = threading.Thread(target=beat, name="taskhook-liveness", daemon=True)
        thread.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            stop.set()
            thread.join(timeout=2)
            counters.flush()
            try:
                connection.delete(alive_key(self.name))
                connection.srem(KNOWN_WORKERS_KEY, self.name)
            except redis.RedisError:
                pass

    def execute_job(self, job, queue):
        # What Django does at each request boundary: drop a connection that failed (a database
        # restart, a proxy's idle timeout) or outlived CONN_MAX_AGE, so one dead connection
        # costs at most the job that found it (retried, see queueing.INFRASTRUCTURE_RETRY).
        close_old_connections()
        return super().execute_job(job, queue)


class TaskhookWorker(LivenessMixin, SimpleWorker):
    """No fork per job (fast); the default for task and callback queues."""


class TaskhookForkingWorker(LivenessMixin, Worker):
    """A fork per job: a crashing or leaking runner cannot take the worker down with it."""
