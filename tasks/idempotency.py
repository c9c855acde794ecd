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
from typing import cast

from django.conf import settings
from django.utils import timezone

from tasks.models import Application, IdempotencyRecord, Task


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


def keep_keys_of(task_ids: list[uuid.UUID]) -> None:
    """Retention is about to remove these tasks: keep the keys still inside their window.
    Runs inside retention's delete transaction."""
    records = [
        IdempotencyRecord(
            # Never None: the query below selects idempotency_key__isnull=False.
            application_id=app_id, key=cast(str, key), request_hash=request_hash, task_id=task_id,
            status=status, created_at=created_at,
        )
        for task_id, app_id, key, request_hash, status, created_at in Task.objects.filter(
            pk__in=task_ids, idempotency_key__isnull=False, created_at__gte=window_start()
        ).values_list("pk", "application_id", "idempotency_key", "request_hash", "status",
                      "created_at")
    ]  # fmt: skip
    IdempotencyRecord.objects.bulk_create(records, ignore_conflicts=True)


def purge_expired_records() -> int:
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=window_start()).delete()
    return deleted
