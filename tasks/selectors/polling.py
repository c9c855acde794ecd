"""The client API's poll: its hottest read."""

from __future__ import annotations

import uuid

from tasks import sql
from tasks.models import Task


def task_for_client(*, task_id: uuid.UUID, application_id: uuid.UUID | None) -> Task | None:
    """The task if it belongs to this application (None: the caller holds a token bound to the
    task), with the fields the poll shows (one statement by primary key: `tasks.sql.poll`)."""
    return sql.poll(task_id=task_id, application_id=application_id)
