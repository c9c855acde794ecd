"""The dashboard's Endpoints pages (dashboard/ui/endpoints.py): the list worst first with each
endpoint's health, an endpoint's page with its recent attempts, `Re-enable` and 'recover since
T' (operators only, CSRF, audited), the Overview's alert for a disabled endpoint, and the
per-endpoint gauges in /metrics."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.utils import timezone

from tasks.delivery import endpoints, health
from tasks.models import AuditEntry, BulkOperation, CallbackAttempt, Endpoint, Task
from tasks.plumbing.queueing import queue
from tests.conftest import Client

pytestmark = pytest.mark.django_db


def htmx(client: Client, url: str, method: str = "get", **data):
    return getattr(client, method)(url, data, HTTP_HX_REQUEST="true")


def make_endpoint(app, origin: str, outcomes: list[bool], **fields) -> Endpoint:
    """An endpoint with one recorded attempt per outcome (oldest first), each a task's, with
    durations 10, 20, … ms."""
    key = f"{app.application.id}|{origin}"
    now = timezone.now()
    for n, delivered in enumerate(outcomes):
        recorded = health.record(endpoint=key, delivered=delivered,
                                 circuit_failures=app.application.circuit_failures)  # fmt: skip
        assert recorded is not None
        task = Task.objects.create(application=app.application, inputs={}, status="succeeded",
                                   callback_url=f"{origin}/hook", finished_at=now)  # fmt: skip
        CallbackAttempt.objects.create(
            task=task, run=1, number=1, trigger="auto", started_at=now - timedelta(seconds=100 - n),
            url=task.callback_url, status_code=200 if delivered else 500,
            duration_ms=10 * (n + 1), delivered=delivered, endpoint_id=recorded.endpoint_id,
        )  # fmt: skip
    row = Endpoint.objects.get(application=app.application, origin=origin)
    if fields:
        Endpoint.objects.filter(pk=row.pk).update(**fields)
        row.refresh_from_db()
    return row


def listed(html: str) -> list[int]:
    return [int(pk) for pk in re.findall(r'<tr data-endpoint="(\d+)"', html)]


def test_the_list_is_worst_first_with_each_endpoints_health(viewer, make_app):
    app = make_app("echo", circuit_failures=3)
    healthy = make_endpoint(app, "http://good.example:80", [True, True, True, False])
    flaky = make_endpoint(app, "http://flaky.example:80", [True, False, False])
    broken = make_endpoint(app, "https://down.example:443", [False, False, False])
    disabled = make_endpoint(app, "http://gone.example:8080", [False],
                             disabled_at=timezone.now())  # fmt: skip
    html = viewer.get("/endpoints/").content.decode()
    assert listed(html) == [disabled.pk, broken.pk, flaky.pk, healthy.pk]
    assert 'aria-current="page">Endpoints</a>' in html
    row = re.search(rf'<tr data-endpoint="{healthy.pk}".*?</tr>', html, re.S).group(0)
    assert "75%" in row and "of 4" in row  # 3 of the last 4 delivered
    assert '<td class="num">20</td>' in row and '<td class="num">40</td>' in row  # p50, p95
    assert 'data-state="open"' in html and 'data-state="disabled"' in html
    partial = htmx(viewer, "/endpoints/").content.decode()
    assert partial.startswith('<div id="endpoints"') and "<html" not in partial
    assert listed(partial) == listed(html)


def test_an_endpoints_page_shows_its_recent_attempts(viewer, make_app):
    app = make_app("echo")
    row = make_endpoint(app, "http://one.example:80", [False, True])
    other = make_endpoint(app, "http://two.example:80", [True])
    html = viewer.get(f"/endpoints/{row.pk}/").content.decode()
    attempts = re.search(r'<table class="grid" id="attempts">.*?</table>', html, re.S).group(0)
    assert attempts.count("<tr class=") == 2
    assert attempts.index('class="ok"') < attempts.index('class="failed"')  # newest first
    mine = set(CallbackAttempt.objects.filter(endpoint=row).values_list("task_id", flat=True))
    # By the links' full ids: time-ordered ids made a moment apart share their first characters.
    linked = set(re.findall(r'href="/tasks/([0-9a-f-]{36})/"', attempts))
    assert {str(t) for t in mine} == linked
    assert str(other.attempts.get().task_id) not in linked
    partial = htmx(viewer, f"/endpoints/{row.pk}/").content.decode()
    assert partial.startswith('<section id="endpoint"')
    assert viewer.get("/endpoints/999999/").status_code == 404


def test_a_disabled_endpoint_alerts_on_the_overview_and_an_operator_re_enables_it(
    operator, viewer, make_app
):
    app = make_app("echo", circuit_failures=1)
    row = make_endpoint(app, "http://gone.example:80", [False],
                        failing_since=timezone.now() - timedelta(hours=200))  # fmt: skip
    assert health.sweep().disabled == 1
    overview = viewer.get("/").content.decode()
    assert "Endpoint http://gone.example:80 of app-echo is disabled" in overview
    assert f'href="/endpoints/{row.pk}/"' in overview
    page = viewer.get(f"/endpoints/{row.pk}/").content.decode()
    assert "Re-enable</button>" not in page  # a viewer sees no action
    assert viewer.post(f"/endpoints/{row.pk}/re-enable").status_code == 403
    assert "Re-enable</button>" in operator.get(f"/endpoints/{row.pk}/").content.decode()
    answer = htmx(operator, f"/endpoints/{row.pk}/re-enable", method="post").content.decode()
    assert answer.startswith('<section id="endpoint"') and 'data-state="closed"' in answer
    assert "Re-enabled http://gone.example:80" in answer
    row.refresh_from_db()
    assert row.disabled_at is None and row.circuit == "closed"
    assert endpoints.circuit_of(endpoint=health.key_of(row)) is None
    entry = AuditEntry.objects.get(action="endpoint.reenable")
    assert entry.username == "operator" and entry.target_id == str(row.pk)
    assert "is disabled" not in viewer.get("/").content.decode()


def test_recover_since_t_is_an_audited_background_operation(operator, viewer, make_app):
    app = make_app("echo")
    row = make_endpoint(app, "http://one.example:80", [False])
    Task.objects.filter(application=app.application).update(callback_status="failed")
    since = (timezone.localtime() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    form = {"endpoint": row.pk, "since": since}
    assert viewer.post("/endpoints/recover", form).status_code == 403
    answer = htmx(operator, "/endpoints/recover", method="post", endpoint=row.pk, since=since)
    html = answer.content.decode()
    assert html.startswith('<div class="operations" id="operations"')
    assert "Redeliver what failed since" in html
    operation = BulkOperation.objects.get()
    assert operation.kind == "recover" and operation.filters["endpoint"] == row.pk
    assert operation.created_by == "operator"
    assert AuditEntry.objects.get(action="endpoints.recover").target_id == str(operation.pk)
    job_ids = queue(settings.MAINTENANCE_QUEUE).get_job_ids()
    assert any(queue(settings.MAINTENANCE_QUEUE).fetch_job(j).args == (operation.pk,)
               for j in job_ids)  # fmt: skip
    queue(settings.MAINTENANCE_QUEUE).empty()
    # By application; and a form naming neither is refused, nothing started.
    htmx(operator, "/endpoints/recover", method="post", application=app.application.pk,
         since=since)  # fmt: skip
    assert BulkOperation.objects.count() == 2
    refused = htmx(operator, "/endpoints/recover", method="post", since=since).content.decode()
    assert "Name an endpoint or an application" in refused
    assert BulkOperation.objects.count() == 2
    queue(settings.MAINTENANCE_QUEUE).empty()
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(User.objects.get(username="operator"))
    assert strict.post("/endpoints/recover", form).status_code == 403


def test_metrics_expose_per_endpoint_gauges(viewer, make_app, settings):
    settings.METRICS_PUBLIC = True
    settings.METRICS_CACHE_SECONDS = 0  # a scrape of an earlier test is not this one's
    app = make_app("echo", circuit_failures=2)
    make_endpoint(app, "http://one.example:80", [True, False, False])
    text = viewer.get("/metrics").content.decode()
    labels = 'app="app-echo",endpoint="http://one.example:80"'
    assert f"taskhook_endpoint_consecutive_failures{{{labels}}} 2.0" in text
    assert f"taskhook_endpoint_circuit_open{{{labels}}} 1.0" in text
    assert f"taskhook_endpoint_disabled{{{labels}}} 0.0" in text
    assert re.search(rf"taskhook_endpoint_success_ratio\{{{labels}\}} 0\.333", text)
    assert f'taskhook_endpoint_latency_ms{{{labels},quantile="0.95"}} 30.0' in text
