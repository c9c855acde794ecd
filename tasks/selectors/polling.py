"""The client API's poll: its hottest read."""

from __future__ import annotations

import uuid

from django.db import connection

from tasks.models import Task
from tasks.plumbing import rawsql

# --- the client API's poll ----------------------------------------------------------------------

# What the poll shows (presenters.task_body); any other field loads on access.
POLL_FIELDS = (
    "id", "application", "status", "run", "progress", "output", "error", "user", "created_at",
    "started_at", "finished_at", "callback_url", "callback_status", "callback_attempts",
    "callback_last_status_code", "callback_next_attempt_at",
)  # fmt: skip


def task_for_client(*, task_id: uuid.UUID, application_id: uuid.UUID) -> Task | None:
    """The task if it belongs to this application. The poll is the API's hottest read: one
    statement by primary key (prepared on PostgreSQL), without the ORM's per-call compilation
    and without the columns the poll never shows (inputs, traceback)."""
    fields, columns = rawsql.columns(Task, POLL_FIELDS)
    table = rawsql.quote(Task._meta.db_table)
    row = rawsql.fetchone(rawsql.Statement(
        f"SELECT {columns} FROM {table} WHERE id = %s AND application_id = %s",  # noqa: S608
        [Task._meta.pk.get_db_prep_value(task_id, connection),
         Task._meta.get_field("application").target_field.get_db_prep_value(
             application_id, connection)],
    ))  # fmt: skip
    return rawsql.instance(Task, fields, row) if row else None


# --- task lists -------------------------------------------------------------------------------
