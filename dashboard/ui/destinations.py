"""The Destinations pages: each message-bus destination's health worst first
(tasks.delivery.health, as for endpoints), one destination with its recent publishes and its
`Re-enable`, and 'republish everything that failed since T' to one destination (a bulk
operation)."""

from __future__ import annotations

from django import forms
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone

from dashboard.ui.access import operator_required, staff_required
from dashboard.ui.forms import LOCAL_DATETIME
from dashboard.ui.responses import HtmxHttpRequest, answer, page_or_partial
from tasks import audit
from tasks.delivery import health
from tasks.models import BulkOperation, Destination, DestinationAttempt
from tasks.upkeep import bulk

TEMPLATE = "dashboard/destinations.html"
RECENT_ATTEMPTS = health.RECENT_ATTEMPTS


class DestinationChoice(forms.ModelChoiceField):
    def label_from_instance(self, obj) -> str:
        return f"{obj.application.name}: {obj.masked_url}"  # never the password


class RecoverForm(forms.Form):
    """Which destination, since when."""

    destination = DestinationChoice(
        queryset=Destination.objects.select_related("application"), empty_label="Destination"
    )
    since = forms.DateTimeField(widget=LOCAL_DATETIME)


def _operations() -> list[BulkOperation]:
    return list(BulkOperation.objects.filter(kind=BulkOperation.Kind.RECOVER)[:3])


def _list_context() -> dict:
    return {
        "rows": health.all_destination_health(),
        "window": RECENT_ATTEMPTS,
        "recover_form": RecoverForm(),
        "operations": _operations(),
        "nav": "endpoints",
    }


def _detail_context(destination_id: int) -> dict:
    row = get_object_or_404(Destination.objects.select_related("application"), pk=destination_id)
    attempts = DestinationAttempt.objects.filter(destination=row).order_by("-started_at")
    return {
        "health": health.destination_health_of(row),
        "destination": row,
        "attempts": attempts[:RECENT_ATTEMPTS],
        "window": RECENT_ATTEMPTS,
        "recover_form": RecoverForm(initial={"destination": row.pk}),
        "operations": _operations(),
        "nav": "endpoints",
    }


@staff_required
def destination_list(request: HtmxHttpRequest) -> HttpResponse:
    return page_or_partial(request, TEMPLATE, "destinations", _list_context())


@staff_required
def destination_detail(request: HtmxHttpRequest, destination_id: int) -> HttpResponse:
    return page_or_partial(request, TEMPLATE, "destination", _detail_context(destination_id))


@operator_required
def destination_reenable(request: HtmxHttpRequest, destination_id: int) -> HttpResponse:
    """Enabled, closed, counting from zero, its parked publishes going out (audited by the
    service)."""
    row = health.reenable_destination(
        destination_id=get_object_or_404(Destination, pk=destination_id).pk, user=request.user
    )
    return answer(request, message=f"Re-enabled {row.masked_url}: its publishes go out again.",
                  template=TEMPLATE, partial="destination",
                  context=_detail_context(destination_id),
                  fallback=reverse("dashboard:destination", args=[destination_id]))  # fmt: skip


@operator_required
def destinations_recover(request: HtmxHttpRequest) -> HttpResponse:
    """'Republish everything that failed since T' to one destination: one bulk operation in
    the background (audited), its progress in the operations partial."""
    form = RecoverForm(request.POST)
    chosen = form.data.get("destination", "")
    fallback = (
        reverse("dashboard:destination", args=[chosen])
        if chosen.isdigit()
        else reverse("dashboard:destinations")
    )
    context = {"operations": _operations()}
    if not form.is_valid():
        errors = "; ".join(" ".join(str(m) for m in messages) for messages in form.errors.values())
        return answer(request, message=f"Not started: {errors}", ok=False, template=TEMPLATE,
                      partial="operations", context=context, fallback=fallback)  # fmt: skip
    since = form.cleaned_data["since"]
    row: Destination = form.cleaned_data["destination"]
    operation = bulk.start_recover(
        since=since, username=request.user.username, destination_id=row.pk
    )
    audit.record(user=request.user, action="destinations.recover", target_type="bulk",
                 target_id=operation.pk, detail={"since": since.isoformat(),
                                                 "target": row.masked_url,
                                                 "destination": row.pk})  # fmt: skip
    local = timezone.localtime(since).strftime("%Y-%m-%d %H:%M:%S")
    message = (
        f"Republishing to {row.masked_url} everything whose latest publish to it failed since "
        f"{local}, in the background."
    )
    context["operations"] = _operations()
    return answer(request, message=message, template=TEMPLATE, partial="operations",
                  context=context, fallback=fallback)  # fmt: skip
