"""The Endpoints pages: each callback origin's health worst first (tasks.delivery.health), one
endpoint with its recent attempts, its `Re-enable`, and 'redeliver everything that failed since
T' for an endpoint or an application (a bulk operation)."""

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
from tasks.models import Application, BulkOperation, CallbackAttempt, Endpoint
from tasks.upkeep import bulk

LIST_TEMPLATE = "dashboard/endpoints.html"
DETAIL_TEMPLATE = "dashboard/endpoint_detail.html"
RECENT_ATTEMPTS = health.RECENT_ATTEMPTS


class RecoverForm(forms.Form):
    """What to recover: one endpoint, or every endpoint of an application, since when."""

    since = forms.DateTimeField(widget=LOCAL_DATETIME)
    endpoint = forms.ModelChoiceField(queryset=Endpoint.objects.all(), required=False)
    application = forms.ModelChoiceField(
        queryset=Application.objects.only("id", "name"), required=False, empty_label="Application"
    )

    def clean(self) -> dict:
        data = super().clean() or {}
        if not data.get("endpoint") and not data.get("application"):
            raise forms.ValidationError("Name an endpoint or an application.")
        return data


def _operations() -> list[BulkOperation]:
    return list(BulkOperation.objects.filter(kind=BulkOperation.Kind.RECOVER)[:3])


def _list_context() -> dict:
    return {
        "rows": health.all_health(),
        "window": RECENT_ATTEMPTS,
        "recover_form": RecoverForm(),
        "operations": _operations(),
        "nav": "endpoints",
    }


def _detail_context(endpoint_id: int) -> dict:
    row = get_object_or_404(Endpoint.objects.select_related("application"), pk=endpoint_id)
    # The rows show the task's id only: the attempt's own task_id, no join to the tasks.
    attempts = CallbackAttempt.objects.filter(endpoint=row).order_by("-started_at")[
        :RECENT_ATTEMPTS
    ]
    return {
        "health": health.health_of(row),
        "endpoint": row,
        "attempts": attempts,
        "window": RECENT_ATTEMPTS,
        "recover_form": RecoverForm(initial={"endpoint": row.pk}),
        "operations": _operations(),
        "nav": "endpoints",
    }


@staff_required
def endpoint_list(request: HtmxHttpRequest) -> HttpResponse:
    return page_or_partial(request, LIST_TEMPLATE, "endpoints", _list_context())


@staff_required
def endpoint_detail(request: HtmxHttpRequest, endpoint_id: int) -> HttpResponse:
    return page_or_partial(request, DETAIL_TEMPLATE, "endpoint", _detail_context(endpoint_id))


@operator_required
def endpoint_reenable(request: HtmxHttpRequest, endpoint_id: int) -> HttpResponse:
    """Closed, counting from zero, its deliveries going out again (audited by the service)."""
    row = health.reenable(endpoint_id=get_object_or_404(Endpoint, pk=endpoint_id).pk,
                          user=request.user)  # fmt: skip
    return answer(request, message=f"Re-enabled {row.origin}: its callbacks go out again.",
                  template=DETAIL_TEMPLATE, partial="endpoint",
                  context=_detail_context(endpoint_id),
                  fallback=reverse("dashboard:endpoint", args=[endpoint_id]))  # fmt: skip


@operator_required
def endpoints_recover(request: HtmxHttpRequest) -> HttpResponse:
    """'Redeliver everything that failed since T' for an endpoint or an application: one bulk
    operation in the background (audited), its progress in the operations partial."""
    form = RecoverForm(request.POST)
    endpoint = form.data.get("endpoint", "")
    template = DETAIL_TEMPLATE if endpoint else LIST_TEMPLATE
    fallback = (
        reverse("dashboard:endpoint", args=[endpoint])
        if endpoint.isdigit()
        else reverse("dashboard:endpoints")
    )
    context = {"operations": _operations()}
    if not form.is_valid():
        errors = "; ".join(" ".join(str(m) for m in messages) for messages in form.errors.values())
        return answer(request, message=f"Not started: {errors}", ok=False, template=template,
                      partial="operations", context=context, fallback=fallback)  # fmt: skip
    since = form.cleaned_data["since"]
    row: Endpoint | None = form.cleaned_data.get("endpoint")
    application: Application | None = form.cleaned_data.get("application")
    operation = bulk.start_recover(
        since=since, username=request.user.username,
        application_id="" if row else str(application.pk if application else ""),
        endpoint_id=row.pk if row else None,
    )  # fmt: skip
    target = row.origin if row else (application.name if application else "")
    audit.record(user=request.user, action="endpoints.recover", target_type="bulk",
                 target_id=operation.pk, detail={"since": since.isoformat(), "target": target,
                                                 "endpoint": row.pk if row else None})  # fmt: skip
    local = timezone.localtime(since).strftime("%Y-%m-%d %H:%M:%S")
    message = (
        f"Redelivering every callback to {target} that failed since {local}, in the background."
    )
    context["operations"] = _operations()
    return answer(request, message=message, template=template, partial="operations",
                  context=context, fallback=fallback)  # fmt: skip
