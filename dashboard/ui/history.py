"""The History page: throughput, failures, queue depth and callback success per application,
over 1 h, 24 h or 7 days, from the rollups the cron process keeps (tasks.telemetry.rollups)."""

from __future__ import annotations

from django.http import HttpResponse

from dashboard.ui.access import staff_required
from dashboard.ui.charts import Chart, time_chart
from dashboard.ui.responses import HtmxHttpRequest, page_or_partial
from tasks.models import Application
from tasks.selectors import history as selector


def history_charts(data: selector.History) -> list[Chart]:
    label_format = "%H:%M" if data.range.key != "7d" else "%a %H:%M"
    s = data.series

    def chart(title: str, unit: str, series: list, fixed_top: float | None = None) -> Chart:
        return time_chart(title=title, unit=unit, buckets=data.buckets, series=series,
                          fixed_top=fixed_top, label_format=label_format)  # fmt: skip

    per = data.range.per
    return [
        chart("Throughput", f"tasks/{per}",
              [("succeeded", "s-ok", s["succeeded"]), ("failed", "s-bad", s["failed"])]),
        chart("Failures", f"per {per}", [("failed tasks", "s-bad", s["failed"]),
              ("failed callback attempts", "s-warn", s["callbacks_failed"])]),
        chart("Queue depth", "tasks waiting", [("pending (highest sample)", "s-run",
              s["queued_max"])]),
        chart("Callback success", "% of attempts", [("delivered", "s-ok", data.callback_success)],
              fixed_top=100),
    ]  # fmt: skip


@staff_required
def history(request: HtmxHttpRequest) -> HttpResponse:
    range_key = request.GET.get("range", selector.DEFAULT_RANGE)
    if range_key not in selector.RANGES:
        range_key = selector.DEFAULT_RANGE
    applications = list(Application.objects.only("id", "name")[:500])
    app_id = request.GET.get("application", "")
    if app_id not in {str(app.pk) for app in applications}:
        app_id = ""
    data = selector.history(range_key=range_key, application_id=app_id)
    context = {
        "data": data,
        "charts": history_charts(data),
        "ranges": selector.RANGES.values(),
        "range_key": range_key,
        "applications": applications,
        "app_id": app_id,
    }
    return page_or_partial(request, "dashboard/history.html", "charts", context)
