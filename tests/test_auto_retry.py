"""Automatic retries of failed runs (tasks.execution.auto_retry): the http runner's retryable
failures against real upstreams, the executor's failure path in process, the submit's `retry`,
the reconciler and a run waiting out its backoff, and whole tasks through a real worker with a
real signed callback."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone
from rq import Queue
from rq.registry import ScheduledJobRegistry
from standardwebhooks import Webhook

from tasks import jobs, state
from tasks.events import catalog
from tasks.events import stream as event_stream
from tasks.execution import auto_retry, runners
from tasks.execution.executor import execute_task
from tasks.execution.runners import RetryableError, RunnerError
from tasks.models import CallbackAttempt, Task, TaskLog, TaskRunHistory
from tasks.plumbing.queueing import redis_client
from tasks.submission import ValidationFailed, parse_submit_body
from tasks.upkeep.reconciler import reconcile
from tests.conftest import Client, api_submit, clean_redis, wait_for

pytestmark = pytest.mark.django_db


def flaky(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Fails retryably in its first `fail_runs` runs, then answers which run it is."""
    if ctx.run <= inputs.get("fail_runs", 0):
        raise RetryableError(f"upstream overloaded (run {ctx.run})")
    return {"run": ctx.run}


@pytest.fixture(autouse=True)
def _clean_redis():
    clean_redis()
    yield
    clean_redis()  # no scheduled retry of a rolled-back task outlives its test


class Caller:
    """What the http runner needs of its caller (as the executor is)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def progress(self, percent: int, message: str | None = None) -> None:
        pass

    def log(self, message: str, level: str = "info") -> None:
        pass

    def emit(self, text: str) -> None:
        pass


def entries(task_id) -> list[event_stream.Event]:
    return [event_stream.decode(e) for e in redis_client().xrange(event_stream.stream_key(task_id))]


def scheduled_retries() -> dict[str, float]:
    registry = ScheduledJobRegistry(queue=Queue(settings.MAINTENANCE_QUEUE,
                                                connection=redis_client()))  # fmt: skip
    return {
        job_id: score
        for job_id, score in redis_client().zrange(registry.key, 0, -1, withscores=True)
        for job_id in [job_id.decode()]
    }


# --- the http runner: which failures are retryable -------------------------------------------


@pytest.mark.parametrize("stream", [False, "sse"], ids=["plain", "streaming"])
@pytest.mark.parametrize(
    ("status", "headers", "hint"),
    [
        (503, {"Retry-After": "7"}, 7.0),
        (500, {}, None),
        (502, {"Retry-After": "soon"}, None),  # an odd header is no hint
        (429, {"Retry-After": "2"}, 2.0),
    ],
)
def test_http_5xx_and_429_are_retryable_with_the_retry_after_hint(
    receiver, stream, status, headers, hint
):
    receiver.default = (status, headers, b"overloaded", 0.0)
    with pytest.raises(RetryableError) as failed:
        runners.http({}, Caller({"url": receiver.url, "stream": stream}))
    assert str(failed.value).startswith(f"upstream answered HTTP {status}: overloaded")
    assert failed.value.retry_after == hint


@pytest.mark.parametrize("stream", [False, "sse"], ids=["plain", "streaming"])
@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_http_4xx_is_a_plain_failure(receiver, stream, status):
    receiver.default = (status, {"Retry-After": "1"}, b"no", 0.0)
    with pytest.raises(RunnerError) as failed:
        runners.http({}, Caller({"url": receiver.url, "stream": stream}))
    assert not isinstance(failed.value, RetryableError)
    assert str(failed.value) == f"upstream answered HTTP {status}: no"


@pytest.mark.parametrize("stream", [False, "sse"], ids=["plain", "streaming"])
def test_http_connection_refused_and_timeout_are_retryable(receiver, stream):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RetryableError, match=r"^upstream request failed"):
        runners.http({}, Caller({"url": f"http://127.0.0.1:{port}/", "stream": stream}))
    receiver.default = (200, {}, b"{}", 2.0)
    with pytest.raises(RetryableError, match=r"^upstream did not answer within 0\.3 s$"):
        runners.http({}, Caller({"url": receiver.url, "stream": stream, "timeout": 0.3}))


def test_http_bad_url_and_invalid_json_are_plain_failures(receiver):
    with pytest.raises(RunnerError) as bad_url:
        runners.http({}, Caller({"url": "http://exa mple.invalid:99999/"}))
    assert not isinstance(bad_url.value, RetryableError)
    receiver.default = (200, {}, b"<html>", 0.0)
    with pytest.raises(RunnerError) as invalid:
        runners.http({}, Caller({"url": receiver.url}))
    assert not isinstance(invalid.value, RetryableError)


# --- the executor's failure path, in process ------------------------------------------------


def run_inline(task: Task) -> str:
    return execute_task(task_id=str(task.id), run=task.run, worker_name="inline")


def test_a_retryable_failure_becomes_the_next_run_after_its_backoff(make_app):
    app = make_app(
        "tests.test_auto_retry.flaky", auto_retry=3, auto_retry_backoff_seconds=30
    ).application
    task = Task.objects.create(application=app, inputs={"fail_runs": 5},
                               callback_url="http://127.0.0.1:9/hook")  # fmt: skip
    failed_at = timezone.now()
    assert run_inline(task) == "retrying"

    task.refresh_from_db()
    assert (task.status, task.run, task.auto_retries) == ("pending", 2, 1)
    assert task.error == "" and task.traceback == "" and task.finished_at is None
    assert task.callback_status == "none" and not CallbackAttempt.objects.exists()
    # Queued after the backoff (30 s plus jitter, on a whole second), bounded by nothing else.
    assert task.queued_at is not None
    assert task.queued_at >= failed_at + timedelta(seconds=30)
    assert task.queued_at <= failed_at + timedelta(seconds=34)
    assert task.start_by is None
    history = TaskRunHistory.objects.get(task=task)
    assert (history.run, history.status, history.retried_automatically) == (1, "failed", True)
    assert history.error == "upstream overloaded (run 1)"
    assert "RetryableError" in history.traceback and "flaky" in history.traceback
    line = TaskLog.objects.get(task=task, run=1, level="warning")
    assert line.message.startswith("automatic retry 1 of 3 in 3")
    assert line.message.endswith(" s: upstream overloaded (run 1)")
    # Run 2's job waits in RQ's scheduled registry until exactly then (it outlives a worker).
    assert scheduled_retries() == {auto_retry.due_job_id(task.id, 2): task.queued_at.timestamp()}
    assert not redis_client().exists(f"rq:job:{task.rq_job_id}")
    # Run 1 ended without a task.finished; its log line is on the stream.
    events = [(e.event, e.run) for e in entries(task.id)]
    assert (catalog.FINISHED, 1) not in events
    assert (catalog.LOG, 1) in events


def test_the_due_job_enqueues_and_announces_the_run(make_app, private_queues):
    app = make_app("tests.test_auto_retry.flaky", auto_retry=1,
                   auto_retry_backoff_seconds=60).application  # fmt: skip
    task = Task.objects.create(application=app, inputs={"fail_runs": 1})
    assert run_inline(task) == "retrying"
    task.refresh_from_db()

    assert jobs.enqueue_due_run(str(task.id), 2) is True
    assert redis_client().hget(f"rq:job:{task.rq_job_id}", "status") == b"queued"
    queued = [e for e in entries(task.id) if e.event == catalog.QUEUED]
    assert [e.run for e in queued] == [2]
    # A second firing (the reconciler came first, a duplicate) changes nothing; a run that
    # moved on or was cancelled is left alone.
    assert jobs.enqueue_due_run(str(task.id), 1) is False
    state.cancel(task_id=task.id)
    assert jobs.enqueue_due_run(str(task.id), 2) is False


def test_a_zero_backoff_enqueues_at_once(make_app, private_queues):
    app = make_app("tests.test_auto_retry.flaky", auto_retry=1,
                   auto_retry_backoff_seconds=0).application  # fmt: skip
    task = Task.objects.create(application=app, inputs={"fail_runs": 1})
    assert run_inline(task) == "retrying"
    task.refresh_from_db()
    assert task.run == 2 and scheduled_retries() == {}
    assert redis_client().hget(f"rq:job:{task.rq_job_id}", "status") == b"queued"
    assert run_inline(task) == "succeeded"
    task.refresh_from_db()
    assert task.output == {"run": 2} and task.auto_retries == 1


@pytest.mark.parametrize(
    ("runner", "fields", "inputs"),
    [
        ("tests.test_auto_retry.flaky", {"auto_retry": 0}, {"fail_runs": 1}),  # off
        ("fail", {"auto_retry": 3}, {"message": "bad input"}),  # not retryable
    ],
    ids=["application-off", "not-retryable"],
)
def test_failures_that_stand(make_app, runner, fields, inputs):
    app = make_app(runner, **fields).application
    task = Task.objects.create(application=app, inputs=inputs)
    assert run_inline(task) == "failed"
    task.refresh_from_db()
    assert (task.status, task.run, task.auto_retries) == ("failed", 1, 0)
    assert not TaskRunHistory.objects.exists() and scheduled_retries() == {}


def test_a_task_that_opted_out_or_used_its_retries_fails(make_app):
    app = make_app("tests.test_auto_retry.flaky", auto_retry=2).application
    opted_out = Task.objects.create(application=app, inputs={"fail_runs": 1}, auto_retry=False)
    exhausted = Task.objects.create(application=app, inputs={"fail_runs": 9}, auto_retries=2)
    assert run_inline(opted_out) == "failed" and run_inline(exhausted) == "failed"
    assert Task.objects.get(pk=exhausted.pk).error == "upstream overloaded (run 1)"


def cancels_then_fails_retryably(inputs: dict[str, Any], ctx: Any) -> None:
    from tasks import services

    services.cancel_task(task_id=ctx.task_id)
    raise RetryableError("upstream down")


def test_a_run_cancelled_while_it_failed_is_not_retried(make_app):
    app = make_app("tests.test_auto_retry.cancels_then_fails_retryably", auto_retry=3)
    task = Task.objects.create(application=app.application)
    assert run_inline(task) == "discarded"
    task.refresh_from_db()
    assert (task.status, task.run) == ("cancelled", 1)
    assert not TaskRunHistory.objects.exists() and scheduled_retries() == {}


def test_start_new_run_of_a_failing_run_is_guarded_by_its_run(make_app):
    app = make_app("echo").application
    task = Task.objects.create(application=app, status="running", run=2,
                               started_at=timezone.now())  # fmt: skip
    due = timezone.now() + timedelta(seconds=5)
    kwargs: dict[str, Any] = {
        "task_id": task.id,
        "expected": ("running",),
        "error": "boom",
        "traceback": "Traceback ...",
        "automatic": True,
        "queued_at": due,
    }
    assert state.start_new_run(expected_run=1, **kwargs) is None  # run 2 is not run 1
    assert state.start_new_run(expected_run=2, **kwargs) == 3
    past = TaskRunHistory.objects.get(task=task)
    assert (past.run, past.status, past.error, past.traceback) == (
        2, "failed", "boom", "Traceback ...")  # fmt: skip
    task.refresh_from_db()
    assert (task.status, task.queued_at, task.auto_retries) == ("pending", due, 1)


# --- the reconciler -------------------------------------------------------------------------


def test_the_reconciler_waits_for_a_retry_to_be_due_then_rescues_it(make_app, private_queues):
    app = make_app("tests.test_auto_retry.flaky", auto_retry=1,
                   auto_retry_backoff_seconds=600).application  # fmt: skip
    task = Task.objects.create(application=app, inputs={"fail_runs": 1},
                               created_at=timezone.now() - timedelta(minutes=5))  # fmt: skip
    assert run_inline(task) == "retrying"
    task.refresh_from_db()
    job_key = f"rq:job:{task.rq_job_id}"

    assert str(task.id) not in reconcile().requeued  # waiting out its backoff: no job yet
    assert not redis_client().exists(job_key)
    # Redis lost the scheduled job, and the run is due: the reconciler enqueues it.
    clean_redis()
    Task.objects.filter(pk=task.id).update(queued_at=timezone.now() - timedelta(minutes=1))
    assert str(task.id) in reconcile().requeued
    assert redis_client().hget(job_key, "status") == b"queued"


# --- the submit's `retry` -------------------------------------------------------------------


def post(app, body: dict, **headers):
    return Client().post(
        f"/api/applications/{app.application.id}/generate",
        data=json.dumps({"inputs": {}, "response_mode": "async", **body}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
        **headers,
    )


@pytest.mark.parametrize("value", ["false", 0, 1, [], {}, "yes"])
def test_retry_must_be_a_boolean(make_app, value):
    app = make_app("echo")
    response = post(app, {"retry": value})
    assert response.status_code == 400
    assert response.json() == {"error": {"code": "invalid_request",
                                         "message": "retry must be true or false.",
                                         "field": "retry"}}  # fmt: skip
    assert not Task.objects.exists()


@pytest.mark.parametrize(("body", "stored"),
                         [({}, True), ({"retry": None}, True), ({"retry": True}, True),
                          ({"retry": False}, False)])  # fmt: skip
def test_retry_is_stored(make_app, body, stored):
    task_id = api_submit(make_app("echo"), {"inputs": {}, "response_mode": "async", **body})
    assert Task.objects.get(pk=task_id).auto_retry is stored


def test_retry_is_in_the_request_hash_only_when_given(make_app):
    def digest(**fields):
        return parse_submit_body({"inputs": {"a": 1}, **fields}).request_hash

    assert digest() == digest(retry=None)  # the hash of requests from before it existed
    assert len({digest(), digest(retry=True), digest(retry=False)}) == 3
    with pytest.raises(ValidationFailed):
        parse_submit_body({"inputs": {}, "retry": "no"})
    app = make_app("echo")
    first = post(app, {"retry": False}, HTTP_IDEMPOTENCY_KEY="k1")
    again = post(app, {"retry": False}, HTTP_IDEMPOTENCY_KEY="k1")
    assert again.json()["task_id"] == first.json()["task_id"]
    conflict = post(app, {}, HTTP_IDEMPOTENCY_KEY="k1")
    assert conflict.status_code == 409 and Task.objects.count() == 1


# --- whole tasks, through a real worker -----------------------------------------------------


def submit_with_callback(app, receiver, inputs: dict, **fields) -> str:
    return api_submit(app, {"inputs": inputs, "response_mode": "async",
                            "callback_url": receiver.url, **fields})  # fmt: skip


def delivered(task_id, timeout: float = 60) -> Task:
    return wait_for(lambda: Task.objects.filter(pk=task_id, callback_status="delivered").first(),
                    timeout=timeout)  # fmt: skip


def verified_callbacks(app, receiver) -> list[dict]:
    """Every callback the receiver got, each signature checked as a receiver checks it."""
    payloads = []
    for request in receiver.received:
        headers = {k.lower(): v for k, v in request.headers.items()}
        expected = hmac.new(app.webhook_secret.encode(), request.body, hashlib.sha256)
        assert hmac.compare_digest(headers["x-dify-signature-v1"], expected.hexdigest())
        payloads.append(Webhook(app.webhook_secret).verify(request.body, headers))
    return payloads


@pytest.mark.django_db(transaction=True)
def test_retried_twice_then_succeeds_at_run_3_with_one_callback(make_app, live_worker, receiver):
    app = make_app("tests.test_auto_retry.flaky", auto_retry=3, auto_retry_backoff_seconds=1)
    task_id = submit_with_callback(app, receiver, {"fail_runs": 2})
    task = delivered(task_id)

    assert (task.status, task.run, task.output, task.auto_retries) == (
        "succeeded", 3, {"run": 3}, 2)  # fmt: skip
    runs = list(TaskRunHistory.objects.filter(task_id=task_id).order_by("run"))
    assert [(r.run, r.status, r.retried_automatically) for r in runs] == [
        (1, "failed", True), (2, "failed", True)]  # fmt: skip
    assert [r.error for r in runs] == ["upstream overloaded (run 1)", "upstream overloaded (run 2)"]
    assert all("RetryableError" in r.traceback for r in runs)
    # The backoff held: 1 s before run 2, 2 s before run 3 (each on a whole second, never less).
    assert runs[1].started_at - runs[0].finished_at >= timedelta(seconds=1)
    assert task.queued_at - runs[1].finished_at >= timedelta(seconds=2)
    assert task.started_at >= task.queued_at
    logs = TaskLog.objects.filter(task_id=task_id, level="warning").order_by("run")
    assert [(line.run, line.message.split(" in ")[0]) for line in logs] == [
        (1, "automatic retry 1 of 3"), (2, "automatic retry 2 of 3")]  # fmt: skip

    # One callback, for the final run, signed; one task.finished, that of run 3.
    [payload] = verified_callbacks(app.application, receiver)
    assert (payload["run"], payload["status"], payload["output"]) == (3, "succeeded", {"run": 3})
    attempts = CallbackAttempt.objects.filter(task_id=task_id)
    assert list(attempts.values_list("run", flat=True)) == [3]
    events = entries(task_id)
    assert [e.run for e in events if e.event == catalog.FINISHED] == [3]
    assert [e.run for e in events if e.event == catalog.QUEUED] == [1, 2, 3]
    assert [e.run for e in events if e.event == catalog.STARTED] == [1, 2, 3]


@pytest.mark.django_db(transaction=True)
def test_retry_false_fails_at_run_1(make_app, live_worker, receiver):
    app = make_app("tests.test_auto_retry.flaky", auto_retry=3, auto_retry_backoff_seconds=0)
    task_id = submit_with_callback(app, receiver, {"fail_runs": 2}, retry=False)
    task = delivered(task_id)
    assert (task.status, task.run, task.error) == ("failed", 1, "upstream overloaded (run 1)")
    assert not TaskRunHistory.objects.filter(task_id=task_id).exists()
    [payload] = verified_callbacks(app.application, receiver)
    assert (payload["run"], payload["status"]) == (1, "failed")


@pytest.mark.django_db(transaction=True)
def test_a_non_retryable_error_is_not_retried(make_app, live_worker, receiver):
    app = make_app("fail", auto_retry=3, auto_retry_backoff_seconds=0)
    task_id = submit_with_callback(app, receiver, {"message": "the prompt is malformed"})
    task = delivered(task_id)
    assert (task.status, task.run, task.error) == ("failed", 1, "the prompt is malformed")
    assert task.auto_retries == 0 and not TaskRunHistory.objects.filter(task_id=task_id).exists()


@pytest.mark.django_db(transaction=True)
def test_auto_retry_exhausted_ends_failed_with_the_last_error(make_app, live_worker, receiver):
    app = make_app("tests.test_auto_retry.flaky", auto_retry=2, auto_retry_backoff_seconds=0.2)
    task_id = submit_with_callback(app, receiver, {"fail_runs": 10})
    task = delivered(task_id)
    assert (task.status, task.run, task.auto_retries) == ("failed", 3, 2)
    assert task.error == "upstream overloaded (run 3)"
    assert TaskRunHistory.objects.filter(task_id=task_id, retried_automatically=True).count() == 2
    [payload] = verified_callbacks(app.application, receiver)
    assert (payload["run"], payload["status"], payload["error"]) == (
        3, "failed", "upstream overloaded (run 3)")  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_the_http_runner_is_retried_after_a_503_and_its_retry_after(
    make_app, live_worker, receiver
):
    upstream = receiver  # the runner's upstream here; these tasks have no callback
    upstream.respond(503, {"Retry-After": "2"}, b"overloaded")
    upstream.default = (200, {"Content-Type": "application/json"}, b'{"answer": 42}', 0.0)
    app = make_app("http", runner_config={"url": upstream.url}, auto_retry=2,
                   auto_retry_backoff_seconds=0.1)  # fmt: skip
    task_id = api_submit(app, {"inputs": {"q": "life"}, "response_mode": "async"})
    task = wait_for(lambda: Task.objects.filter(pk=task_id, status__in=("succeeded", "failed"))
                    .first(), timeout=30)  # fmt: skip
    assert (task.status, task.run, task.output) == ("succeeded", 2, {"answer": 42})
    first = TaskRunHistory.objects.get(task_id=task_id)
    assert first.error == "upstream answered HTTP 503: overloaded" and first.retried_automatically
    # The upstream's Retry-After (2 s), not the 0.1 s backoff, set the wait.
    assert task.started_at - first.finished_at >= timedelta(seconds=2)
    assert [json.loads(r.body) for r in upstream.received] == [{"q": "life"}, {"q": "life"}]


@pytest.mark.django_db(transaction=True)
def test_the_http_runner_is_not_retried_after_a_4xx(make_app, live_worker, receiver):
    upstream = receiver
    upstream.default = (404, {}, b"no such model", 0.0)
    app = make_app("http", runner_config={"url": upstream.url}, auto_retry=2,
                   auto_retry_backoff_seconds=0)  # fmt: skip
    task_id = api_submit(app, {"inputs": {}, "response_mode": "async"})
    task = wait_for(lambda: Task.objects.filter(pk=task_id, status="failed").first(), timeout=30)
    assert (task.run, task.error) == (1, "upstream answered HTTP 404: no such model")
    assert len(upstream.received) == 1


@pytest.mark.django_db(transaction=True)
def test_a_blocking_wait_outlasts_a_retried_run(make_app, live_worker):
    """No wake-up for the retried run: a blocking submit answers with the final run."""
    app = make_app("tests.test_auto_retry.flaky", auto_retry=1, auto_retry_backoff_seconds=0.5,
                   blocking_timeout_seconds=30)  # fmt: skip
    response = Client().post(
        f"/api/applications/{app.application.id}/generate",
        data=json.dumps({"inputs": {"fail_runs": 1}}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["run"], body["output"]) == ("succeeded", 2, {"run": 2})
