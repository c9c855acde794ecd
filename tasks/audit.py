"""The audit log: one row per operator action (who, what, target, when)."""

from __future__ import annotations

import uuid
from typing import Any

from tasks.models import AuditEntry


def record(
    *,
    user,
    action: str,
    target_type: str,
    target_id: str | int | uuid.UUID = "",
    detail: dict[str, Any] | None = None,
    target_label: str = "",
) -> AuditEntry:
    return AuditEntry.objects.create(
        user=user if getattr(user, "pk", None) else None,
        username=getattr(user, "username", "") or "system",
        action=action,
        target_type=target_type,
        target_id=str(target_id)[:64],
        target_label=target_label[:200],
        detail=detail or {},
    )


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """{field: [old, new]} for the fields whose value changed."""
    return {name: [before.get(name), value] for name, value in after.items()
            if before.get(name) != value}  # fmt: skip
