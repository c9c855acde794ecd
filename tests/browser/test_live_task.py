"""The live task page in a real browser: against the web process as deployed (the ASGI event
stream) the page follows the task's events without a reload and without its poll, under the
strict CSP; against Django's WSGI live_server (the stream answers 501) the poll takes over."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User

from tasks.models import Task
from tasks.statuses import FINISHED
from tests.browser.conftest import logged_in_page, screenshot, submit
from tests.conftest import wait_for_status

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

RUNNER = "tests.browser.test_live_task.live_runner"
GATE = "test-live-task-gate:"
GATE_SECONDS = 60
LOG_LINE = "warming up the model"
PIECES = ("Once upon ", "a time, ", "a browser ", "listened.")
STREAMED = "".join(PIECES)
PROGRESS, PROGRESS_MESSAGE = 40, "drafting the story"
UNAVAILABLE = re.compile(r"live updates unavailable")


def live_runner(inputs, ctx):
    """Waits for the test's "start" gate (so the page is open before anything happens), logs a
    line, streams the pieces, reports progress with a message, then waits for "finish"."""
    # redis-py's default socket timeout (5 s) would end the wait before BLPOP's own timeout.
    gates = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=GATE_SECONDS + 10)

    def wait(gate: str) -> None:
        if gates.blpop([f"{GATE}{ctx.task_id}:{gate}"], timeout=GATE_SECONDS) is None:
            raise RuntimeError(f"the test never opened the {gate} gate")

    wait("start")
    ctx.log(LOG_LINE)
    for piece in PIECES:
        ctx.emit(piece)
    ctx.progress(PROGRESS, PROGRESS_MESSAGE)
    wait("finish")
    return {"story": STREAMED}


class Gates:
    """The runner's gates (Redis lists it BLPOPs), opened by the test."""

    def __init__(self) -> None:
        self.client = redis.Redis.from_url(settings.REDIS_URL)
        self.tasks: set[str] = set()

    def open(self, task_id: str, name: str) -> None:
        self.client.rpush(f"{GATE}{task_id}:{name}", "go")

    def open_all(self) -> None:
        for task_id in self.tasks:
            for name in ("start", "finish"):
                key = f"{GATE}{task_id}:{name}"
                self.client.rpush(key, "go")
                self.client.expire(key, GATE_SECONDS)  # a gate the runner never reached
            wait_for_status(task_id, FINISHED, timeout=30)


@pytest.fixture
def gates(live_worker) -> Iterator[Gates]:
    """At teardown every gate is opened and the tasks finished, so a failed test does not hold
    the session's worker."""
    gates = Gates()
    yield gates
    gates.open_all()


def running_task(make_app, gates: Gates) -> str:
    """A task of live_runner, running and held at its "start" gate."""
    task_id = submit(make_app(RUNNER), {"story": "short"})
    gates.tasks.add(task_id)
    wait_for_status(task_id, ("running",))
    return task_id


def test_the_page_follows_the_stream_without_reload_or_poll(browser, served_web, make_app, gates):
    from playwright.sync_api import expect

    User.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    task_id = running_task(make_app, gates)
    # The page runs under its real CSP: expect() and evaluate() only, no wait_for_function.
    context, page, errors = logged_in_page(browser, served_web.url, bypass_csp=False)
    problems: list[str] = []
    page.on("console", lambda msg: (msg.type == "error" or "Content Security Policy" in msg.text)
            and problems.append(f"{msg.type}: {msg.text}"))  # fmt: skip
    requests = []
    page.on("request", lambda request: requests.append(request))
    page_url = f"{served_web.url}/tasks/{task_id}/"

    response = page.goto(f"/tasks/{task_id}/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert LOG_LINE not in response.text() and PIECES[0] not in response.text()
    expect(page.locator("#task-status")).to_have_text("running")
    expect(page.locator("#task-stream-state")).to_have_text("live")
    page.evaluate("window.__noReload = true")

    gates.open(task_id, "start")
    expect(page.locator("#task-streamed")).to_have_text(STREAMED)
    expect(page.locator("#task-log")).to_contain_text(f"[info] (run 1) {LOG_LINE}")
    expect(page.locator("#task-progress")).to_have_js_property("value", PROGRESS)
    expect(page.locator("#task-progress-text")).to_have_text(f"{PROGRESS}%")
    expect(page.locator("#task-progress-message")).to_have_text(PROGRESS_MESSAGE)
    expect(page.locator("#task-stream-state")).to_have_text("live")
    screenshot(page, "task-live")
    # The section's poll keeps ticking (htmx:beforeRequest) while the stream is open: after two
    # ticks at least one whole poll interval has passed, and no tick may have been a request.
    page.evaluate("""() => {
        let ticks = 0;
        document.addEventListener("htmx:beforeRequest", (event) => {
            if (event.detail.elt.id === "task-live") document.body.dataset.pollTicks = ++ticks;
        });
    }""")
    expect(page.locator("body")).to_have_attribute("data-poll-ticks", "2", timeout=10_000)
    to_page = [r for r in requests if r.url == page_url]
    assert [r.is_navigation_request() for r in to_page] == [True], "one load, no poll"
    events_url = f"{served_web.url}/api/tasks/{task_id}/events?token="
    streams = [r for r in requests if r.url.startswith(events_url)]
    assert [r.resource_type for r in streams] == ["eventsource"]
    assert page.evaluate("window.__noReload") is True

    # task.finished closes the stream and fetches the section once: the result, and no poll.
    gates.open(task_id, "finish")
    expect(page.locator("#task-status")).to_have_text("succeeded", timeout=15_000)
    expect(page.locator("#task-output")).to_contain_text(f'"story": "{STREAMED}"')
    expect(page.locator("#task-streamed")).to_have_text(STREAMED)
    expect(page.locator("#task-stream-state")).to_have_count(0)
    expect(page.locator("#task-live[hx-get]")).to_have_count(0)
    fetched = [r for r in requests if r.url == page_url and not r.is_navigation_request()]
    assert [r.headers.get("hx-request") for r in fetched] == ["true"]
    assert len(streams) == 1 and page.evaluate("window.__noReload") is True
    assert Task.objects.get(pk=task_id).streamed_output == STREAMED
    context.close()
    assert not problems, problems
    assert not errors, errors


def test_without_the_stream_the_poll_takes_over(page, make_app, gates):
    from playwright.sync_api import expect

    task_id = running_task(make_app, gates)
    stream_statuses: list[int] = []
    page.on("response", lambda r: "/events?token=" in r.url and stream_statuses.append(r.status))
    page.goto(f"/tasks/{task_id}/")
    expect(page.locator("#task-stream-state")).to_have_text(UNAVAILABLE)
    assert stream_statuses == [501]  # live_server is WSGI: no event stream there
    page.evaluate("window.__noReload = true")

    gates.open(task_id, "start")
    # Only the poll can bring these: the stream never opened.
    expect(page.locator("#task-progress-text")).to_have_text(f"{PROGRESS}%", timeout=10_000)
    expect(page.locator("#task-progress")).to_have_js_property("value", PROGRESS)
    expect(page.locator("#task-log")).to_contain_text(f"[info] (run 1) {LOG_LINE}")

    gates.open(task_id, "finish")
    expect(page.locator("#task-status")).to_have_text("succeeded", timeout=10_000)
    expect(page.locator("#task-output")).to_contain_text(f'"story": "{STREAMED}"')
    expect(page.locator("#task-streamed")).to_have_text(STREAMED)
    assert page.evaluate("window.__noReload") is True
    # A failed stream is not reopened on every poll (each render carries a fresh token).
    assert stream_statuses == [501]


def test_the_unavailable_note_outlasts_the_polls_swap(page, make_app, gates):
    from playwright.sync_api import expect

    task_id = running_task(make_app, gates)
    page.goto(f"/tasks/{task_id}/")
    expect(page.locator("#task-stream-state")).to_have_text(UNAVAILABLE)
    page.evaluate("document.getElementById('task-live').dataset.before = 'poll'")
    expect(page.locator("#task-live:not([data-before])")).to_have_count(1, timeout=10_000)
    expect(page.locator("#task-stream-state")).to_have_text(UNAVAILABLE)


def test_a_reconnect_keeps_the_streamed_output_and_the_log(browser, served_web, make_app, gates):
    from playwright.sync_api import expect

    User.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    task_id = running_task(make_app, gates)
    context, page, _ = logged_in_page(browser, served_web.url, bypass_csp=True)
    page.goto(f"/tasks/{task_id}/")
    gates.open(task_id, "start")
    expect(page.locator("#task-streamed")).to_have_text(STREAMED)
    expect(page.locator("#task-log")).to_contain_text(LOG_LINE)

    # The connection drops; EventSource opens the stream again, resuming after the last event.
    with page.expect_request(lambda r: "/events?token=" in r.url, timeout=30_000) as again:
        served_web.kill_workers()
    assert again.value.all_headers()["last-event-id"]
    expect(page.locator("#task-stream-state")).to_have_text("live", timeout=30_000)
    try:
        expect(page.locator("#task-streamed")).to_have_text(STREAMED)
        expect(page.locator("#task-log")).to_contain_text(LOG_LINE)
    finally:
        context.close()
