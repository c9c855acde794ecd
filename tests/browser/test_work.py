"""The Work page in a real browser: tabs switch in place, rows are selected, a discard asks in
the page's dialog and answers in place, the rows change without a reload."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from tasks.models import Task
from tests.browser.conftest import logged_in_page, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_tabs_select_and_discard_in_place(page, make_app):
    app = make_app("echo").application
    now = timezone.now()
    # Pending in the database only (no job): they wait, the live worker never sees them.
    queued = [
        Task.objects.create(application=app, inputs={"i": i}, created_at=now - timedelta(seconds=i))
        for i in range(3)
    ]
    retrying = Task.objects.create(
        application=app,
        inputs={},
        status="succeeded",
        finished_at=now,
        callback_url="http://127.0.0.1:9/h",
        callback_status="delivering",
        callback_attempts=1,
        callback_next_attempt_at=now + timedelta(minutes=10),
    )
    page.goto("/work/")
    page.evaluate("window.__noReload = true")
    page.wait_for_selector("#tab-queued[aria-current=page]")
    assert page.locator("#work-rows tbody tr[data-task]").count() == 3
    assert "3" in page.locator("#tab-queued .count").inner_text()

    page.click("#tab-scheduled")
    page.wait_for_selector("#tab-scheduled[aria-current=page]")
    row = page.locator(f"tr[data-task='{retrying.id}']")
    assert "in 9 min" in row.inner_text() or "in 10 min" in row.inner_text()
    assert "state=scheduled" in page.url

    page.click("#tab-queued")
    page.wait_for_selector("#tab-queued[aria-current=page]")
    page.check(f"input[value='{queued[1].id}']")
    page.check(f"input[value='{queued[2].id}']")
    screenshot(page, "work")
    page.click("#discard-selected")
    page.wait_for_selector("#confirm-dialog[open]")
    page.click("#confirm-ok")
    page.wait_for_selector("#messages li:has-text('Discard: 2 of 2 selected discarded.')")
    page.wait_for_function(
        "document.querySelectorAll('#work-rows tbody tr[data-task]').length === 1"
    )
    assert page.locator(f"tr[data-task='{queued[0].id}']").count() == 1
    assert "1" in page.locator("#tab-queued .count").inner_text()
    assert [t.status for t in Task.objects.filter(pk__in=[queued[1].id, queued[2].id])] == [
        "cancelled", "cancelled"]  # fmt: skip
    assert Task.objects.get(pk=queued[0].id).status == "pending"
    assert page.evaluate("window.__noReload") is True


def test_work_tabs_run_under_the_strict_csp(browser, live_server, live_worker):
    User.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    context, page, errors = logged_in_page(browser, live_server.url, bypass_csp=False)
    violations: list[str] = []
    page.on("console", lambda msg: "Content Security Policy" in msg.text and violations.append(
        msg.text))  # fmt: skip
    page.goto("/work/")
    page.evaluate("window.__noReload = true")
    for name in ("scheduled", "deferred", "running", "failed", "callbacks", "given_up"):
        page.click(f"#tab-{name}")
        page.wait_for_selector(f"#tab-{name}[aria-current=page]")
    assert page.evaluate("window.__noReload") is True and "state=given_up" in page.url
    context.close()
    assert not violations, violations
    assert not errors, errors
