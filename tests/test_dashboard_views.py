"""Dashboard views: page vs HTMX partial, access (anonymous/viewer/operator), actions + audit."""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
import uuid
from datetime import timedelta
from html.parser import HTMLParser
from urllib.parse import urljoin

import pytest
from django.contrib.auth.models import User
from django.urls import resolve
from django.utils import timezone

from dashboard.ui import urls as ui_urls
from tasks.models import (
    ApiKey,
    Application,
    AuditEntry,
    Batch,
    BulkOperation,
    CallbackAttempt,
    Destination,
    Endpoint,
    Task,
)
from tasks.selectors.task_lists import TaskFilters, task_page, uuid_prefix_range
from tests.conftest import BASE_DIR, Client

pytestmark = pytest.mark.django_db


@pytest.fixture
def app(make_app):
    return make_app("echo")


def make_task(app, **fields) -> Task:
    return Task.objects.create(application=app.application, inputs={"a": 1}, **fields)


def htmx(client: Client, url: str, method: str = "get", **data):
    return getattr(client, method)(url, data, HTTP_HX_REQUEST="true")


# Every URL of dashboard/ui/urls.py, by name, in exactly one of the lists below (and ACTIONS
# further down); test_every_dashboard_url_is_listed fails on a URL that is in none of them.
# Paths take {task}, {app}, {key} and {operation} from the `ids` fixture.

# Pages: the whole page, or for an HTMX request (from the same view) only the partial that
# starts with the marker, which the page holds too.
PAGES = {
    "home": ("/", "Overview", '<section id="live"'),
    "tasks": ("/tasks/", "Tasks", '<div id="results"'),
    "task": ("/tasks/{task}/", "Task <code>", '<section id="task-live"'),
    "batches": ("/batches/", "Batches", '<div id="batches"'),
    "batch": ("/batches/{batch}/", "Batch <code>", '<section id="batch-live"'),
    "failed-callbacks": ("/callbacks/failed/", "Failed callbacks", '<div id="results"'),
    "work": ("/work/", "Work", '<div id="results"'),
    "failures": ("/failures/", "Failures", '<div id="groups"'),
    "applications": ("/applications/", "Applications", '<div id="create-form">'),
    "application": ("/applications/{app}/", "Credentials", '<div id="settings">'),
    "audit": ("/audit/", "Audit log", '<div id="entries">'),
    "time-zone": ("/time-zone/", "Time zone", '<div id="zone-form"'),
    "history": ("/history/", "History", '<section id="history"'),
    "workers": ("/workers/", "Queues &amp; workers", '<section id="control"'),
    "endpoints": ("/endpoints/", "Endpoints", '<div id="endpoints"'),
    "endpoint": ("/endpoints/{endpoint}/", "Endpoint <code>", '<section id="endpoint"'),
    "destinations": ("/destinations/", "Destinations", '<div id="destinations"'),
    "destination": ("/destinations/{destination}/", "Destination <code>",
                    '<section id="destination"'),
}  # fmt: skip
# Fragments: only ever a partial, which a page polls.
FRAGMENTS = {"bulk": ("/bulk/{operation}/", '<div class="operation" id="operation-')}
# Not the dashboard's own: served to anyone.
PUBLIC = {"favicon": "/favicon.ico"}


@pytest.fixture
def ids(app) -> dict:
    """One of each object a dashboard URL names."""
    task = make_task(app, status="failed", error="boom", callback_url="http://x.example/h",
                     callback_status="failed", finished_at=timezone.now())  # fmt: skip
    operation = BulkOperation.objects.create(kind="retry", status="running", created_by="op")
    key = ApiKey.objects.get(application=app.application)
    batch = Batch.objects.create(application=app.application, total=1)
    endpoint = Endpoint.objects.create(application=app.application, origin="http://x.example:80")
    destination = Destination.objects.create(application=app.application, kind="redis",
                                             url="redis://127.0.0.1:6379/0?stream=s")  # fmt: skip
    return {"task": task.id, "app": app.application.id, "key": key.pk, "operation": operation.pk,
            "batch": batch.id, "endpoint": endpoint.pk, "destination": destination.pk}  # fmt: skip


def test_every_dashboard_url_is_listed(ids):
    """A URL added to dashboard/ui/urls.py fails here until it is in PAGES, FRAGMENTS, ACTIONS or
    PUBLIC, so the page/partial and access tests cover it; each listed path is that URL's."""
    names = [pattern.name for pattern in ui_urls.urlpatterns]
    assert len(names) == len(set(names)) and None not in names, names
    listed = {**PAGES, **FRAGMENTS, **ACTIONS, **PUBLIC}
    assert len(listed) == len(PAGES) + len(FRAGMENTS) + len(ACTIONS) + len(PUBLIC)
    assert set(names) == set(listed), (
        f"not listed: {sorted(set(names) - set(listed))}, "
        f"not a URL: {sorted(set(listed) - set(names))}"
    )
    for name, entry in listed.items():
        path = entry if isinstance(entry, str) else entry[0]
        assert resolve(path.format(**ids)).url_name == name, (name, path)


@pytest.mark.parametrize("name", PAGES)
def test_pages_render_full_and_partial(operator, ids, name):
    path, heading, marker = PAGES[name]
    url = path.format(**ids)
    page = operator.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "<html" in html and heading in html and "htmx-2.0.11.min.js" in html
    assert marker in html  # the partial is part of the page
    partial = htmx(operator, url)
    body = partial.content.decode()
    assert partial.status_code == 200
    assert "<html" not in body and body.lstrip().startswith(marker), body[:200]
    # A boosted navigation is a navigation: the whole page.
    boosted = operator.get(url, HTTP_HX_REQUEST="true", HTTP_HX_BOOSTED="true")
    assert "<html" in boosted.content.decode()


@pytest.mark.parametrize("name", FRAGMENTS)
def test_fragments_are_partials_for_every_request(operator, ids, name):
    path, marker = FRAGMENTS[name]
    for response in (operator.get(path.format(**ids)), htmx(operator, path.format(**ids))):
        body = response.content.decode()
        assert response.status_code == 200
        assert "<html" not in body and body.lstrip().startswith(marker), body[:200]


def test_anonymous_is_sent_to_login(client, ids):
    for path, *_ in (*PAGES.values(), *FRAGMENTS.values()):
        response = client.get(path.format(**ids))
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def _title(html: str) -> str:
    return re.search(r"<title>(.*?)</title>", html, re.S).group(1).strip()


def test_every_title_names_the_site_once(client, operator, ids):
    titles = {"login": _title(client.get("/accounts/login/").content.decode())}
    for name, (path, *_) in PAGES.items():
        titles[name] = _title(operator.get(path.format(**ids)).content.decode())
    assert titles["login"] == "Log in · Taskhook"
    assert titles["tasks"] == "Tasks · Taskhook"
    for name, title in titles.items():
        assert title.count("Taskhook") == 1 and title.endswith(" · Taskhook"), (name, title)
    assert len(set(titles.values())) == len(titles), titles  # each page names itself


def test_non_staff_user_is_refused(client):
    user = User.objects.create_user("customer", password="pw-customer-123")
    client.force_login(user)
    assert client.get("/").status_code == 403


def test_task_detail_full_and_partial(viewer, app):
    task = make_task(app, status="running", started_at=timezone.now(), progress=40)
    page = viewer.get(f"/tasks/{task.id}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'hx-trigger="every 2s' in html and 'value="40"' in html
    partial = htmx(viewer, f"/tasks/{task.id}/").content.decode()
    assert partial.lstrip().startswith('<section id="task-live"')
    # Finished: the live part stops polling.
    Task.objects.filter(pk=task.id).update(status="succeeded", finished_at=timezone.now())
    assert "hx-trigger" not in htmx(viewer, f"/tasks/{task.id}/").content.decode()
    assert viewer.get(f"/tasks/{uuid.uuid4()}/").status_code == 404


class _HxGets(HTMLParser):
    """The start tags that carry hx-get, as (tag, attributes) with entities decoded."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        if "hx-get" in attributes:
            self.found.append((tag, attributes))


def hx_gets(html: str) -> list[tuple[str, dict]]:
    parser = _HxGets()
    parser.feed(html)
    return parser.found


def root_element(html: str) -> tuple[str, str]:
    """The tag and id of a partial's first element."""
    match = re.match(r'\s*<(\w+)\b[^>]*?\bid="([^"]*)"', html)
    assert match, html[:200]
    return match.group(1), match.group(2)


def assert_swaps_its_target(client, url: str, attrs: dict) -> None:
    """The HTMX answer is the element the swap replaces: hx-target's id, swapped outerHTML (an
    innerHTML swap would nest a second element with that id inside the first)."""
    swapped = htmx(client, url).content.decode()
    assert "<html" not in swapped
    assert root_element(swapped)[1] == attrs["hx-target"].removeprefix("#"), (url, attrs)
    assert attrs.get("hx-swap") == "outerHTML", (url, attrs)


def test_every_hx_get_link_has_an_href(operator, app):
    """Each hx-get link works without JS too (its href is the same URL), each hx-get form is a
    GET form to the same URL, and each poll answers with the element it replaces. Pages with
    every kind: pagers on a filtered list, on its second page, the audit log, the live parts."""
    now = timezone.now()
    Task.objects.bulk_create(
        Task(application=app.application, inputs={}, status="failed", error="boom",
             callback_url="http://x.example/h", callback_status="failed", finished_at=now,
             created_at=now - timedelta(seconds=i))
        for i in range(60)
    )  # fmt: skip
    running = make_task(app, status="running", started_at=now)
    AuditEntry.objects.bulk_create(
        AuditEntry(username="op", action="task.retry", target_type="task") for _ in range(120)
    )
    BulkOperation.objects.create(kind="retry", status="running", created_by="op")
    filtered = f"/tasks/?size=25&status=failed&application={app.application.id}"
    pages = ["/", "/tasks/?size=25", filtered, "/callbacks/failed/?size=25", "/audit/",
             f"/tasks/{running.id}/"]  # fmt: skip
    seen: dict[str, list] = {"a": [], "form": [], "poll": []}
    visited = set()
    while pages:
        url = pages.pop(0)
        if url in visited:
            continue
        visited.add(url)
        response = operator.get(url)
        assert response.status_code == 200, url
        for tag, attrs in hx_gets(response.content.decode()):
            target = urljoin(url, attrs["hx-get"])
            if tag == "a":
                assert attrs.get("href") == attrs["hx-get"], (url, attrs)
                seen["a"].append(target)
                if len(visited) < 12:
                    pages.append(target)  # the next page's links are checked too
                assert "<html" in operator.get(target).content.decode()
                assert_swaps_its_target(operator, target, attrs)
            elif tag == "form":
                assert attrs.get("method") == "get", (url, attrs)
                assert attrs.get("action", "") == attrs["hx-get"], (url, attrs)
                assert_swaps_its_target(operator, target, attrs)
                seen["form"].append(target)
            else:  # a live part that polls and replaces itself
                assert "every " in attrs["hx-trigger"] and "data-poll" in attrs, (url, attrs)
                assert attrs["hx-swap"] == "outerHTML", (url, attrs)
                swapped = htmx(operator, target).content.decode()
                assert root_element(swapped) == (tag, attrs["id"]), (url, attrs)
                seen["poll"].append(target)
    # Page 1 of each list links to page 2; page 2 to page 1 and page 3; older audit entries.
    assert len(seen["a"]) >= 10, seen["a"]
    assert any("cursor=" in link and "status=failed" in link for link in seen["a"]), seen["a"]
    assert any("before=" in link for link in seen["a"]), seen["a"]
    assert len(seen["form"]) >= 3, seen["form"]  # the filters, on each list page
    assert len(seen["poll"]) >= 3, seen["poll"]  # overview, running task, bulk operation


def test_xss_output_and_error_render_as_text(viewer, app):
    payload = "<script>alert('x')</script>"
    task = make_task(app, status="failed", output={"html": payload}, error=payload,
                     traceback=f"Traceback\n  {payload}", finished_at=timezone.now())  # fmt: skip
    for url in (f"/tasks/{task.id}/", "/tasks/"):
        html = viewer.get(url).content.decode()
        assert payload not in html
        assert "&lt;script&gt;alert(" in html


# --- actions --------------------------------------------------------------------------------


# POST-only actions for operators, by URL name: (path, form data).
ACTIONS = {
    "task-retry": ("/tasks/{task}/retry", {}),
    "task-redeliver": ("/tasks/{task}/redeliver", {}),
    "task-cancel": ("/tasks/{task}/cancel", {}),
    "batch-retry": ("/batches/{batch}/retry", {}),
    "batch-cancel": ("/batches/{batch}/cancel", {}),
    "tasks-retry": ("/tasks/retry", {"task": "{task}"}),
    "callbacks-redeliver": ("/callbacks/redeliver", {"task": "{task}"}),
    "work-act": ("/work/act", {"state": "failed", "act": "retry:selected", "task": "{task}"}),
    "failures-act": ("/failures/act", {"kind": "task", "fingerprint": "0123456789abcdef"}),
    "application-rotate": ("/applications/{app}/rotate-key", {}),
    "api-key-revoke": ("/applications/{app}/keys/{key}/revoke", {}),
    "application-cleanup": ("/applications/{app}/cleanup", {}),
    "queue-pause": ("/queues/pause", {"queue": "tasks", "action": "pause"}),
    "worker-stop": ("/workers/stop", {"worker": "some-worker", "mode": "now"}),
    "alert-action": ("/alerts/act", {"kind": "stuck_running", "application": "{app}",
                                     "action": "fail"}),
    "endpoint-reenable": ("/endpoints/{endpoint}/re-enable", {}),
    "endpoints-recover": ("/endpoints/recover", {"endpoint": "{endpoint}",
                                                 "since": "2026-01-01T00:00:00"}),
    "destination-reenable": ("/destinations/{destination}/re-enable", {}),
    "destinations-recover": ("/destinations/recover", {"destination": "{destination}",
                                                       "since": "2026-01-01T00:00:00"}),
}  # fmt: skip
# The other credential, through the same URL.
ACTION_CASES = [*ACTIONS.values(), ("/applications/{app}/rotate-secret", {})]


@pytest.mark.parametrize(("url", "data"), ACTION_CASES)
def test_viewer_gets_403_on_every_action(viewer, ids, url, data):
    response = viewer.post(url.format(**ids), {k: v.format(**ids) for k, v in data.items()})
    assert response.status_code == 403
    assert AuditEntry.objects.count() == 0
    assert Task.objects.get(pk=ids["task"]).run == 1
    assert ApiKey.objects.get(pk=ids["key"]).revoked_at is None


@pytest.mark.parametrize(("url", "data"), ACTION_CASES)
def test_actions_refuse_get(operator, ids, url, data):
    assert operator.get(url.format(**ids)).status_code == 405


def test_actions_need_csrf(app):
    user = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    task = make_task(app, status="failed")
    assert client.post(f"/tasks/{task.id}/retry").status_code == 403
    assert Task.objects.get(pk=task.id).run == 1


def test_operator_retry_task_starts_a_new_run_and_is_audited(operator, app):
    task = make_task(app, status="failed", error="first failure", traceback="tb",
                     finished_at=timezone.now())  # fmt: skip
    response = operator.post(f"/tasks/{task.id}/retry")
    assert response.status_code == 302
    task.refresh_from_db()
    assert (task.status, task.run, task.error) == ("pending", 2, "")
    assert task.past_runs.get().error == "first failure"
    entry = AuditEntry.objects.get()
    assert (entry.username, entry.action, entry.target_id) == (
        "operator",
        "task.retry",
        str(task.id),
    )


def test_operator_redeliver_via_htmx_returns_the_live_partial(operator, app):
    task = make_task(app, status="succeeded", callback_url="http://127.0.0.1:9/h",
                     callback_status="failed", finished_at=timezone.now())  # fmt: skip
    response = htmx(operator, f"/tasks/{task.id}/redeliver", "post")
    body = response.content.decode()
    assert response.status_code == 200 and '<section id="task-live"' in body
    assert "Redelivery queued." in body and "hx-trigger" in body  # polls until delivered
    assert Task.objects.get(pk=task.id).callback_status == "pending"
    assert AuditEntry.objects.get().action == "task.redeliver"


def _action_forms(html: str) -> dict[str, dict]:
    """The task page's action forms, by their action URL's last part."""
    forms = {}
    for match in re.finditer(r"<form [^>]*>", html):
        action = re.search(r'action="([^"]*)"', match.group(0))
        if action and "/tasks/" in action.group(1):
            attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', match.group(0)))
            forms[action.group(1).rsplit("/", 1)[-1]] = attrs
    return forms


def test_task_actions_are_htmx_posts_that_also_work_as_plain_forms(operator, app):
    running = make_task(app, status="running", started_at=timezone.now(),
                        callback_url="http://127.0.0.1:9/h")  # fmt: skip
    failed = make_task(app, status="failed", callback_url="http://127.0.0.1:9/h",
                       callback_status="failed", finished_at=timezone.now())  # fmt: skip
    forms = _action_forms(operator.get(f"/tasks/{running.id}/").content.decode())
    forms |= _action_forms(operator.get(f"/tasks/{failed.id}/").content.decode())
    assert set(forms) == {"cancel", "retry", "redeliver"}
    for name, attrs in forms.items():
        assert attrs["method"] == "post" and attrs["hx-post"] == attrs["action"], name
        assert (attrs["hx-target"], attrs["hx-swap"]) == ("#task-live", "outerHTML"), name
    # HTMX: the live part, swapped in place, with the outcome.
    body = htmx(operator, f"/tasks/{running.id}/cancel", "post").content.decode()
    assert body.lstrip().startswith('<section id="task-live"') and "Task cancelled." in body
    assert Task.objects.get(pk=running.id).status == "cancelled"
    body = htmx(operator, f"/tasks/{running.id}/retry", "post").content.decode()
    assert body.lstrip().startswith('<section id="task-live"') and "A new run was started." in body
    assert Task.objects.get(pk=running.id).run == 2
    # Without JS: the same forms post and come back to the task page.
    response = operator.post(f"/tasks/{running.id}/cancel")
    assert response.status_code == 302 and response["Location"] == f"/tasks/{running.id}/"
    response = operator.post(f"/tasks/{failed.id}/retry")
    assert response.status_code == 302 and response["Location"] == f"/tasks/{failed.id}/"
    assert [e.action for e in AuditEntry.objects.order_by("id")] == [
        "task.cancel", "task.retry", "task.cancel", "task.retry"]  # fmt: skip


def test_retry_selected_and_all_matching(operator, app):
    failed = [make_task(app, status="failed", finished_at=timezone.now()) for _ in range(3)]
    ok = make_task(app, status="succeeded", finished_at=timezone.now())
    response = operator.post("/tasks/retry", {"scope": "selected",
                                              "task": [failed[0].id, ok.id]})  # fmt: skip
    assert response.status_code == 302
    assert Task.objects.get(pk=failed[0].id).run == 2
    assert Task.objects.get(pk=ok.id).run == 1  # only failed/cancelled tasks are retried
    operator.post("/tasks/retry", {"scope": "matching", "application": app.application.id})
    operation = BulkOperation.objects.get()
    assert operation.kind == "retry" and operation.filters["status"] == "failed"
    assert AuditEntry.objects.filter(action="retry.matching").exists()


def test_bulk_operation_runs_in_batches(app):
    from tasks.upkeep import bulk

    tasks = [make_task(app, status="failed", finished_at=timezone.now()) for _ in range(450)]
    operation = bulk.start(kind="retry", filters=TaskFilters(application=str(app.application.id)),
                           username="op")  # fmt: skip
    done = bulk.run(operation_id=operation.id)
    assert (done.status, done.processed, done.affected) == ("done", 450, 450)
    assert Task.objects.filter(pk__in=[t.id for t in tasks], run=2, status="pending").count() == 450


def test_application_settings_validation_errors_render_inline(operator, app):
    url = f"/applications/{app.application.id}/"
    data = {"name": "x", "runner": "nope", "retry_schedule_text": "10,abc",
            "retention_preset": "custom", "retention_custom_hours": "",
            "callback_timeout_seconds": 10,
            "job_timeout_seconds": 600, "task_retries": 0, "queue_threshold_seconds": 300,
            "run_threshold_seconds": 1800, "rate_limit_per_second": 20, "rate_limit_burst": 40,
            "runner_config": "{}"}  # fmt: skip
    response = htmx(operator, url, "post", **data)
    body = response.content.decode()
    assert response.status_code == 200 and "<html" not in body
    assert body.count("field-error") == 3  # runner, schedule, custom hours
    app.application.refresh_from_db()
    assert app.application.runner == "echo"
    data.update(runner="sleep", retry_schedule_text="5,50", retention_preset="72")
    body = htmx(operator, url, "post", **data).content.decode()
    assert "Settings saved (name, runner, retry_schedule, retention_hours)." in body
    # The other panels showing a setting come along out of band, with the new value.
    assert '<div id="retention" hx-swap-oob="true">' in body and "<strong>72 h</strong>" in body
    assert '<div class="cards" id="app-summary" hx-swap-oob="true">' in body
    app.application.refresh_from_db()
    assert (app.application.runner, app.application.retry_schedule,
            app.application.retention_hours) == ("sleep", [5, 50], 72)  # fmt: skip
    entry = AuditEntry.objects.get()
    assert entry.action == "application.update" and entry.target_label == "x"
    assert entry.detail == {"changes": {"name": ["app-echo", "x"],
                                        "runner": ["echo", "sleep"],
                                        "retry_schedule": [[10, 60, 300], [5, 50]],
                                        "retention_hours": [24, 72]}}  # fmt: skip


def test_rotation_shows_the_new_value_once(operator, app):
    response = htmx(operator, f"/applications/{app.application.id}/rotate-secret", "post")
    body = response.content.decode()
    app.application.refresh_from_db()
    assert app.application.webhook_secret in body
    page = operator.get(f"/applications/{app.application.id}/").content.decode()
    assert app.application.webhook_secret not in page and app.api_key not in page
    response = htmx(operator, f"/applications/{app.application.id}/rotate-key", "post")
    assert "thk_" in response.content.decode()


def test_create_application_from_the_dashboard(operator):
    data = {"name": "summariser", "runner": "echo", "retry_schedule_text": "10,60",
            "retention_preset": "168", "callback_timeout_seconds": 5, "job_timeout_seconds": 60,
            "task_retries": 1, "queue_threshold_seconds": 60, "run_threshold_seconds": 120,
            "rate_limit_per_second": 5, "rate_limit_burst": 10, "runner_config": "{}"}  # fmt: skip
    body = htmx(operator, "/applications/", "post", **data).content.decode()
    assert 'id="created-secrets"' in body and "whsec_" in body and "thk_" in body
    from tasks.models import Application

    created = Application.objects.get(name="summariser")
    assert (created.retention_hours, created.task_retries, created.job_timeout_seconds) == (
        168, 1, 60)  # fmt: skip


# --- selectors ------------------------------------------------------------------------------


def test_keyset_pagination_walks_every_row_once(app):
    now = timezone.now()
    created = [make_task(app, created_at=now - timedelta(seconds=i // 3)) for i in range(70)]
    seen, cursor = [], ""
    while True:
        page = task_page(filters=TaskFilters(), cursor=cursor, size=25)
        seen += [row.id for row in page.rows]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert len(seen) == 70 and set(seen) == {t.id for t in created}


def test_search_by_id_prefix_and_user(app):
    task = make_task(app, user="customer_007")
    make_task(app, user="someone")
    prefix = str(task.id)[:8]
    assert [t.id for t in task_page(filters=TaskFilters(q=prefix)).rows] == [task.id]
    assert [t.id for t in task_page(filters=TaskFilters(q=str(task.id))).rows] == [task.id]
    assert [t.id for t in task_page(filters=TaskFilters(q="customer_007")).rows] == [task.id]
    assert uuid_prefix_range("zz") is None


def test_filters_combine(app, make_app):
    other = make_app("echo")
    target = make_task(app, status="failed", callback_status="failed")
    make_task(app, status="failed", callback_status="delivered")
    make_task(other, status="failed", callback_status="failed")
    rows = task_page(filters=TaskFilters(application=str(app.application.id), status="failed",
                                         callback_status="failed")).rows  # fmt: skip
    assert [r.id for r in rows] == [target.id]


def test_stuck_alerts_use_each_applications_thresholds_and_cap_the_count(make_app):
    from tasks.selectors import alerts as selectors

    now = timezone.now()
    strict = make_app("echo", queue_threshold_seconds=60, run_threshold_seconds=60)
    lenient = make_app("echo", queue_threshold_seconds=3600, run_threshold_seconds=3600)
    ten_minutes_ago = now - timedelta(minutes=10)
    Task.objects.bulk_create(
        Task(application=strict.application, inputs={}, status="pending",
             created_at=ten_minutes_ago)
        for _ in range(selectors.ALERT_COUNT_CAP + 5)
    )  # fmt: skip
    make_task(strict, status="running", started_at=now - timedelta(seconds=30))  # within 60 s
    make_task(lenient, status="pending", created_at=ten_minutes_ago)  # within its hour
    make_task(lenient, status="running", started_at=now - timedelta(hours=2))
    make_task(lenient, status="running", started_at=now - timedelta(hours=3))
    found = {(alert.kind, alert.application.pk): alert for alert in selectors.alerts(now=now)
             if alert.application}  # fmt: skip
    assert set(found) == {("stuck_pending", strict.application.pk),
                          ("stuck_running", lenient.application.pk)}  # fmt: skip
    capped = found["stuck_pending", strict.application.pk]
    assert capped.count == selectors.ALERT_COUNT_CAP and capped.message.startswith("100+ task(s)")
    assert found["stuck_running", lenient.application.pk].count == 2


def test_stuck_counts_cover_more_applications_than_one_statement_holds(make_app):
    from tasks import sql
    from tasks.selectors import alerts as selectors

    now = timezone.now()
    stuck = make_app("echo", queue_threshold_seconds=60)
    Task.objects.create(application=stuck.application, inputs={}, status="pending",
                        created_at=now - timedelta(minutes=10))  # fmt: skip
    # More (application, status) pairs than one statement takes (SQLite stops at 500 terms);
    # the application with a stuck task comes last.
    others = [Application(pk=uuid.uuid4(), queue_threshold_seconds=60, run_threshold_seconds=60)
              for _ in range(selectors.STUCK_PARTS_PER_STATEMENT * 2)]  # fmt: skip
    counts = sql.stuck_counts([*others, stuck.application], now=now, cap=100,
                              per_statement=selectors.STUCK_PARTS_PER_STATEMENT)  # fmt: skip
    assert counts == {(str(stuck.application.pk), "stuck_pending"): 1}


def test_overview_counts_and_alerts(viewer, app):
    from tasks.selectors import alerts, overview

    Task.objects.create(application=app.application, inputs={}, status="pending",
                        created_at=timezone.now() - timedelta(minutes=30))  # fmt: skip
    found = {alert.kind for alert in alerts.alerts()}
    assert "stuck_pending" in found  # default queue threshold is 300 s
    task = make_task(app, status="succeeded", finished_at=timezone.now())
    CallbackAttempt.objects.create(task=task, run=1, number=1, trigger="auto",
                                   started_at=timezone.now(), url="http://x", status_code=200,
                                   delivered=True)  # fmt: skip
    data = overview.overview()
    assert data.status_counts["succeeded"] == 1 and data.callback_success_rate == 100.0


# --- back(): only same-host targets ----------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["//evil.example/x", "/\\evil.example/x", "https://evil.example/", "javascript:alert(1)",
     "///evil.example"],
)  # fmt: skip
def test_back_never_follows_another_host(operator, app, target):
    url = f"/applications/{app.application.id}/cleanup"
    own = f"/applications/{app.application.id}/"
    response = operator.post(url, {"next": target})
    assert response.status_code == 302 and response["Location"] == own
    response = htmx(operator, url, "post", next=target)  # answered in place: no redirect at all
    assert response.status_code == 200 and "HX-Redirect" not in response
    assert '<div id="retention"' in response.content.decode()


def test_back_follows_a_path_of_this_site(operator, app):
    url = f"/applications/{app.application.id}/cleanup"
    response = operator.post(url, {"next": "/tasks/?status=failed"})
    assert response["Location"] == "/tasks/?status=failed"
    response = operator.post(url, {"next": "http://testserver/audit/"})  # same host, same scheme
    assert response["Location"] == "http://testserver/audit/"
    response = operator.post(url, {"next": "http://testserver/audit/"}, secure=True)
    assert response["Location"] == f"/applications/{app.application.id}/"  # https -> http: no


# --- revoking and rotating credentials ------------------------------------------------------


def _key(app):
    from tasks.models import ApiKey

    return ApiKey.objects.get(application=app.application)


def test_operator_revokes_a_key_from_the_application_page(operator, app):
    from tasks.credentials import authenticate

    key = _key(app)
    page = operator.get(f"/applications/{app.application.id}/").content.decode()
    url = f"/applications/{app.application.id}/keys/{key.pk}/revoke"
    assert f'action="{url}"' in page and "data-confirm=" in page
    assert authenticate(app.api_key) is not None
    response = operator.post(url)
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None and authenticate(app.api_key) is None
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.target_id, entry.detail["key"]) == (
        "application.revoke_key", str(app.application.id), f"{key.prefix}…")  # fmt: skip
    page = operator.get(f"/applications/{app.application.id}/").content.decode()
    assert f'action="{url}"' not in page and "revoked" in page
    # A key of another application is not found under this one.
    other = Application.objects.create(name="other", runner="echo", webhook_secret="whsec_x")
    assert operator.post(f"/applications/{other.pk}/keys/{key.pk}/revoke").status_code == 404


def test_revoke_is_for_operators_with_csrf_and_post_only(viewer, app):
    key = _key(app)
    url = f"/applications/{app.application.id}/keys/{key.pk}/revoke"
    assert "/revoke" not in viewer.get(f"/applications/{app.application.id}/").content.decode()
    assert viewer.post(url).status_code == 403
    root = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(root)
    assert strict.post(url).status_code == 403
    assert strict.get(url).status_code == 405
    key.refresh_from_db()
    assert key.revoked_at is None and AuditEntry.objects.count() == 0


def test_rotation_grace_period_is_chosen_on_the_page(operator, app):
    from tasks.credentials import authenticate

    base = f"/applications/{app.application.id}"
    page = operator.get(f"{base}/").content.decode()
    assert page.count('name="grace_hours"') == 2 and '<option value="24" selected>' in page
    # None: the old key stops at once.
    body = htmx(operator, f"{base}/rotate-key", "post", grace_hours="0").content.decode()
    assert "stopped working" in body and authenticate(app.api_key) is None
    # 7 days for the secret: the old one keeps signing that long.
    old_secret = app.webhook_secret
    body = htmx(operator, f"{base}/rotate-secret", "post", grace_hours="168").content.decode()
    app.application.refresh_from_db()
    assert app.application.previous_webhook_secret == old_secret and "7 days" in body
    left = app.application.previous_secret_expires_at - timezone.now()
    assert timedelta(days=6, hours=23) < left <= timedelta(days=7)
    body = htmx(operator, f"{base}/rotate-secret", "post", grace_hours="0").content.decode()
    app.application.refresh_from_db()
    assert app.application.previous_webhook_secret == "" and "no longer signs" in body
    assert [e.detail["grace_hours"] for e in AuditEntry.objects.order_by("id")] == [0, 168, 0]
    # Only the offered periods.
    assert htmx(operator, f"{base}/rotate-key", "post", grace_hours="5").status_code == 400


# --- settings form: rate limit 0 --------------------------------------------------------------


def test_settings_form_accepts_an_unlimited_rate_and_bumps_updated_at(operator, app):
    url = f"/applications/{app.application.id}/"
    before = Application.objects.get(pk=app.application.id).updated_at
    data = {"name": "x", "runner": "echo", "retry_schedule_text": "10", "retention_preset": "24",
            "callback_timeout_seconds": 10, "job_timeout_seconds": 600, "task_retries": 0,
            "queue_threshold_seconds": 300, "run_threshold_seconds": 1800,
            "rate_limit_per_second": 0, "rate_limit_burst": 40, "runner_config": "{}",
            "max_concurrency": 0}  # fmt: skip
    body = htmx(operator, url, "post", **data).content.decode()
    assert "Settings saved (" in body, body
    row = Application.objects.get(pk=app.application.id)
    assert (row.rate_limit_per_second, row.max_concurrency) == (0, None)
    assert row.updated_at > before
    body = htmx(operator, url, "post", **(data | {"rate_limit_per_second": -1})).content.decode()
    assert "field-error" in body and "Settings saved" not in body


# --- settings form: the scheduling settings of #19 ---------------------------------------------

FORM_DATA = {"name": "app-echo", "runner": "echo", "retry_schedule_text": "10,60,300",
             "retention_preset": "24", "callback_timeout_seconds": 10,
             "job_timeout_seconds": 600, "task_retries": 0, "queue_threshold_seconds": 300,
             "run_threshold_seconds": 1800, "rate_limit_per_second": 20, "rate_limit_burst": 40,
             "runner_config": "{}"}  # fmt: skip


def test_settings_form_shows_and_saves_the_scheduling_settings(operator, app):
    url = f"/applications/{app.application.id}/"
    page = operator.get(url).content.decode()
    for name in ("default_priority", "max_concurrency_per_key", "max_queue_seconds",
                 "auto_retry", "auto_retry_backoff_seconds"):  # fmt: skip
        assert f'name="{name}"' in page, name
    data = FORM_DATA | {"default_priority": "low", "max_concurrency_per_key": 2,
                        "max_queue_seconds": 90, "auto_retry": 3,
                        "auto_retry_backoff_seconds": 1.5}  # fmt: skip
    body = htmx(operator, url, "post", **data).content.decode()
    assert "Settings saved (" in body, body
    row = Application.objects.get(pk=app.application.id)
    assert (row.default_priority, row.max_concurrency_per_key, row.max_queue_seconds,
            row.auto_retry, row.auto_retry_backoff_seconds) == ("low", 2, 90, 3, 1.5)  # fmt: skip
    entry = AuditEntry.objects.get(action="application.update")
    assert entry.detail["changes"] == {
        "default_priority": ["normal", "low"], "max_concurrency_per_key": [None, 2],
        "max_queue_seconds": [None, 90], "auto_retry": [0, 3],
        "auto_retry_backoff_seconds": [5.0, 1.5],
    }  # fmt: skip
    # 0 and empty clear the cap and the bound, as on the command line.
    htmx(operator, url, "post", **(data | {"max_concurrency_per_key": 0, "max_queue_seconds": ""}))
    row = Application.objects.get(pk=app.application.id)
    assert (row.max_concurrency_per_key, row.max_queue_seconds) == (None, None)
    # Left out of a POST (a page from before them): kept, not cleared or refused.
    Application.objects.filter(pk=row.pk).update(max_concurrency_per_key=4, max_queue_seconds=60)
    body = htmx(operator, url, "post", **(FORM_DATA | {"name": "renamed"})).content.decode()
    assert "Settings saved (name)." in body, body
    row = Application.objects.get(pk=app.application.id)
    assert (row.default_priority, row.max_concurrency_per_key, row.max_queue_seconds,
            row.auto_retry, row.auto_retry_backoff_seconds) == ("low", 4, 60, 3, 1.5)  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [{"default_priority": "urgent"}, {"max_concurrency_per_key": -1},
     {"max_queue_seconds": 604801}, {"auto_retry": 11}, {"auto_retry_backoff_seconds": 3601},
     {"auto_retry_backoff_seconds": -1}],
)  # fmt: skip
def test_settings_form_refuses_bad_scheduling_settings_inline(operator, app, bad):
    url = f"/applications/{app.application.id}/"
    before = Application.objects.values().get(pk=app.application.id)
    body = htmx(operator, url, "post", **(FORM_DATA | bad)).content.decode()
    assert body.count("field-error") == 1 and "Settings saved" not in body
    assert f'id="id_{next(iter(bad))}"' in body
    assert Application.objects.values().get(pk=app.application.id) == before


# --- favicon ------------------------------------------------------------------------------------


def test_favicon_is_linked_and_served_to_anyone(client, viewer):
    response = client.get("/favicon.ico")  # anonymous: browsers ask before any login
    assert response.status_code == 200 and response["Content-Type"] == "image/x-icon"
    icon = b"".join(response.streaming_content)
    assert icon[:4] == b"\x00\x00\x01\x00"  # an ICO header
    html = viewer.get("/").content.decode()
    assert 'rel="icon"' in html and "favicon.svg" in html and "favicon.ico" in html
    assert client.get("/static/favicon.svg").status_code == 200


# --- the version, written once (pyproject.toml) ------------------------------------------------


def test_version_is_pyprojects_everywhere(client):
    """pyproject.toml declares it; the code reads it from the installed package's metadata
    (stale after a version bump until `pip install -e .` runs again, which `make` does)."""
    from tasks.delivery import callbacks

    declared = tomllib.loads((BASE_DIR / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.metadata.version("taskhook") == declared, "reinstall: pip install -e ."
    assert callbacks.USER_AGENT.split("/") == ["Taskhook", declared]
    served = client.get("/api/openapi.json")
    assert served.status_code == 200 and served.json()["info"]["version"] == declared
    document = json.loads((BASE_DIR / "docs" / "openapi.json").read_text(encoding="utf-8"))
    assert document["info"]["version"] == declared, "docs/openapi.json: info.version"
