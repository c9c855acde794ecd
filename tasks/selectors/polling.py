"""The client API's poll: its hottest read."""

from __future__ import annotations

import uuid

from tasks import sql
from tasks.models import Task


def task_for_client(*, task_id: uuid.UUID, application_id: uuid.UUID) -> Task | None:
    """The task if it belongs to this application, with the fields the poll shows (one
    statement by primary key: `tasks.sql.poll`)."""
    return sql.poll(task_id=task_id, application_id=application_id)
