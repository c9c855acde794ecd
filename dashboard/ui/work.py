"""The Work page: one tab per state of work (tasks.selectors.work), each with its actions on
the selected rows or on every row of the tab (tasks.work_actions, in the background through
tasks.upkeep.bulk). Actions are audited and answer in place."""

from __future__ import annotations

import uuid

from django.db import transaction
from django.http import HttpResponse, QueryDict
from django.urls import reverse

from dashboard.ui.access import operator_required, staff_required
from dashboard.ui.forms import TaskFilterForm
from dashboard.ui.responses import HtmxHttpRequest, answer, page_or_partial, safe_next
from tasks import audit, work_actions
from tasks.models import BulkOperation
from tasks.selectors import work
from tasks.selectors.task_lists import TaskFilters
from tasks.upkeep import bulk

TEMPLATE = "dashboard/work.html"
PAGE_SIZES = (25, 50, 100)
# What each action is called on a button, and what it does to a row, for the messages.
VERBS = {
    "run_now": ("Run now", "moved to the front"),
    "deliver_now": ("Deliver now", "attempted now"),
    "retry": ("Retry", "retried"),
    "redeliver": ("Redeliver", "queued for redelivery"),
    "discard": ("Discard", "discarded"),
    "delete": ("Delete", "deleted"),
}
CONFIRM = {
    "discard": "Discard the {what}? Waiting work stops (tasks are cancelled, callbacks given "
    "up); the records stay.",
    "delete": "Delete the {what} with their logs and callback attempts? This cannot be undone.",
}


def _page_size(data: QueryDict) -> int:
    try:
        size = int(data.get("size", 50))
    except ValueError:
        return 50
    return size if size in PAGE_SIZES else 50


def _filters(data: QueryDict) -> TaskFilters:
    """The page's one filter, the application (the tab is the rest)."""
    return TaskFilters(application=TaskFilterForm(data).filters().application if data else "")


def _context(request: HtmxHttpRequest, *, data: QueryDict, cursor: str = "") -> dict:
    tab = work.tab_of(data.get("state", ""))
    filters = _filters(data)
    page = work.work_page(tab=tab, filters=filters, cursor=cursor, size=_page_size(data))
    base = QueryDict(mutable=True)
    if filters.application:
        base["application"] = filters.application
    query = base.copy()
    query["state"] = tab.name
    actions = [
        {"kind": kind, "label": VERBS[kind][0],
         "confirm_selected": CONFIRM.get(kind, "").format(what="selected rows"),
         "confirm_matching": (CONFIRM.get(kind) or "{what}?").format(
             what=f"every row of “{tab.label}”") if kind in CONFIRM
         else f"{VERBS[kind][0]}: every row of “{tab.label}”?"}
        for kind in work_actions.TAB_ACTIONS[tab.name]
    ]  # fmt: skip
    return {
        "tab": tab,
        "tabs": [
            {"tab": t, "count": n}
            for t, n in zip(work.TABS.values(), work.counts(filters).values(), strict=True)
        ],
        "count_cap": work.TAB_COUNT_CAP,
        "page": page,
        "filters": filters,
        "form": TaskFilterForm(data or None),
        "base_query": base.urlencode(),
        "query": query.urlencode(),
        "first_page": not cursor,
        "actions": actions,
        "list_url": f"{reverse('dashboard:work')}?{query.urlencode()}"
        + (f"&cursor={cursor}" if cursor else ""),
        "operations": BulkOperation.objects.all()[:3],
    }


@staff_required
def work_page(request: HtmxHttpRequest) -> HttpResponse:
    context = _context(request, data=request.GET, cursor=request.GET.get("cursor", ""))
    return page_or_partial(request, TEMPLATE, "results", context)


def _selected_ids(request: HtmxHttpRequest) -> list[uuid.UUID]:
    ids = []
    for raw in request.POST.getlist("task")[:500]:
        try:
            ids.append(uuid.UUID(raw))
        except ValueError:
            continue
    return ids


@operator_required
def work_act(request: HtmxHttpRequest) -> HttpResponse:
    """One action on the selected rows (now) or on every row of the tab (in the background)."""
    kind, _, scope = request.POST.get("act", "").partition(":")
    tab = work.tab_of(request.POST.get("state", ""))
    if kind not in work_actions.TAB_ACTIONS[tab.name] or scope not in ("selected", "matching"):
        return HttpResponse("This action does not apply to this tab.", status=400)
    label, past = VERBS[kind]
    if scope == "matching":
        operation = bulk.start(kind=kind, filters=_filters(request.POST),
                               username=request.user.username, work_tab=tab.name)  # fmt: skip
        audit.record(user=request.user, action=f"work.{kind}.matching", target_type="bulk",
                     target_id=operation.pk, target_label=tab.label,
                     detail=operation.filters)  # fmt: skip
        message = f"{label}: every row of “{tab.label}”, in the background (progress below)."
        ok = True
    else:
        ids = _selected_ids(request)
        act = work_actions.ACTIONS[kind]
        if kind == "retry":  # the new runs are enqueued once their transaction commits
            with transaction.atomic():
                result = act(task_ids=ids)
        else:  # Redis and the database in step, one task at a time (each write is guarded)
            result = act(task_ids=ids)
        audit.record(user=request.user, action=f"work.{kind}.selected", target_type="task",
                     target_label=tab.label,
                     detail={"tab": tab.name, "selected": len(ids),
                             "done": [str(i) for i in result.done]})  # fmt: skip
        message = f"{label}: {len(result.done)} of {len(ids)} selected {past}.{result.note()}"
        ok = bool(result.done)
    context = _context(request, data=request.POST)
    fallback = f"{reverse('dashboard:work')}?state={tab.name}"
    context["list_url"] = safe_next(request, fallback)  # the list the form was on
    return answer(request, message=message, ok=ok,
                  template=TEMPLATE, partial="results", context=context,
                  also=("operations",), fallback=fallback)  # fmt: skip
