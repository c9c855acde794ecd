"""Every hand-written statement of the hot paths, each beside the ORM query it replaces.

The ORM has no UPDATE ... RETURNING and compiles each query anew, which on the worker's, the
delivery's and the poll's paths cost more than the statement itself (docs/benchmarks.md). Each
`<name>` here has an `<name>_orm` twin that says the same thing readably;
`tests/unit/test_rawsql.py` runs both on the same rows, on SQLite and on PostgreSQL, and
requires the same result. Change one, change the other. Status values come from the callers,
which take them from `tasks.statuses` (transitions are checked in `tasks.state`).

Identifiers come from the models; every value is a parameter.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import connection, transaction
from django.db.models import F, Q, QuerySet

from tasks.models import Application, Task
from tasks.plumbing import rawsql
from tasks.statuses import STUCK_RULES, StuckRule

# --- start a run: pending -> running, returning what the worker needs --------------------------


class StartedRun(NamedTuple):
    inputs: Any
    callback_url: str
    application_id: uuid.UUID
    response_mode: str
    callback_events: str
    deadline_at: datetime | None  # the client's bound: ctx calls check it (execution.deadlines)
    batch_id: uuid.UUID | None  # settled when the run ends (tasks.batches.completion)


STARTED_FIELDS = (
    "inputs", "callback_url", "application", "response_mode", "callback_events", "deadline_at",
    "batch",
)  # fmt: skip


@functools.cache
def _start_sql() -> str:
    fields = [rawsql.get_field(Task, name) for name in STARTED_FIELDS]
    return (
        f"UPDATE {rawsql.quote(Task._meta.db_table)} SET status = %s, started_at = %s, "  # noqa: S608
        "worker_name = %s, progress = 0 WHERE id = %s AND status = %s AND run = %s "
        # A run past a bound must not start (tasks.execution.deadlines).
        "AND (start_by IS NULL OR start_by > %s) AND (deadline_at IS NULL OR deadline_at > %s) "
        f"RETURNING {', '.join(rawsql.quote_column(field) for field in fields)}"
    )


def start_run(
    *, task_id: uuid.UUID, run: int, worker_name: str, now: datetime, to: str, expected: str
) -> StartedRun | None:
    """One round trip: the guarded UPDATE and the read (UPDATE ... RETURNING: PostgreSQL and
    SQLite >= 3.35). None also when `now` is past the run's start_by or deadline_at."""
    pk = Task._meta.pk.get_db_prep_value(task_id, connection)
    started_at = Task._meta.get_field("started_at").get_db_prep_value(now, connection)
    params = [to, started_at, worker_name, pk, expected, run, started_at, started_at]
    row = rawsql.fetchone(rawsql.Statement(_start_sql(), params))
    if row is None:
        return None
    fields = (rawsql.get_field(Task, name) for name in STARTED_FIELDS)
    return StartedRun(*(rawsql.from_db(f, value) for f, value in zip(fields, row, strict=True)))


def start_run_orm(
    *, task_id: uuid.UUID, run: int, worker_name: str, now: datetime, to: str, expected: str
) -> StartedRun | None:
    won = (
        Task.objects.filter(pk=task_id, status=expected, run=run)
        .filter(Q(start_by__isnull=True) | Q(start_by__gt=now))
        .filter(Q(deadline_at__isnull=True) | Q(deadline_at__gt=now))
        .update(status=to, started_at=now, worker_name=worker_name, progress=0)
    )
    if not won:
        return None
    names = ("inputs", "callback_url", "application_id", "response_mode", "callback_events",
             "deadline_at", "batch_id")  # fmt: skip
    return StartedRun(*Task.objects.values_list(*names).get(pk=task_id))


# --- claim a delivery attempt -------------------------------------------------------------------

# The fields a delivery needs (the payload, the URL), returned by the claim itself.
CLAIMED_FIELDS = (
    "id", "run", "application", "status", "output", "error", "error_code", "user",
    "created_at", "started_at", "finished_at", "callback_url", "callback_attempts", "batch",
)  # fmt: skip


class ClaimedAttempt(NamedTuple):
    task: Task  # CLAIMED_FIELDS loaded, the rest deferred
    application_updated_at: datetime


def claim_attempt(
    *,
    task_id: uuid.UUID,
    run: int,
    to: str,
    expected: tuple[str, ...],
    task_statuses: tuple[str, ...],
    clear_next_attempt: bool,
) -> ClaimedAttempt | None:
    """Reserve the next attempt number and set the callback `to` (delivering) from `expected`,
    for a task whose status is one of `task_statuses`, with a callback URL; returns the task and
    its application's `updated_at` (for the per-process application cache) in the same trip."""
    fields, columns = rawsql.columns(Task, CLAIMED_FIELDS)
    task_table = rawsql.quote(Task._meta.db_table)
    app_table = rawsql.quote(Application._meta.db_table)
    marks = lambda values: ", ".join(["%s"] * len(values))  # noqa: E731
    sql = (
        f"UPDATE {task_table} SET callback_attempts = callback_attempts + 1, "  # noqa: S608
        f"callback_status = %s{', callback_next_attempt_at = NULL' if clear_next_attempt else ''} "
        f"WHERE id = %s AND run = %s AND status IN ({marks(task_statuses)}) "
        f"AND callback_url <> '' AND callback_status IN ({marks(expected)}) "
        f"RETURNING {columns}, (SELECT updated_at FROM {app_table} "
        f"WHERE {app_table}.id = {task_table}.application_id)"
    )
    pk = Task._meta.pk.get_db_prep_value(task_id, connection)
    row = rawsql.fetchone(rawsql.Statement(sql, [to, pk, run, *task_statuses, *expected]))
    if row is None:
        return None
    updated_at = rawsql.from_db(Application._meta.get_field("updated_at"), row[-1])
    return ClaimedAttempt(rawsql.instance(Task, fields, row), updated_at)


def claim_attempt_orm(
    *,
    task_id: uuid.UUID,
    run: int,
    to: str,
    expected: tuple[str, ...],
    task_statuses: tuple[str, ...],
    clear_next_attempt: bool,
) -> ClaimedAttempt | None:

    changes: dict[str, Any] = {
        "callback_attempts": F("callback_attempts") + 1,
        "callback_status": to,
    }
    if clear_next_attempt:
        changes["callback_next_attempt_at"] = None
    rows = Task.objects.filter(
        pk=task_id, run=run, status__in=task_statuses, callback_status__in=expected
    ).exclude(callback_url="")
    with transaction.atomic():
        if not rows.update(**changes):
            return None
        task = Task.objects.select_related("application").only(*CLAIMED_FIELDS).get(pk=task_id)
    return ClaimedAttempt(task, task.application.updated_at)


# --- the client API's poll ----------------------------------------------------------------------

# What the poll shows (presenters.task_body); any other field loads on access.
POLL_FIELDS = (
    "id", "application", "status", "run", "progress", "output", "error", "error_code", "user",
    "created_at", "started_at", "finished_at", "callback_url", "callback_status",
    "callback_attempts", "callback_last_status_code", "callback_next_attempt_at",
    "callback_events", "priority", "concurrency_key", "queued_at", "batch",
)  # fmt: skip


def poll(*, task_id: uuid.UUID, application_id: uuid.UUID | None) -> Task | None:
    """One statement by primary key (prepared on PostgreSQL), without the columns the poll
    never shows (inputs, traceback). `application_id` None: a stream token, bound to the task
    itself, is the proof (tasks.events.tokens)."""
    fields, columns = rawsql.columns(Task, POLL_FIELDS)
    table = rawsql.quote(Task._meta.db_table)
    application = Task._meta.get_field("application")
    where, params = "id = %s", [Task._meta.pk.get_db_prep_value(task_id, connection)]
    if application_id is not None:
        where += f" AND {rawsql.quote(application.column)} = %s"
        params.append(application.target_field.get_db_prep_value(application_id, connection))
    row = rawsql.fetchone(
        rawsql.Statement(f"SELECT {columns} FROM {table} WHERE {where}", params)  # noqa: S608
    )
    return rawsql.instance(Task, fields, row) if row else None


def poll_orm(*, task_id: uuid.UUID, application_id: uuid.UUID | None) -> Task | None:
    tasks = Task.objects.only(*POLL_FIELDS).filter(pk=task_id)
    if application_id is not None:
        tasks = tasks.filter(application_id=application_id)
    return tasks.first()


# --- stuck tasks per application ----------------------------------------------------------------


def stuck_tasks(application: Application, rule: StuckRule, *, now: datetime) -> QuerySet[Task]:
    """The readable spelling of the rule: this application's tasks in the rule's status since
    before its threshold."""
    since = now - timedelta(seconds=getattr(application, rule.threshold))
    return Task.objects.filter(
        Q(**{f"{rule.since}__lt": since}), application=application, status=rule.status
    )


def stuck_counts(
    applications: list[Application], *, now: datetime, cap: int, per_statement: int = 200
) -> Counter[tuple[str, str]]:
    """How many tasks of each application each rule of STUCK_RULES catches, by (application
    id, rule name), each count capped at `cap`. One statement for many applications: per
    application and rule a short index range scan (application, status, time) stopped at the
    cap, joined by UNION ALL, `per_statement` scans a statement (SQLite refuses a compound
    SELECT of more than 500 terms)."""
    if connection.vendor == "postgresql":
        return _stuck_counts_lateral(applications, now=now, cap=cap)
    table = rawsql.quote(Task._meta.db_table)
    app_field = Task._meta.get_field("application")
    app_column = rawsql.quote(app_field.column)
    rule_of_status = {rule.status: name for name, rule in STUCK_RULES.items()}  # one rule each
    parts: list[str] = []
    params: list[list[Any]] = []
    for application in applications:
        for rule in STUCK_RULES.values():
            since = rawsql.get_field(Task, rule.since)
            threshold = getattr(application, rule.threshold)
            parts.append(
                f"SELECT application_id, status FROM (SELECT {app_column} AS application_id, "  # noqa: S608
                f"status FROM {table} WHERE {app_column} = %s AND status = %s AND "
                f"{rawsql.quote_column(since)} < %s LIMIT {int(cap)}) AS stuck_{len(parts)}"
            )
            params.append([
                app_field.get_db_prep_value(application.pk, connection),
                rule.status,
                since.get_db_prep_value(now - timedelta(seconds=threshold), connection),
            ])  # fmt: skip
    counts: Counter[tuple[str, str]] = Counter()
    with connection.cursor() as cursor:
        for start in range(0, len(parts), per_statement):
            chunk = slice(start, start + per_statement)
            cursor.execute(
                " UNION ALL ".join(parts[chunk]), [p for group in params[chunk] for p in group]
            )
            counts.update(
                (str(uuid.UUID(str(app_id))), rule_of_status[status]) for app_id, status in cursor
            )
    return counts


def _stuck_counts_lateral(
    applications: list[Application], *, now: datetime, cap: int
) -> Counter[tuple[str, str]]:
    """stuck_counts on PostgreSQL: one statement, per rule a capped scan planned once and run
    for each (application, threshold) of a VALUES list (LATERAL). The UNION ALL of a scan
    per pair cost 24 ms of planning for 50 applications, against 5 ms of execution."""
    counts: Counter[tuple[str, str]] = Counter()
    if not applications:
        return counts
    table = rawsql.quote(Task._meta.db_table)
    app_column = rawsql.quote(Task._meta.get_field("application").column)
    values = ", ".join(["(%s::uuid, %s::timestamptz)"] * len(applications))
    parts: list[str] = []
    params: list[Any] = []
    names = list(STUCK_RULES)
    for index, rule in enumerate(STUCK_RULES.values()):
        since = rawsql.quote_column(rawsql.get_field(Task, rule.since))
        parts.append(
            f"SELECT {index}, v.application_id, c.n FROM (VALUES {values}) "  # noqa: S608
            f"AS v(application_id, cutoff) CROSS JOIN LATERAL (SELECT count(*) AS n FROM "
            f"(SELECT 1 FROM {table} WHERE {app_column} = v.application_id AND status = %s "
            f"AND {since} < v.cutoff LIMIT {int(cap)}) AS capped) AS c WHERE c.n > 0"
        )
        for application in applications:
            threshold = timedelta(seconds=getattr(application, rule.threshold))
            params += [application.pk, now - threshold]
        params.append(rule.status)
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(parts), params)
        for index, app_id, n in cursor:
            counts[str(app_id), names[index]] = n
    return counts


def stuck_counts_orm(
    applications: list[Application], *, now: datetime, cap: int, per_statement: int = 200
) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for application in applications:
        for name, rule in STUCK_RULES.items():
            found = stuck_tasks(application, rule, now=now).values("pk")[:cap].count()
            if found:
                counts[str(application.pk), name] = found
    return counts
