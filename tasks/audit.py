"""The audit log: one row per change an operator or a command made (who, what, target, when).

Dashboard actions record the logged-in user; management commands record `command:<name>` as
the actor (`record_command`). The target's name is stored with the entry (`target_label`), so
an entry still reads after its target is deleted. Settings changes are recorded as
`{"changes": {field: [old, new]}}` (`changes`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.core.exceptions import ValidationError

from tasks.models import Application, AuditEntry, BulkOperation, Task

COMMAND_ACTOR_PREFIX = "command:"


def record(
    *,
    user,
    action: str,
    target_type: str,
    target_id: str | int | uuid.UUID = "",
    detail: dict[str, Any] | None = None,
    target_label: str = "",
    username: str = "",
) -> AuditEntry:
    """Write one entry. `user` is the acting Django user (or None with `username`)."""
    target = str(target_id)[:64]
    label = target_label or label_for(target_type=target_type, target_id=target)
    return AuditEntry.objects.create(
        user=user if getattr(user, "pk", None) else None,
        username=username or getattr(user, "username", "") or "system",
        action=action,
        target_type=target_type,
        target_id=target,
        target_label=label[:200],
        detail=_json_safe(detail or {}),
    )


def record_command(
    *,
    command: str,
    action: str,
    target_type: str,
    target_id: str | int | uuid.UUID = "",
    detail: dict[str, Any] | None = None,
    target_label: str = "",
) -> AuditEntry:
    """A change made from a management command: the command's name is the actor."""
    return record(user=None, username=f"{COMMAND_ACTOR_PREFIX}{command}", action=action,
                  target_type=target_type, target_id=target_id, detail=detail,
                  target_label=target_label)  # fmt: skip


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """{field: [old, new]} for the fields whose value changed (JSON-safe values)."""
    return {name: _json_safe([before.get(name), value]) for name, value in after.items()
            if before.get(name) != value}  # fmt: skip


def label_for(*, target_type: str, target_id: str) -> str:
    """A readable name for a target, from one indexed lookup; "" when it cannot be found."""
    if not target_id:
        return ""
    try:
        if target_type == "application":
            return Application.objects.values_list("name", flat=True).get(pk=target_id)
        if target_type == "task":
            app_name = Task.objects.values_list("application__name", flat=True).get(pk=target_id)
            return f"{app_name} · {target_id[:8]}"
        if target_type == "bulk":
            kind = BulkOperation.objects.values_list("kind", flat=True).get(pk=target_id)
            return f"{BulkOperation.Kind(kind).label} all matching #{target_id}"
    except (Application.DoesNotExist, Task.DoesNotExist, BulkOperation.DoesNotExist):
        return ""
    except (ValueError, ValidationError):  # a malformed id (not a UUID, not an int)
        return ""
    return target_id


def labels_for(entries: list[AuditEntry]) -> dict[tuple[str, str], str]:
    """Names of the targets of entries written without a label (older rows), batched: one
    query per target type, never one per row."""
    wanted: dict[str, set[str]] = {}
    for entry in entries:
        if not entry.target_label and entry.target_id:
            wanted.setdefault(entry.target_type, set()).add(entry.target_id)
    found: dict[tuple[str, str], str] = {}
    if ids := _valid_uuids(wanted.get("application", ())):
        for pk, name in Application.objects.filter(pk__in=ids).values_list("pk", "name"):
            found["application", str(pk)] = name
    if ids := _valid_uuids(wanted.get("task", ())):
        rows = Task.objects.filter(pk__in=ids).values_list("pk", "application__name")
        for pk, app_name in rows:
            found["task", str(pk)] = f"{app_name} · {str(pk)[:8]}"
    return found


def _valid_uuids(values) -> list[uuid.UUID]:
    ids = []
    for value in values:
        try:
            ids.append(uuid.UUID(value))
        except ValueError:
            continue
    return ids


def _json_safe(value: Any) -> Any:
    """What the JSON column can hold: datetimes, UUIDs and decimals as text."""
    return json.loads(json.dumps(value, default=str))
