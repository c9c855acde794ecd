"""Control: pausing queues for every worker (real Redis, real RQ workers), stopping workers
warmly and at once, the Workers page and its access rules, and the RQ pages inside Taskhook."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from rq import Queue
from rq.job import Job

from tasks.execution import pausing
from tasks.execution.worker import TaskhookWorker
from tasks.models import AuditEntry, PausedQueue, Task, TaskStatus
from tasks.plumbing.queueing import redis_client
from tasks.selectors.alerts import alerts
from tasks.upkeep.maintenance import sample_stats_job
from tasks.upkeep.reconciler import reconcile
from tests.conftest import (
    Client,
    WorkerProcess,
    api_submit,
    wait_for,
    wait_for_exit,
    wait_for_status,
)


@pytest.fixture
def viewer(db) -> Client:
    user = User.objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def operator(db) -> Client:
    user = User.objects.create_user("operator", password="pw-operator-123", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="operate"))
    client = Client()
    client.force_login(user)
    return client


# The stop tests' worker has a Redis database of its own (see own_worker).
OWN_REDIS_DB = int(os.environ.get("TEST_CONTROL_REDIS_DB", "15"))


def htmx_post(client: Client, url: str, **data):
    return client.post(url, data, HTTP_HX_REQUEST="true")


def paused_copy() -> set[str]:
    return {m.decode() for m in redis_client().smembers(pausing.PAUSED_KEY)} - {pausing.SENTINEL}


@pytest.fixture
def no_pauses():
    yield
    PausedQueue.objects.all().delete()
    redis_client().delete(pausing.PAUSED_KEY)


# --- the rule ------------------------------------------------------------------------------


def test_pause_and_resume_keep_the_table_and_the_copy_equal(db, no_pauses):
    assert pausing.pause_queue(name=settings.TASK_QUEUE, username="op") is True
    assert pausing.pause_queue(name=settings.TASK_QUEUE, username="op") is False  # already
    assert set(pausing.paused_queues()) == {settings.TASK_QUEUE} == paused_copy()
    assert pausing.paused_queues()[settings.TASK_QUEUE].paused_by == "op"
    assert pausing.resume_queue(name=settings.TASK_QUEUE, username="op") is True
    assert pausing.resume_queue(name=settings.TASK_QUEUE, username="op") is False
    assert pausing.paused_queues() == {} and paused_copy() == set()


def test_the_maintenance_queue_and_unknown_queues_cannot_be_paused(db, no_pauses):
    for name in (settings.MAINTENANCE_QUEUE, "nope"):
        with pytest.raises(pausing.PauseRefused):
            pausing.pause_queue(name=name, username="op")
    assert not PausedQueue.objects.exists()


def test_a_pause_survives_a_flush_rebuilt_by_the_cron_job_or_a_worker(db, no_pauses):
    pausing.pause_queue(name=settings.CALLBACK_QUEUE, username="op")
    client = redis_client()
    client.flushdb()
    assert paused_copy() == set()
    sample_stats_job()  # the cron job every 10 s
    assert paused_copy() == {settings.CALLBACK_QUEUE}
    client.flushdb()
    # A worker that finds the copy gone (no sentinel) rebuilds it from the table at once.
    assert pausing.paused_names(client) == {settings.CALLBACK_QUEUE}
    assert client.sismember(pausing.PAUSED_KEY, pausing.SENTINEL)
    # The copy is there but says nothing is paused: that is what the worker believes.
    pausing.resume_queue(name=settings.CALLBACK_QUEUE, username="op")
    assert pausing.paused_names(client) == set()


def test_a_long_pause_raises_an_alert(db, no_pauses, settings):
    settings.QUEUE_PAUSE_ALERT_SECONDS = 600
    pausing.pause_queue(name=settings.TASK_QUEUE, username="op")
    assert not [a for a in alerts() if a.kind == "queue_paused"]
    PausedQueue.objects.update(paused_at=timezone.now() - timedelta(seconds=700))
    (alert,) = [a for a in alerts() if a.kind == "queue_paused"]
    assert settings.TASK_QUEUE in alert.message and "op" in alert.message


# --- a worker in this process: skipping, putting back, idling ------------------------------


def test_a_job_popped_from_a_queue_paused_a_moment_before_goes_back_to_the_front(
    transactional_db, private_queues, no_pauses
):
    """The worker's copy is fresh (says nothing is paused) when it blocks on the queue; the
    pause comes, then a job: the pop returns it, the worker puts it back and idles until the
    resume, then takes it."""
    client = redis_client()
    queue = Queue(settings.TASK_QUEUE, connection=client)
    worker = TaskhookWorker([queue], connection=client, name=f"inproc-{time.time_ns()}")
    worker._paused_queues()  # read now: nothing paused
    seen: dict[str, object] = {}

    def operator() -> None:
        time.sleep(1.2)  # the worker's copy is older than a second when the job arrives
        pausing.pause_queue(name=settings.TASK_QUEUE, username="op")
        queue.enqueue("tasks.runners_for_tests_do_not_exist", job_id="put-back-job")
        time.sleep(1.5)
        seen["queued while paused"] = client.lrange(queue.key, 0, -1)
        pausing.resume_queue(name=settings.TASK_QUEUE, username="op")

    thread = threading.Thread(target=operator)
    thread.start()
    started = time.monotonic()
    job, popped_from = worker.dequeue_job_and_maintain_ttl(5)
    thread.join()
    assert job.id == "put-back-job" and popped_from.name == settings.TASK_QUEUE
    assert seen["queued while paused"] == [b"put-back-job"]  # back on the queue, not lost
    assert time.monotonic() - started >= 2.7  # taken only after the resume
    # A worker of one queue moves what it pops to RQ's intermediate list (and clears it as the
    # job starts): the put-back took its entry away, only the last pop's is left.
    assert client.lrange(queue.intermediate_queue_key, 0, -1) == [b"put-back-job"]
    client.delete(worker.key, queue.intermediate_queue_key, job.key)


def test_a_worker_skips_a_paused_queue_and_takes_the_others(db, private_queues, no_pauses):
    client = redis_client()
    tasks_q = Queue(settings.TASK_QUEUE, connection=client)
    callbacks_q = Queue(settings.CALLBACK_QUEUE, connection=client)
    worker = TaskhookWorker([tasks_q, callbacks_q], connection=client, name=f"w-{time.time_ns()}")
    pausing.pause_queue(name=settings.TASK_QUEUE, username="op")
    tasks_q.enqueue("tasks.nothing", job_id="on-paused")
    callbacks_q.enqueue("tasks.nothing", job_id="on-running")
    job, _ = worker.dequeue_job_and_maintain_ttl(5)
    assert job.id == "on-running"
    assert client.lrange(tasks_q.key, 0, -1) == [b"on-paused"]
    # Only one queue left to read: RQ must still BLPOP (no job left in an intermediate list).
    assert client.llen(callbacks_q.intermediate_queue_key) == 0
    client.delete(worker.key, job.key, Job.key_for("on-paused"))


# --- real worker processes -----------------------------------------------------------------


def test_a_running_worker_takes_nothing_from_a_paused_queue_until_resumed(
    live_worker, make_app, operator, no_pauses
):
    app = make_app("echo")
    response = htmx_post(operator, "/queues/pause", queue=settings.TASK_QUEUE, action="pause")
    assert response.status_code == 200
    assert "paused" in response.content.decode()
    task_id = api_submit(app, {"inputs": {"n": 1}, "response_mode": "async"})
    time.sleep(3)  # the worker would have run it within milliseconds
    assert Task.objects.get(pk=task_id).status == TaskStatus.PENDING
    queued = redis_client().lrange(Queue(settings.TASK_QUEUE, connection=redis_client()).key,
                                   0, -1)  # fmt: skip
    assert f"task-{task_id}-1".encode() in queued
    # A Redis flush loses the copy: the pause still holds (the worker rebuilds it).
    redis_client().delete(pausing.PAUSED_KEY)
    time.sleep(2)
    assert Task.objects.get(pk=task_id).status == TaskStatus.PENDING
    # It still runs the maintenance queue, and the page shows the task queue paused.
    page = operator.get("/workers/").content.decode()
    assert live_worker.name in page and ">paused</span>" in page
    htmx_post(operator, "/queues/pause", queue=settings.TASK_QUEUE, action="resume")
    assert wait_for_status(task_id, (TaskStatus.SUCCEEDED,), timeout=10)
    actions = list(
        AuditEntry.objects.filter(target_type="queue")
        .order_by("pk")
        .values_list("action", "target_id")
    )
    assert actions == [("queue.pause", settings.TASK_QUEUE), ("queue.resume", settings.TASK_QUEUE)]


def _with_db(url: str, db: int) -> str:
    if url.startswith("unix:"):
        base, _, query = url.partition("?")
        return f"{base}?{urlencode({**dict(parse_qsl(query)), 'db': str(db)})}"
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@pytest.fixture
def own_worker(transactional_db, settings):
    """A worker of our own that the test may stop, on a Redis database of its own on the same
    server (the session's shared worker cannot take its jobs); this process follows it there.
    RQ's commands reach it all the same: Redis pub/sub spans databases."""
    db = OWN_REDIS_DB if settings.REDIS_DB != OWN_REDIS_DB else OWN_REDIS_DB - 1
    settings.REDIS_URL = _with_db(settings.REDIS_URL, db)
    settings.RQ_QUEUES = {name: {"URL": settings.REDIS_URL} for name in settings.RQ_QUEUES}
    redis_client.cache_clear()
    process = WorkerProcess((settings.TASK_QUEUE,), name=f"control-{time.time_ns()}")
    try:
        wait_for(lambda: redis_client().exists(f"taskhook:alive:{process.name}"), timeout=30)
        yield process
    finally:
        process.stop()
        Queue(settings.TASK_QUEUE, connection=redis_client()).empty()
        redis_client.cache_clear()


def test_stopping_a_worker_warmly_lets_its_task_finish(own_worker, make_app, operator):
    app = make_app("sleep")
    task_id = api_submit(app, {"inputs": {"seconds": 3}, "response_mode": "async"})
    wait_for_status(task_id, (TaskStatus.RUNNING,), timeout=20)
    page = operator.get("/workers/").content.decode()
    assert f'href="/tasks/{task_id}/"' in page  # the current task, linked
    response = htmx_post(operator, "/workers/stop", worker=own_worker.name, mode="warm")
    assert (
        response.status_code == 200 and "stops after its current job" in response.content.decode()
    )
    wait_for(lambda: own_worker.process.poll() is not None, timeout=20)
    task = Task.objects.get(pk=task_id)
    assert task.status == TaskStatus.SUCCEEDED, own_worker.output()[-2000:]
    entry = AuditEntry.objects.get(target_type="worker")
    assert (entry.action, entry.target_id, entry.username) == (
        "worker.stop",
        own_worker.name,
        "operator",
    )


def test_stopping_a_worker_at_once_leaves_its_task_to_the_reconciler(
    own_worker, make_app, operator
):
    app = make_app("sleep")  # task_retries=0: the lost run fails
    task_id = api_submit(app, {"inputs": {"seconds": 60}, "response_mode": "async"})
    wait_for_status(task_id, (TaskStatus.RUNNING,), timeout=20)
    stopped_at = time.monotonic()
    response = htmx_post(operator, "/workers/stop", worker=own_worker.name, mode="now")
    assert response.status_code == 200
    # Past STOP_NOW_REPORT_SECONDS the worker logs every thread's stack: shown on a failure.
    assert wait_for_exit(own_worker.process, 10) is not None, own_worker.output()[-6000:]
    assert time.monotonic() - stopped_at < 10  # not the 60 s the task would take
    assert Task.objects.get(pk=task_id).status == TaskStatus.RUNNING  # interrupted, not ended
    time.sleep(5.5)  # the reconciler's grace after a task starts
    report = reconcile()
    assert task_id in report.lost, own_worker.output()[-2000:]
    task = Task.objects.get(pk=task_id)
    assert task.status == TaskStatus.FAILED and "worker lost" in task.error
    assert AuditEntry.objects.filter(action="worker.stop_now", target_id=own_worker.name).exists()


# --- access, answers, pages ------------------------------------------------------------------


def test_viewers_see_the_page_but_get_403_on_actions(viewer, no_pauses):
    page = viewer.get("/workers/")
    assert page.status_code == 200 and 'data-action="pause"' not in page.content.decode()
    assert viewer.post("/queues/pause", {"queue": "tasks", "action": "pause"}).status_code == 403
    assert viewer.post("/workers/stop", {"worker": "w", "mode": "warm"}).status_code == 403
    assert not PausedQueue.objects.exists() and not AuditEntry.objects.exists()


def test_operator_pause_answers_in_place_and_without_js_redirects(operator, no_pauses):
    page = operator.get("/workers/").content.decode()
    assert 'data-confirm="Pause queue tasks and its other priority lanes?' in page
    assert "not pausable" in page  # maintenance
    response = htmx_post(operator, "/queues/pause", queue="tasks", action="pause",
                         next="/workers/")  # fmt: skip
    body = response.content.decode()
    assert body.lstrip().startswith('<div class="panel" id="queues-panel"')
    assert 'id="messages"' in body and "Queue tasks paused" in body and ">paused</span>" in body
    overview = operator.get("/").content.decode()
    assert 'data-action="resume"' in overview and ">paused</span>" in overview
    plain = operator.post("/queues/pause", {"queue": "tasks", "action": "resume", "next": "/"})
    assert plain.status_code == 302 and plain["Location"] == "/"
    assert (
        operator.post("/queues/pause", {"queue": "maintenance", "action": "pause"}).status_code
        == 400
    )
    assert list(AuditEntry.objects.order_by("pk").values_list("action", flat=True)) == [
        "queue.pause",
        "queue.resume",
    ]


def test_stopping_an_unknown_worker_is_a_404(operator):
    response = operator.post("/workers/stop", {"worker": "no-such-worker", "mode": "warm"})
    assert response.status_code == 404 and not AuditEntry.objects.exists()


def test_rq_pages_open_under_taskhooks_header_with_a_way_back(viewer, operator):
    for client in (viewer, operator):
        html = client.get("/django-rq/").content.decode()
        assert 'id="back-to-dashboard" href="/"' in html
        assert 'href="/workers/"' in html and 'aria-current="page">RQ queues' in html
        assert "taskhook-admin.css" in html
    assert viewer.get("/django-rq/queues/0/").status_code == 200
    assert "back-to-dashboard" in viewer.get("/django-rq/queues/0/").content.decode()
    assert Client().get("/static/taskhook-admin.css").status_code == 200
    assert Client().get("/favicon.ico").status_code == 200
