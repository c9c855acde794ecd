"""The audit log: labels, old -> new changes, commands as actors, and the page's filters."""

from __future__ import annotations

import json
import re
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from dashboard.ui.audit_log import detail_fields
from tasks import audit
from tasks.models import Application, AuditEntry, BulkOperation, Task
from tests.conftest import Client

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator() -> tuple[Client, User]:
    user = User.objects.create_user("operator", password="pw-operator-123", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="operate"))
    client = Client()
    client.force_login(user)
    return client, user


def test_record_fills_the_target_label_from_the_target(make_app):
    app = make_app("echo")
    task = Task.objects.create(application=app.application, inputs={})
    operation = BulkOperation.objects.create(kind="retry", created_by="x")
    by_type = {
        "application": (app.application.pk, app.application.name),
        "task": (task.pk, f"{app.application.name} · {str(task.pk)[:8]}"),
        "bulk": (operation.pk, f"Retry all matching #{operation.pk}"),
        "queue": ("tasks", "tasks"),
    }
    for target_type, (target_id, label) in by_type.items():
        entry = audit.record(user=None, action="x", target_type=target_type, target_id=target_id)
        assert entry.target_label == label, target_type
    # Unknown or malformed ids: no label, no error.
    missing = "6b3c4f0e-0000-0000-0000-000000000000"
    for target_type, target_id in (("task", "nope"), ("application", missing)):
        entry = audit.record(user=None, action="x", target_type=target_type, target_id=target_id)
        assert entry.target_label == ""
    # A label given is kept, and outlives its target.
    entry = audit.record(user=None, action="x", target_type="application",
                         target_id=app.application.pk, target_label="Named")  # fmt: skip
    app.application.delete()
    entry.refresh_from_db()
    assert entry.target_label == "Named"


def test_changes_keeps_only_what_changed_as_json():
    from datetime import UTC, datetime

    when = datetime(2026, 12, 2, tzinfo=UTC)
    assert audit.changes({"a": 1, "b": [1, 2], "c": None}, {"a": 1, "b": [1, 3], "c": when}) == {
        "b": [[1, 2], [1, 3]], "c": [None, "2026-12-02 00:00:00+00:00"]}  # fmt: skip
    assert audit.changes({"a": 1}, {"a": 1}) == {}


def test_every_changing_command_is_audited_with_its_name_as_the_actor(make_app):
    out = StringIO()
    call_command("createapplication", "from-cli", "--runner", "echo", "--json", stdout=out)
    app_id = json.loads(out.getvalue())["app_id"]
    call_command("setapplication", app_id, "--retention-hours", "72", "--task-retries", "2",
                 stdout=StringIO())  # fmt: skip
    call_command("setapplication", app_id, stdout=StringIO())  # nothing changed: no entry
    call_command("rotatekey", app_id, "--grace-hours", "0", stdout=StringIO(), stderr=StringIO())
    call_command("rotatesecret", app_id, "--grace-hours", "1", stdout=StringIO(),
                 stderr=StringIO())  # fmt: skip
    call_command("revokekey", "--app", app_id, stdout=StringIO(), stderr=StringIO())
    call_command("cleanup_tasks", "--app", app_id, "--dry-run", stdout=StringIO())  # no entry
    call_command("cleanup_tasks", "--app", app_id, stdout=StringIO())
    entries = list(AuditEntry.objects.order_by("id"))
    assert [(e.username, e.action) for e in entries] == [
        ("command:createapplication", "application.create"),
        ("command:setapplication", "application.update"),
        ("command:rotatekey", "application.rotate_key"),
        ("command:rotatesecret", "application.rotate_secret"),
        ("command:revokekey", "application.revoke_key"),  # the key rotatekey issued
        ("command:revokekey", "application.revoke_key"),  # and the one it replaced
        ("command:cleanup_tasks", "retention.cleanup"),
    ]
    assert all(e.user is None and e.target_type == "application" and e.target_id == app_id
               and e.target_label == "from-cli" for e in entries)  # fmt: skip
    assert entries[1].detail == {"changes": {"retention_hours": [24, 72], "task_retries": [0, 2]}}
    # Never a secret in the log.
    application = Application.objects.get(pk=app_id)
    assert application.webhook_secret not in json.dumps([e.detail for e in entries])


def test_the_page_filters_by_actor_action_and_target_with_keyset_pages(viewer, make_app):
    app = make_app("echo")
    for n in range(130):
        audit.record(user=None, username="alice" if n % 2 else "bob", action=f"a.{n % 3}",
                     target_type="application", target_id=app.application.pk)  # fmt: skip
    audit.record(user=None, username="carol", action="task.retry", target_type="task",
                 target_id="00000000-0000-0000-0000-000000000001")  # fmt: skip
    page = viewer.get("/audit/?actor=alice").content.decode()
    assert page.count('data-entry="') == 65
    page = viewer.get("/audit/?action=a.0").content.decode()
    assert page.count('data-entry="') == 44
    first = viewer.get("/audit/").content.decode()
    assert first.count('data-entry="') == 100
    older = re.search(r'href="\?before=(\d+)"', first).group(1)
    second = viewer.get(f"/audit/?before={older}").content.decode()
    assert second.count('data-entry="') == 31
    assert not set(re.findall(r'data-entry="(\d+)"', first)) & set(
        re.findall(r'data-entry="(\d+)"', second))  # fmt: skip
    filtered = viewer.get("/audit/?actor=bob&action=a.1").content.decode()
    older_link = re.search(r'href="\?([^"]*before=\d+)"', filtered)
    assert older_link is None  # 22 entries: one page
    target = viewer.get("/audit/?target_type=task&target_id=00000000-0000-0000-0000-000000000001")
    assert target.content.decode().count('data-entry="') == 1
    assert "carol" in target.content.decode()


def test_targets_are_named_and_linked_and_old_rows_are_labelled_in_one_query(viewer, make_app):
    app = make_app("echo")
    tasks = [Task.objects.create(application=app.application, inputs={}) for _ in range(30)]
    for task in tasks:  # rows written before labels existed
        AuditEntry.objects.create(username="old", action="task.retry", target_type="task",
                                  target_id=str(task.pk))  # fmt: skip
    with CaptureQueriesContext(connection) as queries:
        html = viewer.get("/audit/").content.decode()
    label_queries = [q for q in queries.captured_queries if "tasks_task" in q["sql"]]
    assert len(label_queries) == 1, label_queries
    assert (
        f'<a href="/tasks/{tasks[0].pk}/">{app.application.name} · {str(tasks[0].pk)[:8]}</a>'
        in html
    )
    audit.record(user=None, action="application.update", target_type="application",
                 target_id=app.application.pk,
                 detail={"changes": {"retention_hours": [24, 72]}})  # fmt: skip
    html = viewer.get("/audit/?action=application.update").content.decode()
    assert f'<a href="/applications/{app.application.pk}/">{app.application.name}</a>' in html
    assert (
        "<td>retention_hours</td><td><code>24</code></td><td>→</td><td><code>72</code></td>" in html
    )


def test_details_render_as_fields_for_every_shape():
    ids = [f"00000000-0000-0000-0000-{n:012d}" for n in range(25)]
    changes, fields = detail_fields({"changes": {"name": ["a", "b"]}, "done": ids,
                                     "changed": ["runner"], "kind": "stuck", "n": 3,
                                     "filters": {"status": "failed"}})  # fmt: skip
    assert changes == [("name", "a", "b")]
    by_name = {field.name: field for field in fields}
    assert by_name["done"].task_ids == ids[:20] and by_name["done"].more == 5
    assert by_name["changed fields"].value == "runner"
    assert by_name["kind"].value == "stuck" and not by_name["kind"].structured
    assert by_name["filters"].structured


def test_a_dashboard_settings_change_is_audited_old_to_new(operator, make_app):
    client, user = operator
    app = make_app("echo")
    data = {"name": app.application.name, "runner": "echo", "retry_schedule_text": "10,60,300",
            "retention_preset": "168", "callback_timeout_seconds": 10, "job_timeout_seconds": 600,
            "task_retries": 0, "queue_threshold_seconds": 300, "run_threshold_seconds": 1800,
            "rate_limit_per_second": 20, "rate_limit_burst": 40, "runner_config": "{}"}  # fmt: skip
    client.post(f"/applications/{app.application.pk}/", data, HTTP_HX_REQUEST="true")
    entry = AuditEntry.objects.get(action="application.update")
    assert entry.user == user and entry.username == "operator"
    assert entry.detail == {"changes": {"retention_hours": [24, 168]}}
