"""The audit page: who changed what, filterable by actor, action and target, newest first.

Keyset pagination by id (`before`); each filter has its own index (tasks.models.AuditEntry).
Targets show the name stored with the entry (older entries: one batched lookup per page) and
link to their page; details render as fields, settings changes as old -> new.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from django.urls import NoReverseMatch, reverse
from django.utils.http import urlencode

from dashboard.ui.access import staff_required
from dashboard.ui.responses import HtmxHttpRequest, page_or_partial
from tasks import audit
from tasks.models import AuditEntry

PAGE_SIZE = 100
FILTERS = ("actor", "action", "target_type", "target_id")
IDS_SHOWN = 20
TARGET_TYPES = ("application", "task", "batch", "bulk", "queue", "worker", "error_group",
                "retention", "reconciler", "seed")  # fmt: skip
# Where a target type's page is: (url name, whether the id is the only argument).
TARGET_PAGES = {
    "application": "dashboard:application",
    "task": "dashboard:task",
    "batch": "dashboard:batch",
    "bulk": "dashboard:bulk",
    "error_group": "dashboard:failures",
    "queue": "dashboard:workers",
    "worker": "dashboard:workers",
}


@dataclass
class Field:
    name: str
    value: Any = None
    task_ids: list[str] | None = None  # a list of task ids: shown as links
    more: int = 0  # ids beyond the ones shown

    @property
    def structured(self) -> bool:
        """A dict or a list: shown as JSON, not as text."""
        return isinstance(self.value, dict | list)


@dataclass
class Row:
    entry: AuditEntry
    label: str
    link: str
    changes: list[tuple[str, Any, Any]]
    fields: list[Field]


def target_link(target_type: str, target_id: str) -> str:
    name = TARGET_PAGES.get(target_type)
    if not name or not target_id:
        return ""
    try:
        if name in ("dashboard:failures", "dashboard:workers"):
            return reverse(name)
        return reverse(name, args=[int(target_id) if target_type == "bulk" else target_id])
    except (NoReverseMatch, ValueError):
        return ""


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def detail_fields(detail: dict[str, Any]) -> tuple[list[tuple[str, Any, Any]], list[Field]]:
    """(settings changes as (field, old, new), the other keys as fields)."""
    changes = [(name, pair[0], pair[1]) for name, pair in (detail.get("changes") or {}).items()
               if isinstance(pair, list) and len(pair) == 2]  # fmt: skip
    fields = []
    for name, value in detail.items():
        if name == "changes" and changes:
            continue
        if name == "changed" and isinstance(value, list):  # entries written before old -> new
            fields.append(Field("changed fields", ", ".join(map(str, value))))
        elif isinstance(value, list) and value and all(_is_uuid(v) for v in value):
            fields.append(Field(name, task_ids=[str(v) for v in value[:IDS_SHOWN]],
                                more=max(0, len(value) - IDS_SHOWN)))  # fmt: skip
        else:
            fields.append(Field(name, value))
    return changes, fields


@staff_required
def audit_log(request: HtmxHttpRequest):
    filters = {name: request.GET.get(name, "").strip()[:150] for name in FILTERS}
    entries = AuditEntry.objects.all()
    if filters["actor"]:
        entries = entries.filter(username=filters["actor"])
    if filters["action"]:
        entries = entries.filter(action=filters["action"])
    if filters["target_type"]:
        entries = entries.filter(target_type=filters["target_type"])
    if filters["target_id"]:
        entries = entries.filter(target_id=filters["target_id"])
    before = request.GET.get("before", "")
    if before.isdigit():
        entries = entries.filter(id__lt=int(before))
    found = list(entries.order_by("-id")[: PAGE_SIZE + 1])
    page = found[:PAGE_SIZE]
    names = audit.labels_for(page)
    rows = []
    for entry in page:
        changes, fields = detail_fields(entry.detail if isinstance(entry.detail, dict) else {})
        label = entry.target_label or names.get((entry.target_type, entry.target_id), "")
        rows.append(Row(entry, label, target_link(entry.target_type, entry.target_id),
                        changes, fields))  # fmt: skip
    query = urlencode({name: value for name, value in filters.items() if value})
    context = {
        "rows": rows,
        "filters": filters,
        "filtered": any(filters.values()),
        "query": query,
        "next_before": page[-1].id if len(found) > PAGE_SIZE else None,
        "first_page": not before,
        "target_types": TARGET_TYPES,
    }
    return page_or_partial(request, "dashboard/audit.html", "entries", context)
