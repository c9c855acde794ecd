"""Every Django, RQ and psycopg internal Taskhook overrides or relies on, in one list.

Each seam names the library's attribute, the parameters our override assumes and where the
override lives. tests/unit/test_seams.py checks the list against the installed libraries (the
attribute exists, its parameters are these, the private state it names is still used by the
library's code) and checks that the list is complete: a method of one of our subclasses that
shadows a library attribute and is not listed fails the suite. The dependency ranges in
pyproject.toml stop at the next minor release of each library listed in CHECKED_AGAINST, so a
change there is a deliberate upgrade: bump the range, run the test, revisit what it names.
"""

from __future__ import annotations

from typing import NamedTuple


class Seam(NamedTuple):
    owner: str  # dotted path of the library class
    attribute: str
    parameters: tuple[str, ...] | None  # the method's parameter names (None: not a method)
    where: str  # our override or use
    why: str
    private_state: tuple[str, ...] = ()  # private names of `owner` the override reads or sets


CHECKED_AGAINST = {"django": "6.1", "rq": "3.0", "psycopg": "3.3"}

RQ_WORKER = "rq.worker.Worker"
BASE_HANDLER = "django.core.handlers.base.BaseHandler"
PG_WRAPPER = "django.db.backends.postgresql.base.DatabaseWrapper"
SQLITE_WRAPPER = "django.db.backends.sqlite3.base.DatabaseWrapper"
LIVENESS = "tasks.execution.worker.LivenessMixin"
DELIVERY = "tasks.execution.worker.TaskhookDeliveryWorker"

SEAMS: tuple[Seam, ...] = (
    # --- RQ's worker (tasks/execution/worker.py) ---------------------------------------------
    Seam(RQ_WORKER, "max_connection_wait_time", None, LIVENESS,
         "the dequeue's reconnect backoff capped like every other wait"),
    Seam(RQ_WORKER, "dequeue_timeout", None, LIVENESS,
         "wake an idle worker often enough to beat its liveness key"),
    Seam(RQ_WORKER, "work", ("self", "burst", "logging_level", "date_format", "log_format",
                             "max_jobs", "max_idle_time", "with_scheduler", "dequeue_strategy"),
         LIVENESS, "start the liveness thread; wait for Redis instead of exiting",
         ("_stop_requested",)),
    Seam(RQ_WORKER, "register_birth", ("self",), LIVENESS, "record the worker as Taskhook's"),
    Seam(RQ_WORKER, "teardown", ("self",), LIVENESS, "unregister even while Redis is down"),
    Seam(RQ_WORKER, "dequeue_job_and_maintain_ttl", ("self", "timeout", "max_idle_time"),
         LIVENESS, "ride out a Redis outage while waiting for a job; skip paused queues (RQ "
         "reads the queue list from _ordered_queues; max_idle_time=1 ends its wait after 1 s)",
         ("_ordered_queues",)),
    # --- RQ's queue, called by the Work page's "run now" (tasks/work_actions.py) -------------
    Seam("rq.queue.Queue", "_enqueue_job", ("self", "job", "pipeline", "at_front", "unique"),
         "tasks.work_actions", "a scheduled run to the front of its queue, as RQ's scheduler "
         "enqueues it"),
    Seam("rq.queue.Queue", "_enqueue_rate_limited_job", ("self", "job", "pipeline", "at_front"),
         "tasks.work_actions", "a deferred run to the head of its application's line"),
    Seam("rq.queue.Queue", "intermediate_queue_key", None, LIVENESS,
         "a job put back on a paused queue leaves RQ's intermediate list"),
    Seam(RQ_WORKER, "handle_payload", ("self", "message"), LIVENESS,
         "Taskhook's stop-at-once command, next to RQ's own"),
    Seam("rq.command", "parse_payload", ("payload",), LIVENESS,
         "read a pubsub command as RQ does"),
    Seam(RQ_WORKER, "request_stop", ("self", "signum", "frame"), LIVENESS,
         "stop at once: RQ's cold shutdown in one step", ("_stop_requested",)),
    Seam(RQ_WORKER, "request_force_stop", ("self", "signum", "frame"), LIVENESS,
         "stop at once even within a second of a warm stop"),
    Seam(RQ_WORKER, "run_maintenance_tasks", ("self",), LIVENESS, "ride out Redis outages"),
    Seam(RQ_WORKER, "execute_job", ("self", "job", "queue"), LIVENESS,
         "fail a job whose bookkeeping broke off as RQ fails a lost work horse"),
    Seam(RQ_WORKER, "maintain_heartbeats", ("self", "job", "execution"), LIVENESS,
         "ride out Redis outages"),
    Seam(RQ_WORKER, "set_shutdown_requested_date", ("self",), LIVENESS, "ride out Redis outages"),
    Seam(RQ_WORKER, "stop_scheduler", ("self",), LIVENESS,
         "join the scheduler process with a bound, killing one that does not stop"),
    Seam("rq.scheduler.RQScheduler", "release_locks", ("self",), LIVENESS,
         "a killed scheduler's locks, released at once", ("_process",)),
    Seam(RQ_WORKER, "_pubsub_exception_handler", ("self", "exc", "pubsub", "pubsub_thread"),
         LIVENESS, "keep the command listener alive through an outage"),
    Seam(RQ_WORKER, "heartbeat", ("self", "timeout", "pipeline"), LIVENESS,
         "batch the heartbeat with the liveness key and counters"),
    Seam(RQ_WORKER, "check_for_suspension", ("self", "burst"), LIVENESS,
         "check suspension at most once a second"),
    Seam(RQ_WORKER, "set_state", ("self", "state", "pipeline"), LIVENESS,
         "skip the Redis write when the state did not change", ("_state",)),
    Seam(RQ_WORKER, "death_penalty_class", None, DELIVERY,
         "a timer, not SIGALRM: deliveries run in threads"),
    Seam(RQ_WORKER, "_shutdown", ("self",), DELIVERY, "let in-flight deliveries finish"),
    Seam(RQ_WORKER, "prepare_execution", ("self", "job"), DELIVERY,
         "called from the delivery threads, as execute_job would"),
    Seam(RQ_WORKER, "perform_job", ("self", "job", "queue", "execution"), DELIVERY,
         "called from the delivery threads, as execute_job would"),
    Seam(RQ_WORKER, "handle_job_failure", ("self", "job", "queue", "started_job_registry",
                                           "exc_string", "execution"),
         LIVENESS, "fail an interrupted job the way RQ does"),
    Seam("rq.worker_registration", "register", ("worker", "pipeline"), LIVENESS,
         "re-register a live worker that Redis forgot"),
    # --- Django's request handler (dashboard/runtime/handlers.py) ----------------------------
    Seam(BASE_HANDLER, "load_middleware", ("self", "is_async"),
         "dashboard.runtime.handlers.ApiMiddlewareMixin",
         "build the API's chain from settings.API_MIDDLEWARE",
         ("_view_middleware", "_template_response_middleware", "_exception_middleware",
          "_middleware_chain", "_get_response")),
    # --- Django's PostgreSQL backend (dashboard/runtime/postgresql/base.py) -------------------
    Seam(PG_WRAPPER, "close_if_health_check_failed", ("self",),
         "dashboard.runtime.postgresql.base.DatabaseWrapper",
         "ping only connections that sat idle", ("health_check_done", "health_check_enabled")),
    Seam(PG_WRAPPER, "close_if_unusable_or_obsolete", ("self",),
         "dashboard.runtime.postgresql.base.DatabaseWrapper", "note when a connection was used",
         ("health_check_done",)),
    Seam(PG_WRAPPER, "get_new_connection", ("self", "conn_params"),
         "dashboard.runtime.postgresql.base.DatabaseWrapper",
         "let psycopg prepare the hot statements"),
    Seam(PG_WRAPPER, "_prepare_cursor", ("self", "cursor"),
         "dashboard.runtime.postgresql.base.DatabaseWrapper.prepared_cursor",
         "wrap a psycopg cursor as Django wraps its own"),
    Seam("psycopg.Cursor", "execute", ("self", "query", "params", "prepare", "binary"),
         "dashboard.runtime.postgresql.base.PreparedCursor", "prepare on the first run"),
    # --- Django's SQLite backend (dashboard/runtime/sqlite3/base.py) --------------------------
    Seam(SQLITE_WRAPPER, "_start_transaction_under_autocommit", ("self",),
         "dashboard.runtime.sqlite3.base.DatabaseWrapper",
         "BEGIN IMMEDIATE retried every half millisecond, not by SQLite's busy handler",
         ("transaction_mode",)),
)  # fmt: skip

# Our subclasses of library classes, and the library classes they shadow: the test requires
# every attribute they define that the library also has to be listed above.
SUBCLASSES = {
    LIVENESS: (RQ_WORKER,),
    DELIVERY: (RQ_WORKER,),
    "dashboard.runtime.handlers.ApiMiddlewareMixin": (BASE_HANDLER,),
    "dashboard.runtime.postgresql.base.DatabaseWrapper": (PG_WRAPPER,),
    "dashboard.runtime.postgresql.base.PreparedCursor": ("psycopg.Cursor",),
    "dashboard.runtime.sqlite3.base.DatabaseWrapper": (SQLITE_WRAPPER,),
}
