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
from concurrent.futures import ThreadPoolExecutor

import redis
from django.conf import settings
from django.db import close_old_connections
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, Worker, WorkerStatus

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

    # RQ refreshes its worker key up to three times per job, three commands each (HSET, two
    # EXPIREs), one round trip per command: a third of its Redis traffic for a no-op job. Here
    # the refresh goes in one round trip and at most once a second while the worker is busy; the
    # key lives worker_ttl + 60 s, so a second is plenty. A heartbeat that carries a job's own
    # TTL (inside RQ's pipelines) is never skipped.
    _last_heartbeat_sent = 0.0

    def heartbeat(self, timeout=None, pipeline=None):
        if timeout is not None or pipeline is not None:
            return super().heartbeat(timeout, pipeline)
        if time.monotonic() - self._last_heartbeat_sent < 1.0:
            return None
        with self.connection.pipeline(transaction=False) as batch:
            super().heartbeat(pipeline=batch)
            batch.execute()
        self._last_heartbeat_sent = time.monotonic()
        return None

    # RQ asks Redis whether workers are suspended (`rq suspend`) before every job: one round trip
    # per job. Once a second is soon enough for an operator's command.
    _suspension_checked_at = float("-inf")

    def check_for_suspension(self, burst: bool) -> None:
        if time.monotonic() - self._suspension_checked_at < 1.0:
            return
        super().check_for_suspension(burst)
        self._suspension_checked_at = time.monotonic()

    def set_state(self, state, pipeline=None):
        # SimpleWorker marks itself idle after each job and again before the next dequeue.
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline)

    def execute_job(self, job, queue):
        # What Django does at each request boundary: drop a connection that failed (a database
        # restart, a proxy's idle timeout) or outlived CONN_MAX_AGE, so one dead connection
        # costs at most the job that found it (retried, see queueing.INFRASTRUCTURE_RETRY).
        close_old_connections()
        return super().execute_job(job, queue)


class TaskhookWorker(LivenessMixin, SimpleWorker):
    """No fork per job (fast); the default for the task queue."""


class TaskhookForkingWorker(LivenessMixin, Worker):
    """A fork per job: a crashing or leaking runner cannot take the worker down with it."""


class TaskhookDeliveryWorker(TaskhookWorker):
    """Several jobs at once in one process, one thread each (CALLBACK_CONCURRENCY): for the
    callbacks queue.

    A delivery spends most of its time waiting on the receiver, the database and Redis; a worker
    that runs one at a time delivers at most 1 / (receiver's answer time) per second, so a slow
    receiver would need a process per concurrent request. Threads overlap the waits. RQ 3 keeps
    several executions per worker; job timeouts use a timer (a signal reaches only the main
    thread); each thread has its own database connection.
    """

    death_penalty_class = TimerDeathPenalty

    def work(self, *args, **kwargs):
        size = max(1, settings.CALLBACK_CONCURRENCY)
        self._slots = threading.BoundedSemaphore(size)
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="delivery")
        self._waiting = False
        return super().work(*args, **kwargs)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        # A job leaves the queue only when a thread is free to run it, so a busy worker never
        # holds jobs another worker could take.
        self._waiting = True
        try:
            while not self._slots.acquire(timeout=10):
                self.heartbeat()
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except BaseException:
                self._slots.release()
                raise
        finally:
            self._waiting = False
        if result is None:
            self._slots.release()
        return result

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        self._pool.submit(self._perform_in_thread, job, queue, execution)

    def set_state(self, state, pipeline=None):
        # RQ marks the worker idle before each dequeue; with deliveries still in flight it is
        # busy (and the round trip is saved). The last delivery to end marks it idle.
        if state == WorkerStatus.IDLE and pipeline is None and self.executions:
            return
        super().set_state(state, pipeline)

    def _perform_in_thread(self, job: Job, queue: Queue, execution) -> None:
        try:
            close_old_connections()  # this thread's connection (see LivenessMixin.execute_job)
            self.perform_job(job, queue, execution)
        except Exception:
            logger.exception("delivery thread failed", extra={"job_id": job.id})
        finally:
            self._slots.release()
            if not self.executions:
                self.set_state(WorkerStatus.IDLE)

    def _shutdown(self) -> None:
        # Warm shutdown (SIGTERM): RQ waits for "the" job when busy, but here the main thread may
        # be blocked on the queue while deliveries run; stop taking jobs at once, and teardown
        # lets the deliveries in flight finish.
        if self._waiting:
            raise StopRequested()
        super()._shutdown()

    def teardown(self) -> None:
        self._pool.shutdown(wait=True)
        super().teardown()
