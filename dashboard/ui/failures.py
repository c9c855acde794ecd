"""The Failures page: failed tasks and given-up callbacks grouped by their normalised error
(tasks.triage, tasks.selectors.failures), and acting on a whole group in the background."""

from __future__ import annotations

from urllib.parse import urlencode

from django.http import HttpResponse
from django.urls import reverse

from dashboard.ui.access import operator_required, staff_required
from dashboard.ui.responses import HtmxHttpRequest, answer, page_or_partial
from tasks import audit
from tasks.models import BulkOperation, ErrorGroup
from tasks.selectors import failures as selectors
from tasks.selectors.task_lists import TaskFilters
from tasks.upkeep import bulk

TEMPLATE = "dashboard/failures.html"
# What acting on a group does, per kind: the bulk operation, and what the message calls it.
ACTIONS: dict[str, tuple[str, str, str]] = {
    ErrorGroup.Kind.TASK: (BulkOperation.Kind.RETRY, "Retry", "failed task"),
    ErrorGroup.Kind.CALLBACK: (BulkOperation.Kind.REDELIVER, "Redeliver", "failed callback"),
}


def _kind(value: str) -> str:
    return value if value in selectors.KINDS else ErrorGroup.Kind.TASK


def _context(request: HtmxHttpRequest, *, kind: str, cursor: str = "") -> dict:
    page = selectors.failure_page(kind=kind, cursor=cursor)
    query = {"kind": kind} | ({"cursor": cursor} if cursor else {})
    return {
        "kind": kind,
        "kinds": [(value, label) for value, label in ErrorGroup.Kind.choices],
        "page": page,
        "first_page": not cursor,
        "verb": ACTIONS[kind][1],
        "now_cap": selectors.NOW_CAP,
        # What the groups poll to refresh: this very page of them.
        "groups_url": f"{reverse('dashboard:failures')}?{urlencode(query)}",
        "operations": BulkOperation.objects.all()[:3],
    }


@staff_required
def failure_list(request: HtmxHttpRequest) -> HttpResponse:
    kind = _kind(request.GET.get("kind", ""))
    context = _context(request, kind=kind, cursor=request.GET.get("cursor", ""))
    return page_or_partial(request, TEMPLATE, "groups", context)


@operator_required
def failures_act(request: HtmxHttpRequest) -> HttpResponse:
    """Retry every failed task of a group, or redeliver every failed callback of one: a bulk
    operation on the task list's filter for that group (audited), answered in place."""
    kind = _kind(request.POST.get("kind", ""))
    fingerprint = request.POST.get("fingerprint", "")
    fallback = f"{reverse('dashboard:failures')}?kind={kind}"
    found = selectors.group(kind=kind, fingerprint=fingerprint)
    context = _context(request, kind=kind)
    if found is None:
        return answer(request, message="Unknown error group.", ok=False, template=TEMPLATE,
                      partial="groups", context=context, fallback=fallback)  # fmt: skip
    operation_kind, verb, noun = ACTIONS[kind]
    filters = TaskFilters()
    setattr(filters, selectors.KINDS[kind].fingerprint_field, fingerprint)
    operation = bulk.start(kind=operation_kind, filters=filters, username=request.user.username)
    audit.record(user=request.user, action=f"failures.{operation_kind}", target_type="bulk",
                 target_id=operation.pk, detail={"kind": kind, "fingerprint": fingerprint,
                                                 "label": found.label[:200]})  # fmt: skip
    message = f"{verb}: every {noun} of “{found.label[:80]}”, in the background (progress below)."
    context["operations"] = BulkOperation.objects.all()[:3]
    return answer(request, message=message, template=TEMPLATE, partial="groups", context=context,
                  also=("operations",), fallback=fallback)  # fmt: skip
