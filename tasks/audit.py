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
) -> AuditEntry:
    return AuditEntry.objects.create(
        user=user if getattr(user, "pk", None) else None,
        username=getattr(user, "username", "") or "system",
        action=action,
        target_type=target_type,
        target_id=str(target_id)[:64],
        detail=detail or {},
    )
