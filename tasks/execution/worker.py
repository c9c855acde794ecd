"""RQ worker classes that notice a killed worker within seconds and ride out a Redis outage.

Liveness. RQ alone notices a `kill -9`'d worker late: a SimpleWorker sends no heartbeat while a
job runs (its key lives job timeout + 60 s), and the abandoned-job sweep runs every 10 minutes.
These workers run a small thread that refreshes `taskhook:alive:<name>` every second with a TTL
of WORKER_ALIVE_TTL seconds (default 30), whatever the job is doing. The reconciler treats a
running task whose worker is a Taskhook worker without a live key as lost. The same beat puts the
worker back into Taskhook's and RQ's registries when Redis lost them (flushed, or restarted
empty), so the reconciler never calls a live worker's task lost, and writes the worker's batched
counters (tasks.telemetry.counters).

Redis outages. RQ's work loop retries a failed dequeue, but quits on a Redis error anywhere else
(the suspension check, maintenance, a job's bookkeeping, its own teardown), and its scheduler
process dies on the first one. Here every such place waits for Redis instead (1 s doubling to
30 s, the outage logged once), a job whose bookkeeping broke off is failed the way RQ fails one
whose work horse died (so its retry or the reconciler runs it again), and a scheduler that died
is restarted once Redis answers.

Control (the dashboard's Workers page). A paused queue (tasks.execution.pausing) is skipped at
dequeue, a job popped from one paused a moment before goes back to the front, and a worker whose
queues are all paused idles, beating. `STOP_NOW_COMMAND` stops a worker at once; RQ's shutdown
command stops it warmly.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import redis
from django.conf import settings
from django.db import close_old_connections, connections
from rq import worker_registration
from rq.command import parse_payload
from rq.exceptions import InvalidJobOperation, StopRequested
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.timeouts import TimerDeathPenalty
from rq.worker import BaseWorker, SimpleWorker, Worker, WorkerStatus

from tasks.execution import pausing
from tasks.scheduling import lanes
from tasks.telemetry import counters

logger = logging.getLogger(__name__)

ALIVE_KEY = "taskhook:alive:{name}"
STOP_NOW_COMMAND = "taskhook-stop-now"
KNOWN_WORKERS_KEY = "taskhook:heartbeat-workers"

# What an unreachable Redis raises (BusyLoadingError, "still loading its data", is one).
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# RQ blocks an idle worker on BLPOP for worker_ttl - 15 s (405 s). Waking this often lets it
# restart a scheduler that died in an outage, and notice a half-open connection, in seconds.
IDLE_WAKE_SECONDS = 10
SCHEDULER_RETRY_SECONDS = 10
# RQ joins its scheduler process without a bound when the worker stops; one that does not answer
# its SIGTERM within this is killed, so a stop always ends.
SCHEDULER_STOP_SECONDS = 5.0
# A warm stop of a delivery worker waits for its deliveries in flight (each bounded by the
# callback timeout); one still not done after this writes every thread's stack to the log.
STOP_REPORT_SECONDS = 20
STOP_NOW_REPORT_SECONDS = 5  # a stop at once has nothing to wait for
# How stale a worker's copy of the paused queues may be: a pause or resume takes effect this fast.
PAUSED_READ_SECONDS = 1.0
AGING_CHECK_SECONDS = 1.0


def alive_key(name: str) -> str:
    return ALIVE_KEY.format(name=name)


class RedisOutage:
    """Logs an outage once when it starts and once when it ends, however many calls fail in
    between; shared by a process's threads."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._since: float | None = None
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
                logger.warning(
                    "%s: Redis unavailable (%s: %s); retrying, backing off to %d s",
                    self.who,
                    type(error).__name__,
                    error,
                    BACKOFF_MAX_SECONDS,
                )

    def recovered(self) -> None:
        with self._lock:
            if self._since is not None:
                down_for = time.monotonic() - self._since
                logger.warning("%s: Redis is back after %.1f s", self.who, down_for)
                self._since = None


def wait_for_redis(
    connection: redis.Redis,
    outage: RedisOutage,
    should_stop: Callable[[], bool] = lambda: False,
) -> bool:
    """Block until Redis answers a PING, trying after 1 s, then 2, 4, … up to every 30 s.
    False if `should_stop()` turned true first."""
    delay = BACKOFF_FIRST_SECONDS
    while True:
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if should_stop():
                return False
            time.sleep(min(0.25, left))
        try:
            connection.ping()
        except REDIS_ERRORS as error:
            outage.failed(error)
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)
        else:
            outage.recovered()
            return True


# The mixin extends RQ's workers: type-check it as one (at runtime it mixes in before one).
if TYPE_CHECKING:
    _WorkerBase = BaseWorker
else:
    _WorkerBase = object


class LivenessMixin(_WorkerBase):
    # RQ retries a failed dequeue backing off to 60 s; the same cap as every other wait here.
    max_connection_wait_time = BACKOFF_MAX_SECONDS

    @property
    def dequeue_timeout(self) -> int:
        return min(super().dequeue_timeout, IDLE_WAKE_SECONDS)

    def work(self, *args, **kwargs):
        # django-rq's rqworker sets RQ's logger to INFO (a line per job) whatever LOGGING says;
        # RQ_LOG_LEVEL decides.
        kwargs["logging_level"] = settings.RQ_LOG_LEVEL
        ttl = settings.WORKER_ALIVE_TTL
        self._outage = RedisOutage(f"worker {self.name}")
        # Re-registration only between RQ's own birth and death (see register_birth, teardown).
        self._registration = threading.Lock()
        self._registered = False
        stop = threading.Event()
        counters.start_batching()

        def beat() -> None:
            while not stop.is_set():
                try:
                    self._keep_registered(ttl)
                except redis.RedisError as error:
                    self._outage.failed(error)
                else:
                    self._outage.recovered()
                try:
                    counters.flush()  # Redis errors are handled there; nothing may stop liveness
                    lanes.flush_taken()
                except Exception:
                    logger.exception("could not write counters")
                stop.wait(counters.FLUSH_SECONDS)

        thread = threading.Thread(target=beat, name="taskhook-liveness", daemon=True)
        thread.start()
        try:
            # Started while Redis is down: wait here, since RQ's registration would raise.
            try:
                self.connection.ping()
            except REDIS_ERRORS as error:
                self._outage.failed(error)
                wait_for_redis(self.connection, self._outage)
            return super().work(*args, **kwargs)
        finally:
            if not self.is_horse:
                self._reap_children()
            stop.set()
            thread.join(timeout=2)
            counters.flush()
            lanes.flush_taken()
            try:
                self.connection.delete(alive_key(self.name))
                self.connection.srem(KNOWN_WORKERS_KEY, self.name)
            except redis.RedisError:
                pass

    # --- registration ---------------------------------------------------------------------------

    def _keep_registered(self, ttl: int) -> None:
        """One round trip: the liveness key, Taskhook's worker set, and whether RQ's worker hash
        and its `rq:workers` entry are still there; put back what Redis lost."""
        with self.connection.pipeline(transaction=False) as batch:
            batch.set(alive_key(self.name), "1", ex=ttl)
            batch.sadd(KNOWN_WORKERS_KEY, self.name)
            batch.exists(self.key)
            batch.sismember(self.redis_workers_keys, self.key)
            *_, has_hash, listed = batch.execute()
        if has_hash and listed:
            return
        with self._registration:
            if not self._registered:
                return
            # What RQ's register_birth writes, without its "name already taken" check (the
            # name is ours) and without resetting the birth date.
            with self.connection.pipeline() as pipeline:
                pipeline.hset(self.key, mapping={**self.serialize(), "state": self._state})
                worker_registration.register(self, pipeline)
                pipeline.expire(self.key, self.worker_ttl + 60)
                pipeline.execute()
        logger.warning("worker %s: registered again (Redis had lost its registration)", self.name)

    def register_birth(self):
        super().register_birth()
        with self._registration:
            self._registered = True

    def teardown(self):
        with self._registration:
            self._registered = False
        try:
            super().teardown()
        except REDIS_ERRORS as error:  # stopping during an outage: nothing left to unregister
            self._outage.failed(error)

    # --- riding out a Redis outage --------------------------------------------------------------

    def _ride_out(self, error: BaseException) -> None:
        """Wait for Redis where RQ's loop would quit; a stop request (SIGTERM) ends the wait."""
        self._outage.failed(error)
        if not wait_for_redis(self.connection, self._outage, lambda: self._stop_requested):
            raise StopRequested()

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        while True:
            try:
                self._age_lanes()
                result = self._dequeue_unpaused(timeout, max_idle_time)
                if result is not None:
                    lanes.note_taken(result[1].name, result[0].id)
                return result
            except REDIS_ERRORS as error:  # RQ retries the dequeue itself, not what is around it
                self._ride_out(error)

    # --- priority lanes (tasks.scheduling.lanes) --------------------------------------------------

    _aged_at = float("-inf")

    def _age_lanes(self) -> None:
        """At most once a second, by a worker of the lanes: the starvation guard."""
        if time.monotonic() - self._aged_at < AGING_CHECK_SECONDS:
            return
        self._aged_at = time.monotonic()
        if set(self.queue_names()) & set(lanes.lane_names()):
            lanes.age(self.connection)

    # --- paused queues (tasks.execution.pausing) --------------------------------------------------

    _paused: frozenset[str] = frozenset()
    _paused_read_at = float("-inf")

    def _paused_queues(self) -> frozenset[str]:
        """The paused queue names, read from Redis at most once a second (one SMEMBERS)."""
        if time.monotonic() - self._paused_read_at >= PAUSED_READ_SECONDS:
            self._paused = frozenset(
                pausing.paused_names(self.connection, after_rebuild=self._after_database_use)
            )
            self._paused_read_at = time.monotonic()
        return self._paused

    def _after_database_use(self) -> None:
        # A work horse is a fork: it must not inherit (and share) this process's connection.
        if isinstance(self, Worker):
            connections.close_all()

    def _dequeue_unpaused(self, timeout, max_idle_time=None):
        """RQ's dequeue over the queues that are not paused. With nothing paused this is RQ's
        own call (plus a set lookup). With some paused, RQ sees only the others, a second at a
        time, so a resume is noticed. With all paused, the worker idles (beating)."""
        every = self._ordered_queues
        names = frozenset(queue.name for queue in every)
        idle_since = time.monotonic()
        while True:
            paused = self._paused_queues()
            if not paused & names:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
                if result is None:
                    return None  # burst mode found nothing, or max_idle_time ran out
            else:
                active = [queue for queue in every if queue.name not in paused]
                if not active:
                    if timeout is None or not self._idle_while_paused(
                        names, idle_since, max_idle_time
                    ):
                        return None
                    continue
                # One key would make RQ BLMOVE into an intermediate list, which only a worker
                # of one queue clears as it starts the job: the key twice keeps RQ's BLPOP.
                self._ordered_queues = active * 2 if len(active) == 1 else active
                try:
                    # max_idle_time=1 ends RQ's wait after one second without a job.
                    result = super().dequeue_job_and_maintain_ttl(
                        None if timeout is None else 1, None if timeout is None else 1
                    )
                finally:
                    self._ordered_queues = every
                if result is None:
                    if timeout is None or (
                        max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time
                    ):
                        return None
                    continue
            job, queue = result
            if queue.name not in self._paused_queues():
                return result
            # Popped from a queue paused while this worker waited on it: back to the front.
            with self.connection.pipeline() as pipeline:
                pipeline.lpush(queue.key, job.id)
                pipeline.lrem(queue.intermediate_queue_key, 1, job.id)
                pipeline.execute()
            logger.info("worker %s: put job %s back on paused queue %s", self.name, job.id,
                        queue.name)  # fmt: skip

    def _idle_while_paused(
        self, names: frozenset[str], idle_since: float, max_idle_time: int | None
    ) -> bool:
        """Every queue of this worker is paused: no dequeue; the heartbeat and maintenance go
        on. True once one is resumed, False when max_idle_time ran out. A stop request (SIGTERM,
        RQ's shutdown command) raises StopRequested from its signal handler, as in a dequeue."""
        self.set_state(WorkerStatus.IDLE)
        self.procline("Paused: " + ",".join(sorted(names)))
        while self._paused_queues() >= names:
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                return False
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            time.sleep(0.25)
        return True

    def run_maintenance_tasks(self):
        try:
            super().run_maintenance_tasks()
        except REDIS_ERRORS as error:
            self._ride_out(error)  # and maintenance runs again on the next round

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            self._execute_job(job, queue)
        except REDIS_ERRORS as error:
            self._ride_out(error)
            self._fail_interrupted(job, queue, error)

    def _execute_job(self, job: Job, queue: Queue) -> None:
        # What Django does at each request boundary: drop a connection that failed (a database
        # restart, a proxy's idle timeout) or outlived CONN_MAX_AGE, so one dead connection
        # costs at most the job that found it (retried, see queueing.INFRASTRUCTURE_RETRY).
        close_old_connections()
        super().execute_job(job, queue)

    def _fail_interrupted(self, job: Job, queue: Queue, error: BaseException) -> None:
        """A job's bookkeeping broke off on a Redis error: once Redis answers, fail the job as RQ
        fails one whose work horse died, so its retry policy (or the reconciler) runs it again;
        the task's guarded transitions make a second run harmless."""
        try:
            if job.get_status(refresh=True) not in (JobStatus.QUEUED, JobStatus.STARTED):
                return  # it ended (or was retried) before the error
            executions = [e for e in list(self.executions.values()) if e.job_id == job.id]
            reason = f"Redis failed during the job's bookkeeping: {error!r}"
            self.handle_job_failure(
                job, queue, exc_string=reason, execution=executions[0] if executions else None
            )
        except InvalidJobOperation:
            pass  # gone: Redis came back empty, and the reconciler re-enqueues the task
        except REDIS_ERRORS as again:
            self._outage.failed(again)  # down again: RQ's abandoned-job sweep takes it

    def _revive_scheduler(self) -> None:
        """RQ's scheduler process (which moves due scheduled jobs, such as callback retries, to
        their queues) exits on a Redis error, and RQ looks for a missing one only in its
        10-minute maintenance; the locks of one that was killed with its worker expire after a
        minute. Every 10 s, a worker whose scheduler is not running tries to take the locks and
        start it (RQ's own step, one SET per queue)."""
        scheduler = self.scheduler
        if scheduler is None or self.is_horse or self._stop_requested:
            return
        process = scheduler._process
        if (process is not None and process.is_alive()) or (
            time.monotonic() < self._scheduler_retry_at
        ):
            return
        self._scheduler_retry_at = time.monotonic() + SCHEDULER_RETRY_SECONDS
        try:
            if scheduler.acquire_locks(auto_start=True) and process is not None:
                logger.warning("worker %s: restarted RQ's scheduler, which had exited", self.name)
        except REDIS_ERRORS as error:
            self._outage.failed(error)

    _scheduler_retry_at = 0.0

    def stop_scheduler(self) -> None:
        process = self.scheduler._process if self.scheduler else None
        if process is None or process.pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(SCHEDULER_STOP_SECONDS)
        if process.is_alive():
            logger.warning("worker %s: RQ's scheduler did not stop; killed", self.name)
            process.kill()
            process.join(1)
            with contextlib.suppress(*REDIS_ERRORS):  # else they expire in a minute
                self.scheduler.release_locks()

    @staticmethod
    def _report_stop_after(seconds: float) -> None:
        """A stop still not done after `seconds` writes every thread's stack to stderr (the
        worker's log): where it is stuck."""
        with contextlib.suppress(ValueError, OSError, RuntimeError):  # stderr not a file
            faulthandler.dump_traceback_later(seconds)

    def _reap_children(self) -> None:
        # multiprocessing joins every child left at exit, without a bound: a scheduler started
        # where RQ no longer tracks it (a stop that came while one was starting) would keep this
        # process from ever exiting.
        for child in multiprocessing.active_children():
            child.terminate()
            child.join(SCHEDULER_STOP_SECONDS)
            if child.is_alive():
                child.kill()
                child.join(1)

    def maintain_heartbeats(self, job: Job, execution) -> None:
        try:  # a forking worker's monitor: the horse goes on, so does the watching
            super().maintain_heartbeats(job, execution)
        except REDIS_ERRORS as error:
            self._outage.failed(error)

    def set_shutdown_requested_date(self) -> None:
        try:  # called from the SIGTERM handler; only informative
            super().set_shutdown_requested_date()
        except REDIS_ERRORS as error:
            self._outage.failed(error)

    # --- stopping at once (dashboard: Workers page) -----------------------------------------------

    # RQ's commands stop a worker warmly (shutdown: the current job finishes) or stop a work
    # horse, which a SimpleWorker does not have; its cold shutdown needs a second signal more
    # than a second after the first. This command is that cold shutdown in one step: the job in
    # progress is interrupted (a horse killed), the worker exits, and the reconciler recovers
    # the task as a lost worker's (its liveness key is gone).
    _stop_now = False

    def handle_payload(self, message):
        payload = parse_payload(message)
        if payload.get("command") != STOP_NOW_COMMAND:
            return super().handle_payload(message)
        logger.warning("worker %s: stop at once requested", self.name)
        self._stop_now = True
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread: request_stop
        return None

    def request_stop(self, signum, frame):
        if self._stop_now:
            self._stop_requested = True
            self._report_stop_after(STOP_NOW_REPORT_SECONDS)
            if self.horse_pid:
                self.kill_horse()
                self.wait_for_horse()
            raise SystemExit()
        return super().request_stop(signum, frame)

    def request_force_stop(self, signum, frame):
        # After a warm stop RQ handles signals here, ignoring one within a second of the first.
        if self._stop_now:
            return self.request_stop(signum, frame)
        return super().request_force_stop(signum, frame)

    def _pubsub_exception_handler(self, exc, pubsub, pubsub_thread) -> None:
        # RQ logs an error every 2 s of an outage here (and lets a timeout end the thread).
        if not isinstance(exc, REDIS_ERRORS):
            return super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)
        self._outage.failed(exc)
        time.sleep(2.0)
        return None

    # --- fewer round trips ----------------------------------------------------------------------

    # RQ refreshes its worker key up to three times per job, three commands each (HSET, two
    # EXPIREs), one round trip per command: much of its Redis traffic for a no-op job. Here
    # the refresh goes in one round trip and at most once a second while the worker is busy; the
    # key lives worker_ttl + 60 s, so a second is plenty. A heartbeat that carries a job's own
    # TTL (inside RQ's pipelines) is never skipped.
    _last_heartbeat_sent = 0.0

    def heartbeat(self, timeout=None, pipeline=None):
        if timeout is not None or pipeline is not None:
            return super().heartbeat(timeout, pipeline)
        if time.monotonic() - self._last_heartbeat_sent < 1.0:
            return None
        self._revive_scheduler()  # the main thread, at least every IDLE_WAKE_SECONDS
        try:
            with self.connection.pipeline(transaction=False) as batch:
                super().heartbeat(pipeline=batch)
                batch.execute()
        except REDIS_ERRORS as error:
            self._outage.failed(error)  # the next Redis call in RQ's loop waits it out
            return None
        self._last_heartbeat_sent = time.monotonic()
        return None

    # RQ asks Redis whether workers are suspended (`rq suspend`) before every job: one round trip
    # per job. Once a second is soon enough for an operator's command.
    _suspension_checked_at = float("-inf")

    def check_for_suspension(self, burst: bool) -> None:
        if time.monotonic() - self._suspension_checked_at < 1.0:
            return
        try:
            super().check_for_suspension(burst)
        except REDIS_ERRORS as error:
            self._ride_out(error)
        self._suspension_checked_at = time.monotonic()

    def set_state(self, state, pipeline=None):
        # SimpleWorker marks itself idle after each job and again before the next dequeue.
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline)


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
            # A warm stop that came after RQ's loop looked (while it was busy): take no more.
            if self._stop_requested:
                raise StopRequested()
            while not self._slots.acquire(timeout=10):
                self.heartbeat()
            if self._stop_requested:
                self._slots.release()
                raise StopRequested()
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

    def _execute_job(self, job: Job, queue: Queue) -> None:
        try:
            execution = self.prepare_execution(job)
        except BaseException:
            self._slots.release()
            raise
        self._pool.submit(self._perform_in_thread, job, queue, execution)

    def set_state(self, state, pipeline=None):
        # RQ marks the worker idle before each dequeue; with deliveries still in flight it is
        # busy (and the round trip is saved). The last delivery to end marks it idle.
        if state == WorkerStatus.IDLE and pipeline is None and self.executions:
            return
        super().set_state(state, pipeline)

    def _perform_in_thread(self, job: Job, queue: Queue, execution) -> None:
        try:
            close_old_connections()  # this thread's connection (see LivenessMixin._execute_job)
            self.perform_job(job, queue, execution)
        except REDIS_ERRORS as error:
            self._outage.failed(error)
            if wait_for_redis(self.connection, self._outage, lambda: self._stop_requested):
                self._fail_interrupted(job, queue, error)
        except Exception:
            logger.exception("delivery thread failed", extra={"job_id": job.id})
        finally:
            self._slots.release()
            if not self.executions:
                try:
                    self.set_state(WorkerStatus.IDLE)
                except REDIS_ERRORS as error:
                    self._outage.failed(error)

    def _shutdown(self) -> None:
        # Warm shutdown (SIGTERM): RQ waits for "the" job when busy, but here the main thread may
        # be blocked on the queue while deliveries run; stop taking jobs at once, and teardown
        # lets the deliveries in flight finish.
        self._report_stop_after(STOP_REPORT_SECONDS)
        if self._waiting:
            raise StopRequested()
        super()._shutdown()

    def teardown(self) -> None:
        self._pool.shutdown(wait=True)
        super().teardown()
