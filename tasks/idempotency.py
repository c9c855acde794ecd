"""Idempotency-Key: the one place for its window and what a repeat gets (README: API).

Within IDEMPOTENCY_WINDOW_HOURS of the first submit, the same key from the same application
returns the first task (the same body) or a conflict (a different body). The key outlives its
task: when retention removes the task sooner, an IdempotencyRecord keeps the key, its request
hash and the task's id and final status until the window ends, so a late retry never runs the
work twice. Past the window the key is free again.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from tasks.models import Application, IdempotencyRecord, Task
from tasks.plumbing import rawsql


class IdempotencyConflict(Exception):
    pass


def window_start(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(hours=settings.IDEMPOTENCY_WINDOW_HOURS)


def existing_for_key(
    application: Application, key: str, request_hash: str
) -> Task | IdempotencyRecord | None:
    """What a repeat of `key` gets: its task, the record of a removed one, or None (free)."""
    task = Task.objects.filter(application=application, idempotency_key=key).first()
    found: Task | IdempotencyRecord | None = task
    if task is None:
        found = IdempotencyRecord.objects.filter(application=application, key=key).first()
    if found is None:
        return None
    if found.created_at < window_start():
        # Past the window the key is free again; the old task keeps its data but not the key.
        if isinstance(found, Task):
            Task.objects.filter(pk=found.pk, idempotency_key=key).update(idempotency_key=None)
        else:
            IdempotencyRecord.objects.filter(pk=found.pk).delete()
        return None
    if found.request_hash != request_hash:
        raise IdempotencyConflict
    return found


# What an IdempotencyRecord keeps of its task: its fields, and the task's they come from.
KEPT_FROM_TASK = {"application": "application", "key": "idempotency_key",
                  "request_hash": "request_hash", "task_id": "id", "status": "status",
                  "created_at": "created_at"}  # fmt: skip


def _keeps_key() -> Q:
    """Which removed tasks' keys are kept: those with a key still inside its window."""
    return Q(idempotency_key__isnull=False, created_at__gte=window_start())


def keep_keys_of(task_ids: list[uuid.UUID]) -> None:
    """Retention is about to remove these tasks: keep the keys still inside their window.
    Runs inside retention's delete transaction."""
    names = [rawsql.get_field(IdempotencyRecord, name).attname for name in KEPT_FROM_TASK]
    rows = Task.objects.filter(_keeps_key(), pk__in=task_ids).values_list(*KEPT_FROM_TASK.values())
    records = [IdempotencyRecord(**dict(zip(names, row, strict=True))) for row in rows]
    IdempotencyRecord.objects.bulk_create(records, ignore_conflicts=True)


def keep_keys_statement(removed: str) -> tuple[str, list[Any]]:
    """keep_keys_of as one INSERT ... SELECT and its parameters, for a statement that removes
    tasks (PostgreSQL): `removed` names a relation of the removed tasks' rows with the task
    table's columns that KEPT_FROM_TASK names (a `DELETE ... RETURNING` in a WITH)."""
    query = Task.objects.filter(_keeps_key()).query
    where, params = query.get_compiler(connection=connection).compile(query.where)
    table = rawsql.quote(Task._meta.db_table)  # `removed` takes its name: the WHERE names it
    record_columns = ", ".join(rawsql.quote_column(rawsql.get_field(IdempotencyRecord, name))
                               for name in KEPT_FROM_TASK)  # fmt: skip
    task_columns = ", ".join(rawsql.quote_column(rawsql.get_field(Task, name))
                             for name in KEPT_FROM_TASK.values())  # fmt: skip
    statement = (
        f"INSERT INTO {rawsql.quote(IdempotencyRecord._meta.db_table)} ({record_columns}) "  # noqa: S608
        f"SELECT {task_columns} FROM {removed} AS {table} WHERE {where} ON CONFLICT DO NOTHING"
    )
    return statement, list(params)


def purge_expired_records() -> int:
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=window_start()).delete()
    return deleted
