"""Operator dashboard. Each view renders a page, or for an HTMX request the named partial of
the same template (`template.html#partial`). Actions are CSRF-protected POSTs for operators and
are written to the audit log; services do the work."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from django.contrib import messages
from django.contrib.staticfiles import finders
from django.db import transaction
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from dashboard.runtime import processes
from dashboard.templatetags.taskhook import human_seconds
from dashboard.ui import zones
from dashboard.ui.access import is_operator, operator_required, staff_required
from dashboard.ui.charts import time_chart
from dashboard.ui.forms import (
    APPLICATION_AUDITED_FIELDS,
    GRACE_CHOICES,
    ApplicationForm,
    RotateForm,
    TaskFilterForm,
)
from dashboard.ui.responses import HtmxHttpRequest, answer, page_or_partial, safe_next
from tasks import applications, audit, credentials, services
from tasks.delivery import callbacks, endpoints
from tasks.models import (
    ApiKey,
    Application,
    BulkOperation,
    CallbackStatus,
    Task,
)
from tasks.presenters import stream_path
from tasks.scheduling import estimates, lanes
from tasks.selectors import alerts as alerting
from tasks.selectors import overview as stats
from tasks.selectors import task_lists
from tasks.statuses import CALLBACK_IN_FLIGHT, DELIVERABLE, RETRYABLE, STUCK_RULES
from tasks.telemetry import stats_history
from tasks.upkeep import bulk, retention

PAGE_SIZES = (25, 50, 100)


# --- overview ----------------------------------------------------------------------------------


@staff_required
def overview(request: HtmxHttpRequest) -> HttpResponse:
    data = stats.overview()
    context = {"overview": data, "alerts": alerting.alerts(data), "worker_commands": {
        name: " ".join(argv) for name, argv in processes.procfile_commands().items()
        if name in processes.WORKER_QUEUES
    }}  # fmt: skip
    if not data.redis_error:
        finished = stats_history.finished_per_minute(60)
        depth = stats_history.queue_depth_history()
        context.update(
            throughput=time_chart(
                title="Finished tasks", unit="tasks/min",
                buckets=[datetime.fromtimestamp(t, UTC) for t, _ in finished],
                series=[("finished", "s-ok", [count for _, count in finished])]),
            throughput_total=sum(count for _, count in finished),
            depth_chart=time_chart(
                title="Queue depth", unit="jobs queued",
                buckets=[datetime.fromtimestamp(sample["t"], UTC) for sample in depth],
                series=[("tasks", "s-run", [sample.get("tasks", 0) for sample in depth]),
                        ("callbacks", "s-warn", [sample.get("callbacks", 0) for sample in depth])],
                label_format="%H:%M"),
            depth_samples=len(depth),
        )  # fmt: skip
    return page_or_partial(request, "dashboard/overview.html", "live", context)


@operator_required
def alert_action(request: HtmxHttpRequest) -> HttpResponse:
    kind = request.POST.get("kind", "")
    app_id = request.POST.get("application", "")
    action = request.POST.get("action", "")
    if kind not in STUCK_RULES or action not in ("retry", "fail"):
        return HttpResponse("Unknown alert action.", status=400)
    try:
        ids = alerting.stuck_task_ids(application_id=app_id, kind=kind)
    except (Application.DoesNotExist, ValueError):
        return HttpResponse("Unknown application.", status=400)
    done = 0
    for task_id in ids:
        if action == "fail":
            done += services.mark_failed(task_id=task_id, error="marked failed by an operator")
        else:
            done += services.requeue_pending(task_id=task_id)
    audit.record(user=request.user, action=f"alert.{action}", target_type="application",
                 target_id=app_id, detail={"kind": kind, "tasks": done})  # fmt: skip
    verb = "Marked failed" if action == "fail" else "Re-enqueued"
    message = f"{verb}: {done} stuck task(s)."
    # The alert is replaced in place; the Overview's next refresh drops it once it clears.
    return answer(request, message=message, template="dashboard/overview.html",
                  partial="alert-done", context={"done": message},
                  fallback=reverse("dashboard:home"))  # fmt: skip


# --- tasks -------------------------------------------------------------------------------------


def _page_size(request: HtmxHttpRequest) -> int:
    try:
        size = int(request.GET.get("size", 50))
    except ValueError:
        return 50
    return size if size in PAGE_SIZES else 50


def _task_list_context(
    request: HtmxHttpRequest, *, data, fixed: dict | None = None, cursor: str = ""
) -> dict:
    """The list for a filter given as a query dict (GET, or the bulk form's hidden fields)."""
    form = TaskFilterForm(data or None)
    filters = form.filters() if data else task_lists.TaskFilters()
    for name, value in (fixed or {}).items():
        setattr(filters, name, value)
    page = task_lists.task_page(filters=filters, cursor=cursor, size=_page_size(request))
    params = data.copy()
    for name in ("cursor", "csrfmiddlewaretoken", "scope", "task", "next"):
        params.pop(name, None)
    query = params.urlencode()
    return {
        "form": form,
        "page": page,
        "filters": filters,
        "query": query,
        "first_page": not cursor,
        # What the rows poll to refresh: this very list.
        "list_url": request.get_full_path(),
        "operations": BulkOperation.objects.all()[:3],
    }


def _task_list(request: HtmxHttpRequest, *, template: str, fixed: dict | None = None):
    context = _task_list_context(
        request, data=request.GET, fixed=fixed, cursor=request.GET.get("cursor", "")
    )
    return page_or_partial(request, template, "results", context)


@staff_required
def task_list(request: HtmxHttpRequest) -> HttpResponse:
    return _task_list(request, template="dashboard/tasks.html")


@staff_required
def failed_callbacks(request: HtmxHttpRequest) -> HttpResponse:
    return _task_list(
        request,
        template="dashboard/failed_callbacks.html",
        fixed={"callback_status": CallbackStatus.FAILED},
    )


def _selected_ids(request: HtmxHttpRequest) -> list[uuid.UUID]:
    ids = []
    for raw in request.POST.getlist("task")[:500]:
        try:
            ids.append(uuid.UUID(raw))
        except ValueError:
            continue
    return ids


def _filters_from_post(request: HtmxHttpRequest) -> task_lists.TaskFilters:
    form = TaskFilterForm(request.POST)
    return form.filters()


def _bulk_action(request: HtmxHttpRequest, *, kind: str, act, noun: str, back_to: str,
                 template: str, fixed: dict | None = None):  # fmt: skip
    """Selected rows now, or every row matching the filter in the background (audited).
    Answers in place: the list re-rendered after the change, the operations panel, a message."""
    if request.POST.get("scope") == "matching":
        operation = bulk.start(
            kind=kind, filters=_filters_from_post(request), username=request.user.username
        )
        audit.record(user=request.user, action=f"{kind}.matching", target_type="bulk",
                     target_id=operation.pk, detail=operation.filters)  # fmt: skip
        message = f"{kind.title()}: every matching {noun}, in the background (progress below)."
    else:
        ids = _selected_ids(request)
        with transaction.atomic():
            done = act(task_ids=ids)
        audit.record(user=request.user, action=f"{kind}.selected", target_type="task",
                     detail={"done": [str(i) for i in done]})  # fmt: skip
        message = f"{kind.title()}: {len(done)} of {len(ids)} selected {noun}(s)."
        if kind == BulkOperation.Kind.RETRY and done:
            message += _waiting_note(len(done))
    context = _task_list_context(request, data=request.POST, fixed=fixed)
    context["list_url"] = safe_next(request, reverse(back_to))  # the page the form was on
    return answer(request, message=message, template=template, partial="results",
                  context=context, also=("operations",), fallback=reverse(back_to))  # fmt: skip


def _waiting_note(new_runs: int) -> str:
    """Retried tasks join the end of the task queue: say how many wait ahead of them."""
    depth = lanes.total_waiting()
    if depth is None:
        return ""
    ahead = max(0, depth - new_runs)
    return f" The new runs wait behind {ahead} queued task(s)." if ahead else " They start now."


@operator_required
def tasks_retry(request: HtmxHttpRequest) -> HttpResponse:
    return _bulk_action(request, kind=BulkOperation.Kind.RETRY, act=services.retry_tasks,
                        noun="failed task", back_to="dashboard:tasks",
                        template="dashboard/tasks.html")  # fmt: skip


@operator_required
def callbacks_redeliver(request: HtmxHttpRequest) -> HttpResponse:
    return _bulk_action(request, kind=BulkOperation.Kind.REDELIVER, act=callbacks.redeliver,
                        noun="failed callback", back_to="dashboard:failed-callbacks",
                        template="dashboard/failed_callbacks.html",
                        fixed={"callback_status": CallbackStatus.FAILED})  # fmt: skip


@staff_required
def bulk_progress(request: HtmxHttpRequest, operation_id: int) -> HttpResponse:
    operation = get_object_or_404(BulkOperation, pk=operation_id)
    context = {"operation": operation, "queued_now": lanes.total_waiting()}
    response = render(request, "dashboard/_operations.html#bulk-operation", context)
    if operation.finished_at:
        # The lists on the page refresh their rows at once: they show the new runs.
        response["HX-Trigger"] = "bulk-done"
    return response


def _task_context(task_id: uuid.UUID) -> dict:
    task = get_object_or_404(Task.objects.select_related("application"), pk=task_id)
    return {
        "task": task,
        "attempts": task.callback_attempt_rows.order_by("-run", "-number")[:200],
        "logs": task.logs.order_by("-id")[:500][::-1],
        "past_runs": task.past_runs.order_by("-run")[:50],
        "can_retry": task.status in RETRYABLE,
        "can_redeliver": bool(task.callback_url) and task.status in DELIVERABLE,
        "can_cancel": not task.is_finished,
        "live": not task.is_finished or task.callback_status in CALLBACK_IN_FLIGHT,
        # The operator may read this task: the page follows its events with a token bound to it.
        "stream_url": None if task.is_finished else stream_path(task.id),
        "queue": estimates.for_task(task),
    }


@staff_required
def task_detail(request: HtmxHttpRequest, task_id: uuid.UUID) -> HttpResponse:
    return page_or_partial(request, "dashboard/task_detail.html", "live", _task_context(task_id))


def _task_action(request: HtmxHttpRequest, task_id: uuid.UUID, action: str, ok: bool, note: str):
    audit.record(user=request.user, action=action, target_type="task", target_id=task_id,
                 detail={"done": ok})  # fmt: skip
    # The live part is swapped in place and keeps polling until the action has played out.
    return answer(request, message=note, ok=ok, template="dashboard/task_detail.html",
                  partial="live", context=_task_context(task_id),
                  fallback=reverse("dashboard:task", args=[task_id]))  # fmt: skip


@operator_required
def task_retry(request: HtmxHttpRequest, task_id: uuid.UUID) -> HttpResponse:
    with transaction.atomic():
        ok = bool(services.retry_tasks(task_ids=[task_id]))
    note = "A new run was started." if ok else "Only failed or cancelled tasks can be retried."
    return _task_action(request, task_id, "task.retry", ok, note)


@operator_required
def task_redeliver(request: HtmxHttpRequest, task_id: uuid.UUID) -> HttpResponse:
    ok = bool(callbacks.redeliver(task_ids=[task_id]))
    note = "Redelivery queued." if ok else "This task has no finished result to deliver."
    return _task_action(request, task_id, "task.redeliver", ok, note)


@operator_required
def task_cancel(request: HtmxHttpRequest, task_id: uuid.UUID) -> HttpResponse:
    get_object_or_404(Task, pk=task_id)
    ok = services.cancel_task(task_id=task_id).cancelled
    note = "Task cancelled." if ok else "The task had already finished."
    return _task_action(request, task_id, "task.cancel", ok, note)


# --- applications ------------------------------------------------------------------------------


@staff_required
def application_list(request: HtmxHttpRequest) -> HttpResponse:
    form = ApplicationForm()
    created = None
    if request.method == "POST":
        if not is_operator(request.user):
            return HttpResponse("This action needs the operate permission.", status=403)
        form = ApplicationForm(request.POST)
        if form.is_valid():
            created = _create_application(request, form)
            form = ApplicationForm()
    context = {"applications": Application.objects.all()[:500], "form": form, "created": created}
    return page_or_partial(request, "dashboard/applications.html", "create-form", context)


def _create_application(request: HtmxHttpRequest, form: ApplicationForm):
    with transaction.atomic():
        created = applications.create_application(**form.settings())
        audit.record(
            user=request.user,
            action="application.create",
            target_type="application",
            target_id=created.application.pk,
            detail={"name": created.application.name},
        )
    return created


def _application_context(app: Application, **extra) -> dict:
    context = {
        "app": app,
        "form": ApplicationForm(instance=app),
        "health": stats.app_health(app),
        "deliveries_waiting": endpoints.waiting_count(application_id=app.pk),
        "api_keys": app.api_keys.order_by("-created_at")[:20],
        "now": timezone.now(),
        # Two rotate forms on the page: distinct element ids, the same field name.
        "rotate_key_form": RotateForm(auto_id="id_key_%s"),
        "rotate_secret_form": RotateForm(auto_id="id_secret_%s"),
        "rotate_signing_key_form": RotateForm(auto_id="id_signing_%s"),
        "cleanup_preview": retention.preview(application_id=app.pk),
        "cleanup_runs": retention.recent_runs(limit=5),
    }
    return context | extra


def _settings_values(app: Application) -> dict:
    return {name: getattr(app, name) for name in APPLICATION_AUDITED_FIELDS}


@staff_required
def application_detail(request: HtmxHttpRequest, app_id: uuid.UUID) -> HttpResponse:
    app = get_object_or_404(Application, pk=app_id)
    if request.method != "POST":
        return page_or_partial(request, "dashboard/application_detail.html", "settings",
                               _application_context(app))  # fmt: skip
    if not is_operator(request.user):
        return HttpResponse("This action needs the operate permission.", status=403)
    before = _settings_values(app)
    form = ApplicationForm(request.POST, instance=app)
    if not form.is_valid():
        context = _application_context(app, form=form)
        return page_or_partial(request, "dashboard/application_detail.html", "settings", context)
    with transaction.atomic():
        form.save()
        app.refresh_from_db()  # validation wrote the form's values onto `app`: read them back
        changes = audit.changes(before, _settings_values(app))
        audit.record(user=request.user, action="application.update", target_type="application",
                     target_id=app.pk, target_label=app.name,
                     detail={"changes": changes})  # fmt: skip
    names = ", ".join(changes) or "nothing changed"
    # Every panel showing a setting is re-rendered: the retention panel too.
    return answer(request, message=f"Settings saved ({names}).",
                  template="dashboard/application_detail.html", partial="settings",
                  context=_application_context(app), also=("retention", "summary"),
                  fallback=reverse("dashboard:application", args=[app.pk]))  # fmt: skip


@operator_required
def application_rotate(request: HtmxHttpRequest, app_id: uuid.UUID, what: str) -> HttpResponse:
    app = get_object_or_404(Application, pk=app_id)
    if what not in ("key", "secret", "signing-key"):
        raise Http404("Unknown credential.")
    form = RotateForm(request.POST)
    if not form.is_valid():
        return HttpResponse("Choose a grace period from the list.", status=400)
    grace = form.cleaned_data["grace_hours"]
    if what == "key":
        value = applications.rotate_api_key(application_id=app.pk, grace_hours=grace)
        label = "API key"
        stopped = "The previous key stopped working (within a few seconds on every web process)."
    elif what == "secret":
        value = applications.rotate_webhook_secret(application_id=app.pk, grace_hours=grace)
        label = "webhook secret"
        stopped = "The previous secret no longer signs."
    else:
        try:
            value = applications.rotate_signing_key(application_id=app.pk, grace_hours=grace)
        except applications.InvalidApplication as exc:
            return HttpResponse(f"Not rotated: {exc.message}.", status=400)
        label = "signing key id"
        stopped = "The previous key no longer signs and is no longer in the JWKS."
    audit.record(user=request.user, action=f"application.rotate_{what.replace('-', '_')}",
                 target_type="application", target_id=app.pk, target_label=app.name,
                 detail={"grace_hours": grace})  # fmt: skip
    period = dict(GRACE_CHOICES)[str(grace)]
    note = f"The previous one stays valid for {period}." if grace else stopped
    # A key id is public (the JWKS lists it): only secrets are "shown only this once".
    context = _application_context(app, label=label, value=value, note=note,
                                   public=what == "signing-key")  # fmt: skip
    if not request.htmx:  # the value is shown once: on the page the form posted from
        return render(request, "dashboard/application_detail.html#secret-once", context)
    # The new secret in its slot, and the key table (a new key, the old one's expiry) refreshed.
    return answer(request, message=f"New {label} issued. {note}",
                  template="dashboard/application_detail.html", partial="secret-once",
                  context=context, also=("credentials",),
                  fallback=reverse("dashboard:application", args=[app.pk]))  # fmt: skip


@operator_required
def api_key_revoke(request: HtmxHttpRequest, app_id: uuid.UUID, key_id: int) -> HttpResponse:
    key = get_object_or_404(ApiKey, pk=key_id, application_id=app_id)
    result = credentials.revoke_api_keys(application_id=app_id, key_id=key.pk)
    audit.record(user=request.user, action="application.revoke_key",
                 target_type="application", target_id=app_id,
                 detail={"key": f"{key.prefix}…", "revoked": bool(result.revoked)})  # fmt: skip
    if result.revoked:
        message = (f"API key {key.prefix}… revoked: refused from now on "
                   "(within a few seconds on every web process).")  # fmt: skip
    else:
        message = f"API key {key.prefix}… was already revoked."
    return answer(request, message=message, ok=bool(result.revoked),
                  template="dashboard/application_detail.html", partial="credentials",
                  context=_application_context(key.application),
                  fallback=reverse("dashboard:application", args=[app_id]))  # fmt: skip


@operator_required
def application_cleanup(request: HtmxHttpRequest, app_id: uuid.UUID) -> HttpResponse:
    app = get_object_or_404(Application, pk=app_id)
    run = retention.run_cleanup(trigger="manual", application_id=app.pk)
    audit.record(
        user=request.user,
        action="retention.cleanup",
        target_type="application",
        target_id=app.pk,
        target_label=app.name,
        detail={"removed": run.total_removed if run else None},
    )
    if run is None:
        message, ok = "Another cleanup is running; try again in a moment.", False
    else:
        took = human_seconds(((run.finished_at or run.started_at) - run.started_at).total_seconds())
        message, ok = f"Cleanup removed {run.total_removed} task(s) in {took}.", True
    return answer(request, message=message, ok=ok, template="dashboard/application_detail.html",
                  partial="retention", context=_application_context(app), also=("summary",),
                  fallback=reverse("dashboard:application", args=[app.pk]))  # fmt: skip


# --- favicon ----------------------------------------------------------------------------------


@require_GET
def favicon(request: HtmxHttpRequest) -> FileResponse:
    """static/favicon.ico at the path browsers ask for, to anyone (no login: it is public)."""
    path = finders.find("favicon.ico")
    if not path:
        raise Http404("No favicon.")
    response = FileResponse(open(path, "rb"), content_type="image/x-icon")  # noqa: SIM115
    response["Cache-Control"] = "public, max-age=86400"
    return response


# --- time zone ---------------------------------------------------------------------------------


@staff_required
def time_zone(request: HtmxHttpRequest) -> HttpResponse:
    """Choose the zone the dashboard shows times in (kept in the session; UTC by default)."""
    error = ""
    if request.method == "POST":
        name = request.POST.get("time_zone", "").strip()
        if zones.is_valid_zone(name):
            request.session[zones.SESSION_KEY] = name
            messages.success(request, f"Times are now shown in {name}.")
            return redirect(safe_next(request, reverse("dashboard:home")))
        error = f"Unknown time zone: {name!r}."
    context = {"zones": zones.available_zones(), "error": error,
               "next": request.GET.get("next", "")}  # fmt: skip
    return page_or_partial(request, "dashboard/time_zone.html", "form", context)
