"""The Work page: one tab per state of work, keyset-paged in its order, and its actions (run
now, deliver now, retry, redeliver, discard, delete) on selected rows and on all rows of a tab
through a real bulk run; RQ's rate-limited lines and scheduled registry read from real Redis;
run now / deliver now carried out by a real worker to a real receiver."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rq.job import Job
from rq.registry import ScheduledJobRegistry

from tasks import jobs
from tasks.delivery import callbacks
from tasks.models import (
    AttemptTrigger,
    AuditEntry,
    BulkOperation,
    CallbackAttempt,
    ErrorGroup,
    Task,
    TaskLog,
)
from tasks.plumbing.queueing import queue, redis_client, task_job_id
from tasks.selectors import work
from tasks.selectors.task_lists import TaskFilters
from tasks.submission import enqueue_pending_task
from tests.conftest import Client, wait_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def app(make_app):
    return make_app("echo")


def make_task(app, **fields) -> Task:
    return Task.objects.create(application=app.application, inputs={"a": 1}, **fields)


def htmx_get(client: Client, url: str):
    return client.get(url, HTTP_HX_REQUEST="true")


def act(client: Client, state: str, action: str, tasks=(), **extra):
    data = {"state": state, "act": action, "task": [str(t.id) for t in tasks], **extra}
    return client.post("/work/act", data, HTTP_HX_REQUEST="true")


def page_ids(tab: str, cursor: str = "", size: int = 25, **filters):
    page = work.work_page(tab=work.TABS[tab], filters=TaskFilters(**filters), cursor=cursor,
                          size=size)  # fmt: skip
    return [t.id for t in page.rows], page.next_cursor


# --- tabs: the right tasks, in the right order, keyset-paged -----------------------------------


def test_each_database_tab_lists_its_tasks_in_order_with_keyset_paging(app, make_app):
    now = timezone.now()
    other = make_app("sleep")
    pending = [make_task(app, created_at=now - timedelta(minutes=i)) for i in range(30)]
    make_task(other, created_at=now)  # another application's
    running = [make_task(app, status="running", started_at=now - timedelta(seconds=i),
                         created_at=now - timedelta(hours=1 + i)) for i in range(3)]  # fmt: skip
    failed = [make_task(app, status="failed", finished_at=now, created_at=now - timedelta(days=i))
              for i in range(2)]  # fmt: skip
    retrying = [make_task(app, status="succeeded", finished_at=now, callback_url="http://x/h",
                          callback_status="delivering", callback_attempts=1,
                          callback_next_attempt_at=now + timedelta(minutes=m))
                for m in (30, 5, 60)]  # fmt: skip
    waiting = make_task(app, status="succeeded", finished_at=now, callback_url="http://x/h",
                        callback_status="pending")  # fmt: skip
    given_up = make_task(app, status="failed", finished_at=now, callback_url="http://x/h",
                         callback_status="failed")  # fmt: skip

    app_id = str(app.application.id)
    first, cursor = page_ids("queued", application=app_id)
    assert first == [t.id for t in pending[:25]] and cursor
    rest, end = page_ids("queued", cursor=cursor, application=app_id)
    assert rest == [t.id for t in pending[25:]] and end is None
    assert len(page_ids("queued", size=50)[0]) == 31  # all applications
    assert page_ids("running")[0] == [t.id for t in running]  # latest started first
    assert page_ids("failed")[0] == [given_up.id] + [t.id for t in failed]  # newest first
    soonest = sorted(retrying, key=lambda t: t.callback_next_attempt_at)
    assert page_ids("scheduled")[0] == [t.id for t in soonest]
    first, cursor = page_ids("scheduled", size=2)
    assert first == [t.id for t in soonest[:2]]
    assert page_ids("scheduled", cursor=cursor, size=2) == ([soonest[2].id], None)
    assert set(page_ids("callbacks")[0]) == {waiting.id, *(t.id for t in retrying)}
    assert page_ids("given_up")[0] == [given_up.id]
    counts = work.counts(TaskFilters(application=app_id))
    assert counts["queued"] == 30 and counts["running"] == 3 and counts["scheduled"] == 3
    assert counts["given_up"] == 1 and counts["callbacks"] == 4


def test_the_page_has_a_tab_per_state_and_pages_by_cursor(operator, app):
    now = timezone.now()
    tasks = [make_task(app, created_at=now - timedelta(seconds=i)) for i in range(27)]
    soon = make_task(app, status="succeeded", finished_at=now, callback_url="http://x/h",
                     callback_status="delivering",
                     callback_next_attempt_at=now + timedelta(minutes=3))  # fmt: skip
    page = operator.get("/work/?size=25")
    html = page.content.decode()
    assert page.status_code == 200 and "<h1>Work</h1>" in html
    for name in work.TABS:  # a link and an htmx request, pushed to the history
        assert f'href="?state={name}"' in html and f'hx-get="?state={name}"' in html
    assert 'hx-push-url="true"' in html and 'aria-current="page">Queued' in html
    assert "data-poll data-poll-unless-checked" in html and "bulk-done from:body" in html
    assert f"{str(tasks[0].id)[:8]}" in html and f"{str(tasks[26].id)[:8]}" not in html
    partial = htmx_get(operator, "/work/?state=queued&size=25")
    body = partial.content.decode()
    assert body.startswith('<div id="results"') and "<h1>" not in body
    cursor = body.split("cursor=")[1].split('"')[0].replace("&amp;", "&")
    older = htmx_get(operator, f"/work/?state=queued&size=25&cursor={cursor}").content.decode()
    assert str(tasks[26].id)[:8] in older and str(tasks[0].id)[:8] not in older
    scheduled = htmx_get(operator, "/work/?state=scheduled").content.decode()
    assert str(soon.id)[:8] in scheduled and ("in 2 min" in scheduled or "in 3 min" in scheduled)
    assert "Deliver now selected" in scheduled and "data-confirm" in scheduled


def test_viewer_sees_the_page_without_actions_and_gets_403_on_them(viewer, app):
    task = make_task(app)
    html = viewer.get("/work/").content.decode()
    assert str(task.id)[:8] in html and 'id="bulk-form"' not in html
    for action in ("discard:selected", "discard:matching"):
        assert act(viewer, "queued", action, [task]).status_code == 403
    assert Task.objects.get(pk=task.id).status == "pending"
    assert not AuditEntry.objects.exists() and not BulkOperation.objects.exists()


def test_an_action_a_tab_does_not_offer_is_refused(operator, app):
    task = make_task(app, status="failed", finished_at=timezone.now())
    assert act(operator, "queued", "delete:selected", [task]).status_code == 400
    assert act(operator, "failed", "bogus:selected", [task]).status_code == 400
    assert Task.objects.filter(pk=task.id).exists() and not AuditEntry.objects.exists()


# --- actions on selected rows ---------------------------------------------------------------------


def test_discard_selected_cancels_queued_tasks_in_place_and_is_audited(operator, app):
    keep, drop = make_task(app), make_task(app)
    response = act(operator, "queued", "discard:selected", [drop])
    html = response.content.decode()
    assert response.status_code == 200 and html.startswith('<div id="results"')
    assert 'id="operations" hx-swap-oob="true"' in html and 'id="messages"' in html
    assert "Discard: 1 of 1 selected discarded." in html
    assert str(keep.id)[:8] in html and str(drop.id)[:8] not in html  # the rows after the change
    assert Task.objects.get(pk=drop.id).status == "cancelled"
    assert Task.objects.get(pk=keep.id).status == "pending"
    entry = AuditEntry.objects.get()
    assert entry.action == "work.discard.selected" and entry.detail["done"] == [str(drop.id)]
    assert entry.target_label == "Queued"


def test_discard_gives_up_a_waiting_callback_with_a_recorded_reason(operator, app):
    retrying = make_task(app, status="succeeded", finished_at=timezone.now(),
                         callback_url="http://x/h", callback_status="delivering",
                         callback_attempts=1,
                         callback_next_attempt_at=timezone.now() + timedelta(hours=1))  # fmt: skip
    in_flight = make_task(app, status="succeeded", finished_at=timezone.now(),
                          callback_url="http://x/h", callback_status="delivering")  # fmt: skip
    html = act(operator, "callbacks", "discard:selected", [retrying, in_flight]).content.decode()
    assert "Discard: 1 of 2 selected discarded." in html
    retrying.refresh_from_db()
    assert retrying.callback_status == "failed" and retrying.callback_next_attempt_at is None
    group = ErrorGroup.objects.get(fingerprint=retrying.callback_error_fingerprint)
    assert group.label == "given up by an operator"
    assert Task.objects.get(pk=in_flight.id).callback_status == "delivering"  # its attempt decides
    assert Task.objects.get(pk=retrying.id).status == "succeeded"  # the record stays


def test_delete_removes_finished_tasks_with_their_rows_and_refuses_unfinished(operator, app):
    done = make_task(app, status="failed", finished_at=timezone.now())
    TaskLog.objects.create(task=done, message="x")
    CallbackAttempt.objects.create(task=done, run=1, number=1, trigger="auto",
                                   started_at=timezone.now(), url="http://x/h")  # fmt: skip
    pending = make_task(app)
    html = act(operator, "failed", "delete:selected", [done, pending]).content.decode()
    assert "Delete: 1 of 2 selected deleted. 1 refused: unfinished" in html
    assert not Task.objects.filter(pk=done.id).exists()
    assert not TaskLog.objects.filter(task_id=done.id).exists()
    assert not CallbackAttempt.objects.filter(task_id=done.id).exists()
    assert Task.objects.filter(pk=pending.id, status="pending").exists()


def test_retry_and_redeliver_selected(operator, app, settings, private_queues):
    failed = make_task(app, status="failed", finished_at=timezone.now())
    given_up = make_task(app, status="succeeded", finished_at=timezone.now(),
                         callback_url="http://127.0.0.1:9/h", callback_status="failed")  # fmt: skip
    assert "Retry: 1 of 1" in act(operator, "failed", "retry:selected", [failed]).content.decode()
    assert Task.objects.get(pk=failed.id).run == 2
    html = act(operator, "given_up", "redeliver:selected", [given_up]).content.decode()
    assert "Redeliver: 1 of 1" in html
    assert Task.objects.get(pk=given_up.id).callback_status == "pending"
    assert [e.action for e in AuditEntry.objects.order_by("id")] == [
        "work.retry.selected", "work.redeliver.selected"]  # fmt: skip


# --- RQ's own waiting work: deferred (the cap) and scheduled (infrastructure retries) ------------


@pytest.fixture
def capped(make_app, private_queues):
    """An application with a concurrency cap of 1 and three runs enqueued: one queued, two held."""
    created = make_app("echo", max_concurrency=1)
    tasks = []
    for i in range(3):
        created_at = timezone.now() - timedelta(seconds=10 - i)
        task = Task.objects.create(
            application=created.application, inputs={}, created_at=created_at
        )
        assert enqueue_pending_task(task=task)
        tasks.append(task)
    return created, tasks


def held(created) -> list:
    """The runs the application's cap holds, as the Deferred tab lists them (Redis is shared by
    the session: other tests' applications have lines of their own)."""
    filters = TaskFilters(application=str(created.application.id))
    return [row.task.id for row in work.work_page(tab=work.TABS["deferred"], filters=filters).jobs]


def test_deferred_lists_runs_held_by_the_cap_in_promotion_order(operator, capped):
    created, tasks = capped
    app_only = TaskFilters(application=str(created.application.id))
    page = work.work_page(tab=work.TABS["deferred"], filters=app_only)
    # RQ promotes the lowest score (held since, in whole seconds), then the lowest job id.
    line = work.rate_limited_key(work.rate_limit_key(created.application.id))
    order = [work.task_of_job(j.decode())[0] for j in redis_client().zrange(line, 0, -1)]
    assert sorted(order) == sorted([tasks[1].id, tasks[2].id])
    assert [row.task.id for row in page.jobs] == order
    assert {(row.cap, row.holding) for row in page.jobs} == {(1, 1)}
    first = work.deferred_page(filters=TaskFilters(application=str(created.application.id)),
                               size=1)  # fmt: skip
    assert [r.task.id for r in first.jobs] == order[:1] and first.next_cursor
    second = work.deferred_page(filters=app_only, cursor=first.next_cursor, size=1)
    assert [r.task.id for r in second.jobs] == order[1:] and second.next_cursor is None
    assert work.counts(app_only)["deferred"] == 2
    url = f"/work/?state=deferred&application={created.application.id}"
    html = htmx_get(operator, url).content.decode()
    assert "1 of 1 slots taken" in html and task_job_id(tasks[2].id, 1) in html


def test_run_now_moves_a_held_run_to_the_head_of_its_line_and_says_the_cap_holds(operator, capped):
    created, _ = capped
    first, last = held(created)
    html = act(operator, "deferred", "run_now:selected", [Task(id=last)]).content.decode()
    assert "Run now: 1 of 1 selected moved to the front. 1 still wait for a free slot" in html
    assert held(created) == [last, first]
    job = Job.fetch(task_job_id(last, 1), connection=redis_client())
    assert job.enqueue_at_front and job.get_status() == "rate_limited"
    # The running slot frees: the run moved to the head is the one promoted, at the front.
    from rq.rate_limit import RateLimitRegistry

    registry = RateLimitRegistry(work.rate_limit_key(created.application.id), redis_client())
    running = redis_client().zrange(work.allowed_key(registry.key), 0, -1)[0].decode()
    assert registry.release_and_enqueue(running) == [job.id]
    assert queue(job.origin).get_job_ids()[0] == job.id


def test_discard_drops_a_held_run_from_the_line(operator, capped):
    created, tasks = capped
    act(operator, "deferred", "discard:selected", [tasks[1]])
    assert Task.objects.get(pk=tasks[1].id).status == "cancelled"
    assert held(created) == [tasks[2].id]


def test_scheduled_shows_rq_infrastructure_retries_and_run_now_queues_them_first(
    operator, app, settings, private_queues
):
    task, other = make_task(app), make_task(app)
    enqueue_pending_task(task=other)  # a run queued already
    job_id = task_job_id(task.id, 1)
    task_queue = queue(settings.TASK_QUEUE)
    task_queue.enqueue_at(timezone.now() + timedelta(hours=1), "tasks.jobs.run_task",
                          args=(str(task.id), 1), job_id=job_id)  # fmt: skip
    html = htmx_get(operator, "/work/?state=scheduled").content.decode()
    assert "Task runs RQ will retry" in html and job_id in html and "in 59 min" in html
    html = act(operator, "scheduled", "run_now:selected", [task]).content.decode()
    assert "Run now: 1 of 1 selected moved to the front." in html
    assert task_queue.get_job_ids()[0] == job_id
    assert job_id not in ScheduledJobRegistry(queue=task_queue).get_job_ids()


def test_deliver_now_recreates_a_schedule_lost_with_redis(operator, app, settings, private_queues):
    now = timezone.now()
    task = make_task(app, status="succeeded", finished_at=now, callback_url="http://127.0.0.1:9/h",
                     callback_status="delivering", callback_attempts=1,
                     callback_next_attempt_at=now + timedelta(hours=1))  # fmt: skip
    CallbackAttempt.objects.create(task=task, run=1, number=1, trigger="auto", started_at=now,
                                   url=task.callback_url)  # fmt: skip
    html = act(operator, "scheduled", "deliver_now:selected", [task]).content.decode()
    assert "Deliver now: 1 of 1 selected attempted now." in html
    assert queue(settings.CALLBACK_QUEUE).get_job_ids() == [f"cb-{task.id}-1-a2"]


# --- all matching, through a real bulk run -----------------------------------------------------


def test_all_matching_runs_in_the_background_per_tab(operator, app, make_app):
    other = make_app("sleep")
    queued = [make_task(app) for _ in range(5)]
    foreign = make_task(other)
    failed = [make_task(app, status="failed", finished_at=timezone.now()) for _ in range(4)]
    html = act(operator, "queued", "discard:matching",
               application=str(app.application.id)).content.decode()  # fmt: skip
    assert "every row of “Queued”, in the background" in html and 'id="operation-' in html
    operation = BulkOperation.objects.get()
    assert operation.kind == "discard" and operation.filters["work_tab"] == "queued"
    assert jobs.run_bulk_operation(operation.id) == 5
    operation.refresh_from_db()
    assert (operation.status, operation.processed, operation.affected) == ("done", 5, 5)
    assert Task.objects.filter(pk__in=[t.id for t in queued], status="cancelled").count() == 5
    assert Task.objects.get(pk=foreign.id).status == "pending"  # the filter held
    act(operator, "failed", "delete:matching")
    delete = BulkOperation.objects.get(kind="delete")
    assert jobs.run_bulk_operation(delete.id) == 4
    assert not Task.objects.filter(pk__in=[t.id for t in failed]).exists()
    assert Task.objects.filter(pk__in=[t.id for t in queued]).count() == 5  # cancelled stay
    assert [e.action for e in AuditEntry.objects.order_by("id")] == [
        "work.discard.matching", "work.delete.matching"]  # fmt: skip


def test_all_matching_on_redis_tabs(operator, capped):
    created, tasks = capped
    act(operator, "deferred", "discard:matching", application=str(created.application.id))
    assert jobs.run_bulk_operation(BulkOperation.objects.get().id) == 2
    assert [t.status for t in Task.objects.filter(pk__in=[t.id for t in tasks[1:]])] == [
        "cancelled", "cancelled"]  # fmt: skip
    assert held(created) == []
    assert Task.objects.get(pk=tasks[0].id).status == "pending"  # it was not waiting on the cap


# --- a real worker: run now and deliver now ----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_run_now_and_deliver_now_with_a_real_worker(live_worker, operator, make_app, receiver,
                                                   settings):  # fmt: skip
    app = make_app("echo", retry_schedule=[3600, 3600])
    task = make_task(app)
    job_id = task_job_id(task.id, 1)
    queue(settings.TASK_QUEUE).enqueue_at(timezone.now() + timedelta(hours=1),
                                          "tasks.jobs.run_task", args=(str(task.id), 1),
                                          job_id=job_id)  # fmt: skip
    act(operator, "scheduled", "run_now:selected", [task])
    wait_for(lambda: Task.objects.filter(pk=task.id, status="succeeded").exists())

    # A callback that failed once and waits an hour for its retry: delivered now instead.
    receiver.respond(500)
    Task.objects.filter(pk=task.id).update(callback_url=receiver.url, callback_status="pending")
    assert callbacks.schedule_first_delivery(task_id=task.id)
    retrying = wait_for(lambda: Task.objects.filter(
        pk=task.id, callback_next_attempt_at__isnull=False).first())  # fmt: skip
    assert retrying.callback_attempts == 1 and len(receiver.received) == 1
    html = act(operator, "scheduled", "deliver_now:selected", [task]).content.decode()
    assert "Deliver now: 1 of 1 selected attempted now." in html
    delivered = wait_for(
        lambda: Task.objects.filter(pk=task.id, callback_status="delivered").first()
    )
    assert delivered.callback_attempts == 2 and delivered.callback_next_attempt_at is None
    assert len(receiver.received) == 2
    attempts = CallbackAttempt.objects.filter(task=task).order_by("number")
    assert [(a.number, a.trigger, a.delivered) for a in attempts] == [
        (1, AttemptTrigger.AUTO, False), (2, AttemptTrigger.AUTO, True)]  # fmt: skip
    assert [e.action for e in AuditEntry.objects.order_by("id")] == [
        "work.run_now.selected", "work.deliver_now.selected"]  # fmt: skip
