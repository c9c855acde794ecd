"""Failure triage end to end: every path to a failed run or a given-up callback stores its
group's fingerprint (and a new run or a redelivery clears it), the Failures page counts each
group from the partial indexes, its "show tasks" link lists exactly the group, and acting on a
group retries or redelivers exactly it through a real bulk run, for operators only, audited."""

from __future__ import annotations

import re
import socket
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.utils import timezone

from tasks import services, state, triage
from tasks.delivery import callbacks
from tasks.execution.executor import execute_task
from tasks.models import AuditEntry, BulkOperation, ErrorGroup, Task
from tasks.selectors import failures
from tasks.upkeep import bulk, reconciler
from tests.conftest import Client

pytestmark = pytest.mark.django_db


def timeout_runner(inputs, ctx):
    raise TimeoutError(f"upstream took {inputs['seconds']} s for task {uuid.uuid4()}")


def key_runner(inputs, ctx):
    return {}[inputs["key"]]


@pytest.fixture(autouse=True)
def _fresh_throttle():
    # Each test writes its groups anew (the throttle remembers them for a second per process).
    triage.forget_recorded()
    yield
    triage.forget_recorded()


@pytest.fixture
def operator() -> Client:
    user = User.objects.create_superuser("op", "op@example.com", "pw-op-123")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer() -> Client:
    user = User.objects.create_user("viewer", "v@example.com", "pw-v-123", is_staff=True)
    client = Client()
    client.force_login(user)
    return client


def run_failing(app, inputs: dict, **fields) -> Task:
    task = Task.objects.create(application=app.application, inputs=inputs, **fields)
    assert execute_task(task_id=str(task.id), run=1, worker_name="inline") == "failed"
    return Task.objects.get(pk=task.id)


def finished_with_callback(app, url: str) -> Task:
    return Task.objects.create(application=app.application, inputs={}, callback_url=url,
                               status="succeeded", output={}, finished_at=timezone.now(),
                               callback_status="pending")  # fmt: skip


# --- every path writes the fingerprint -----------------------------------------------------------


def test_a_runner_error_stores_its_group_and_upserts_it(make_app):
    app = make_app("tests.test_failures.timeout_runner")
    a = run_failing(app, {"seconds": 31.2})
    b = run_failing(app, {"seconds": 12.0})
    assert a.error.startswith("TimeoutError: upstream took 31.2 s")
    group = triage.task_error(a.error)
    assert a.error_fingerprint == b.error_fingerprint == group.fingerprint
    stored = ErrorGroup.objects.get(kind="task", fingerprint=group.fingerprint)
    assert stored.label == "TimeoutError: upstream took <n> s for task <id>"
    assert stored.first_seen <= stored.last_seen
    other = run_failing(make_app("tests.test_failures.key_runner"), {"key": "email"})
    assert other.error_fingerprint not in ("", group.fingerprint)
    assert ErrorGroup.objects.count() == 2


def test_the_builtin_fail_runner_an_operator_and_the_reconciler_store_theirs(
    make_app, private_queues
):
    app = make_app("fail")
    failed = run_failing(app, {"message": "model 7 refused"})
    assert failed.error_fingerprint == triage.task_error("model 9 refused").fingerprint
    stuck = Task.objects.create(application=app.application, inputs={})
    assert services.mark_failed(task_id=stuck.id, error="marked failed by an operator")
    stuck.refresh_from_db()
    assert stuck.status == "failed"
    assert stuck.error_fingerprint == triage.task_error(stuck.error).fingerprint
    lost = Task.objects.create(application=app.application, inputs={}, status="running",
                               started_at=timezone.now() - timedelta(hours=2))  # fmt: skip
    reconciler.reconcile()
    lost.refresh_from_db()
    assert lost.status == "failed" and "lost" in lost.error
    assert lost.error_fingerprint == triage.task_error(lost.error).fingerprint
    labels = set(ErrorGroup.objects.filter(kind="task").values_list("label", flat=True))
    assert {"model <n> refused", "marked failed by an operator"} <= labels
    assert ErrorGroup.objects.filter(fingerprint=lost.error_fingerprint).exists()


def test_a_new_run_clears_both_fingerprints(make_app, private_queues):
    app = make_app("fail")
    task = run_failing(app, {})
    Task.objects.filter(pk=task.pk).update(callback_error_fingerprint="00000000000000aa")
    assert services.retry_tasks(task_ids=[task.id]) == [task.id]
    task.refresh_from_db()
    assert (task.status, task.run) == ("pending", 2)
    assert task.error_fingerprint == "" and task.callback_error_fingerprint == ""


def test_a_callback_given_up_on_stores_its_http_status(make_app, receiver, private_queues):
    receiver.default = (503, {}, b"down", 0.0)
    app = make_app("echo", retry_schedule=[])
    task = finished_with_callback(app, receiver.url)
    assert callbacks.deliver(task_id=task.id, run=1, trigger="auto", auto_attempt=1) == "failed"
    task.refresh_from_db()
    assert task.callback_status == "failed"
    group = triage.callback_error(status_code=503)
    assert task.callback_error_fingerprint == group.fingerprint
    stored = ErrorGroup.objects.get(kind="callback", fingerprint=group.fingerprint)
    assert stored.label == "HTTP 503"
    # A redelivery reopens it: the callback leaves its group until it fails again.
    assert callbacks.redeliver(task_ids=[task.id]) == [task.id]
    task.refresh_from_db()
    assert task.callback_status == "pending" and task.callback_error_fingerprint == ""


def test_a_callback_without_a_status_groups_by_its_error(make_app, private_queues):
    app = make_app("echo", retry_schedule=[])
    with socket.socket() as sock:  # a port nothing listens on once closed: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    task = finished_with_callback(app, f"http://127.0.0.1:{port}/hook")
    assert callbacks.deliver(task_id=task.id, run=1, trigger="auto", auto_attempt=1) == "failed"
    task.refresh_from_db()
    attempt = task.callback_attempt_rows.get()
    assert attempt.status_code is None and attempt.error
    group = triage.callback_error(status_code=None, error=attempt.error)
    assert task.callback_error_fingerprint == group.fingerprint
    assert str(port) not in group.label  # the port is masked: every refused port is one group


def test_a_failed_manual_delivery_stores_its_group(make_app, receiver, private_queues):
    receiver.default = (500, {}, b"", 0.0)
    app = make_app("echo", retry_schedule=[])
    task = finished_with_callback(app, receiver.url)
    Task.objects.filter(pk=task.pk).update(callback_status="failed")  # given up before
    assert callbacks.deliver(task_id=task.id, run=1, trigger="manual") == "failed"
    task.refresh_from_db()
    assert task.callback_status == "failed"
    assert task.callback_error_fingerprint == triage.callback_error(status_code=500).fingerprint


def test_a_storm_of_one_error_writes_its_group_once_a_second(make_app):
    app = make_app("fail")
    tasks = [Task.objects.create(application=app.application, inputs={}, status="running")
             for _ in range(20)]  # fmt: skip
    with connection.execute_wrapper(counter := StatementCounter()):
        for task in tasks:
            assert state.fail(task_id=task.id, run=1, error=f"boom {task.id}")
    assert counter.upserts == 1  # the first; the 19 others within the second are skipped
    group = triage.task_error(f"boom {uuid.uuid4()}")
    assert Task.objects.filter(error_fingerprint=group.fingerprint).count() == 20


class StatementCounter:
    def __init__(self) -> None:
        self.upserts = 0

    def __call__(self, execute, sql, params, many, context):
        if ErrorGroup._meta.db_table in sql and sql.lstrip().upper().startswith("INSERT"):
            self.upserts += 1
        return execute(sql, params, many, context)


# --- the page -----------------------------------------------------------------------------------


def make_failed(app, error: str, *, ago: timedelta = timedelta(0), **fields) -> Task:
    task = Task.objects.create(application=app.application, inputs={}, status="running")
    assert state.fail(task_id=task.id, run=1, error=error)
    if ago:
        Task.objects.filter(pk=task.pk).update(finished_at=timezone.now() - ago)
    return Task.objects.get(pk=task.pk)


def test_groups_with_counts_over_the_hour_and_the_day(make_app):
    one, two = make_app("fail"), make_app("echo")
    for seconds in (1, 2):
        make_failed(one, f"TimeoutError: took {seconds} s")
    make_failed(two, "TimeoutError: took 9 s", ago=timedelta(hours=3))
    make_failed(one, "TimeoutError: took 9 s", ago=timedelta(days=3))
    make_failed(one, "KeyError: 'email'")
    page = failures.failure_page(kind="task")
    by_label = {row.group.label: row for row in page.rows}
    assert set(by_label) == {"TimeoutError: took <n> s", "KeyError: 'email'"}
    timeouts = by_label["TimeoutError: took <n> s"]
    assert (timeouts.last_hour, timeouts.last_day, timeouts.total) == (2, 3, 4)
    assert [app.name for app in timeouts.applications] == sorted(
        [one.application.name, two.application.name]
    )
    assert page.rows[0].group.label == "KeyError: 'email'"  # seen last, shown first
    assert failures.failure_page(kind="callback").rows == []


def test_counts_stop_at_the_cap_and_pages_are_keyset(make_app):
    app = make_app("fail")
    for _ in range(5):
        make_failed(app, "ValueError: bad")
    capped = failures.failure_page(kind="task", cap=3).rows[0]
    assert (capped.last_hour, capped.last_day, capped.total, capped.capped) == (3, 3, 5, False)
    now = timezone.now()
    for n in range(5):
        ErrorGroup.objects.create(
            kind="task",
            fingerprint=f"{n:016x}",
            label=f"old {n}",
            first_seen=now,
            last_seen=now - timedelta(minutes=n + 1),
        )
    first = failures.failure_page(kind="task", size=4)
    assert [row.group.label for row in first.rows] == ["ValueError: bad", "old 0", "old 1", "old 2"]
    rest = failures.failure_page(kind="task", size=4, cursor=first.next_cursor or "")
    assert [row.group.label for row in rest.rows] == ["old 3", "old 4"] and not rest.next_cursor


def test_the_page_shows_both_kinds_and_links_to_the_group(
    operator, make_app, receiver, private_queues
):
    app = make_app("fail")
    make_failed(app, "TimeoutError: took 3 s")
    receiver.default = (503, {}, b"", 0.0)
    cb_app = make_app("echo", retry_schedule=[])
    task = finished_with_callback(cb_app, receiver.url)
    callbacks.deliver(task_id=task.id, run=1, trigger="auto", auto_attempt=1)
    html = operator.get("/failures/").content.decode()
    assert "TimeoutError: took &lt;n&gt; s" in html and 'aria-current="page">Failures<' in html
    fingerprint = triage.task_error("TimeoutError: took 3 s").fingerprint
    assert f"/tasks/?error_fingerprint={fingerprint}" in html
    assert f'href="/applications/{app.application.id}/"' in html
    callbacks_html = operator.get("/failures/?kind=callback").content.decode()
    assert "HTTP 503" in callbacks_html
    cb_fingerprint = triage.callback_error(status_code=503).fingerprint
    assert f"/tasks/?callback_error_fingerprint={cb_fingerprint}" in callbacks_html
    partial = operator.get("/failures/?kind=callback", HTTP_HX_REQUEST="true").content.decode()
    assert partial.startswith('<div id="groups"') and "HTTP 503" in partial


def listed_ids(html: str) -> set[str]:
    return set(re.findall(r'name="task" value="([0-9a-f-]{36})"', html))


def test_show_tasks_lists_exactly_the_group(operator, make_app):
    app = make_app("fail")
    ours = {str(make_failed(app, f"TimeoutError: took {n} s").id) for n in range(3)}
    make_failed(app, "KeyError: 'email'")
    retried = make_failed(app, "TimeoutError: took 5 s")
    Task.objects.create(application=app.application, inputs={}, status="succeeded")
    services.retry_tasks(task_ids=[retried.id])  # a new run: out of the group
    fingerprint = triage.task_error("TimeoutError: took 1 s").fingerprint
    html = operator.get(f"/tasks/?error_fingerprint={fingerprint}").content.decode()
    assert listed_ids(html) == ours
    assert f'name="error_fingerprint" value="{fingerprint}"' in html  # kept by bulk and filter
    # Not a fingerprint: ignored (shown as a filter error), not a crash or a scan.
    assert operator.get("/tasks/?error_fingerprint=x' OR 1=1").status_code == 200


def test_retry_all_of_a_group_runs_a_real_bulk_operation(operator, make_app, private_queues):
    app = make_app("fail")
    ours = [make_failed(app, f"TimeoutError: took {n} s") for n in range(3)]
    other = make_failed(app, "KeyError: 'email'")
    fingerprint = ours[0].error_fingerprint
    response = operator.post("/failures/act", {"kind": "task", "fingerprint": fingerprint},
                             HTTP_HX_REQUEST="true")  # fmt: skip
    html = response.content.decode()
    assert response.status_code == 200 and html.startswith('<div id="groups"')
    assert "in the background" in html and 'id="operations" hx-swap-oob="true"' in html
    operation = BulkOperation.objects.get()
    assert operation.kind == "retry" and operation.filters["error_fingerprint"] == fingerprint
    entry = AuditEntry.objects.get(action="failures.retry")
    assert entry.username == "op" and entry.target_id == str(operation.pk)
    assert entry.detail["fingerprint"] == fingerprint
    assert entry.detail["label"] == "TimeoutError: took <n> s"
    done = bulk.run(operation_id=operation.pk)
    assert (done.status, done.affected) == ("done", 3)
    assert {t.run for t in Task.objects.filter(pk__in=[t.id for t in ours])} == {2}
    assert Task.objects.get(pk=other.id).run == 1
    page = failures.failure_page(kind="task")
    assert {row.group.label: row.total for row in page.rows} == {
        "TimeoutError: took <n> s": 0, "KeyError: 'email'": 1}  # fmt: skip


def test_redeliver_all_of_a_callback_group(operator, make_app, receiver, private_queues):
    receiver.default = (503, {}, b"", 0.0)
    app = make_app("echo", retry_schedule=[])
    tasks = [finished_with_callback(app, receiver.url) for _ in range(2)]
    for task in tasks:
        callbacks.deliver(task_id=task.id, run=1, trigger="auto", auto_attempt=1)
    fingerprint = triage.callback_error(status_code=503).fingerprint
    response = operator.post("/failures/act", {"kind": "callback", "fingerprint": fingerprint})
    assert response.status_code == 302
    operation = BulkOperation.objects.get()
    assert operation.kind == "redeliver"
    assert operation.filters["callback_error_fingerprint"] == fingerprint
    assert bulk.run(operation_id=operation.pk).affected == 2
    assert set(Task.objects.values_list("callback_status", flat=True)) == {"pending"}
    assert AuditEntry.objects.filter(action="failures.redeliver").count() == 1


def test_a_viewer_sees_the_page_but_cannot_act(viewer, make_app):
    app = make_app("fail")
    task = make_failed(app, "ValueError: nope")
    html = viewer.get("/failures/").content.decode()
    assert "ValueError: nope" in html and "Retry all" not in html
    response = viewer.post("/failures/act", {"kind": "task", "fingerprint": task.error_fingerprint})
    assert response.status_code == 403
    assert BulkOperation.objects.count() == 0 and AuditEntry.objects.count() == 0


def test_an_operator_without_the_permission_is_a_viewer(make_app):
    user = User.objects.create_user("half", "h@example.com", "pw-h-123", is_staff=True)
    client = Client()
    client.force_login(user)
    app = make_app("fail")
    task = make_failed(app, "ValueError: nope")
    data = {"kind": "task", "fingerprint": task.error_fingerprint}
    assert client.post("/failures/act", data).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="operate"))
    client.force_login(User.objects.get(pk=user.pk))
    assert client.post("/failures/act", data).status_code == 302
    assert BulkOperation.objects.count() == 1


def test_an_unknown_group_is_refused_with_a_message(operator):
    response = operator.post("/failures/act", {"kind": "task", "fingerprint": "0" * 16},
                             HTTP_HX_REQUEST="true")  # fmt: skip
    assert "Unknown error group." in response.content.decode()
    assert BulkOperation.objects.count() == 0


def test_the_task_page_links_its_error_to_its_group(operator, make_app):
    app = make_app("fail")
    task = make_failed(app, "ValueError: nope")
    html = operator.get(f"/tasks/{task.id}/").content.decode()
    assert f"/tasks/?error_fingerprint={task.error_fingerprint}" in html


# --- rows from before triage --------------------------------------------------------------------


def test_the_backfill_fingerprints_old_failures_in_bounded_batches(make_app):
    app = make_app("echo")
    old = timezone.now() - timedelta(hours=5)
    written_before = [
        Task.objects.create(application=app.application, inputs={}, status="failed",
                            error=f"TimeoutError: took {n} s", finished_at=old)
        for n in range(5)
    ]  # fmt: skip
    refused = Task.objects.create(application=app.application, inputs={}, status="succeeded",
                                  finished_at=old, callback_url="http://x.example/h",
                                  callback_status="failed")  # fmt: skip
    refused.callback_attempt_rows.create(
        run=1,
        number=1,
        trigger="auto",
        started_at=old,
        url="http://x.example/h",
        error="timed out after 10 s",
    )
    answered = Task.objects.create(
        application=app.application,
        inputs={},
        status="succeeded",
        finished_at=old,
        callback_url="http://x.example/h",
        callback_status="failed",
        callback_last_status_code=502,
    )
    report = triage.backfill(batch=2, batches=2)  # bounded: 4 tasks of 5 this call
    assert (report.tasks, report.callbacks) == (4, 2)
    assert triage.backfill(batch=2, batches=2).tasks == 1
    assert triage.backfill().tasks == 0
    group = triage.task_error("TimeoutError: took 1 s")
    assert {t.error_fingerprint for t in Task.objects.filter(pk__in=[t.pk for t in written_before])
            } == {group.fingerprint}  # fmt: skip
    stored = ErrorGroup.objects.get(kind="task", fingerprint=group.fingerprint)
    assert stored.first_seen == stored.last_seen == old
    refused.refresh_from_db()
    answered.refresh_from_db()
    assert refused.callback_error_fingerprint == triage.callback_error(
        status_code=None, error="timed out after 3 s").fingerprint  # fmt: skip
    assert answered.callback_error_fingerprint == triage.callback_error(status_code=502).fingerprint
    row = failures.failure_page(kind="task").rows[0]
    assert (row.last_hour, row.last_day, row.total) == (0, 5, 5)


def test_the_overview_failure_count_opens_the_failures_page(operator):
    html = operator.get("/").content.decode()
    assert 'class="card status-failed" href="/failures/"' in html
