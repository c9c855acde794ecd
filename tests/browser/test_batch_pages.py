"""The batch pages in a real browser: a batch run by a real worker, its row on the Batches page
with its counts, a click through to its items, and "Retry failed items" confirmed in the page,
answered in place and run as a real bulk operation."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User

from tasks.models import Batch, Task
from tasks.statuses import UNFINISHED
from tests.browser.conftest import logged_in_page, screenshot
from tests.conftest import Client, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def submit_batch(app, count: int) -> str:
    response = Client().post(
        f"/api/applications/{app.application.id}/batches",
        json.dumps({"items": [{"inputs": {"n": n}} for n in range(count)],
                    "metadata": {"report": "weekly"}}),
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )  # fmt: skip
    assert response.status_code == 200, response.content
    return response.json()["batch_id"]


def settled(batch_id: str) -> bool:
    return not Task.objects.filter(batch_id=batch_id, status__in=UNFINISHED).exists()


def test_a_batch_is_followed_and_its_failed_items_retried(page, make_app):
    mixed = make_app("tests.test_dashboard_batches.every_fourth_fails")
    echo = make_app("echo")
    echo_id = submit_batch(echo, 5)
    batch_id = submit_batch(mixed, 12)
    for each in (echo_id, batch_id):
        wait_for(lambda each=each: settled(each), timeout=30)

    page.goto("/batches/")
    rows = page.locator("#batches tbody tr[data-batch]")
    assert rows.count() == 2
    row = page.locator(f"tr[data-batch='{batch_id}']")
    assert row.locator("[data-count=succeeded]").inner_text() == "9"
    assert row.locator("[data-count=failed]").inner_text() == "3"
    assert row.locator("[data-percent]").inner_text() == "100%"
    screenshot(page, "batches")

    row.locator(f"a[href='/batches/{batch_id}/']").click()
    page.wait_for_selector("#batch-live")
    assert page.locator("#items tbody tr").count() == 12
    page.evaluate("window.__noReload = true")
    page.click("#item-statuses a[data-status=failed]")
    page.wait_for_selector("#item-statuses a[data-status=failed][aria-current=page]")
    assert page.locator("#items tbody tr").count() == 3
    page.click("button:has-text('Retry failed items')")
    page.wait_for_selector("#confirm-dialog[open]:has-text('Retry the 3 failed item(s)')")
    page.click("#confirm-ok")
    page.wait_for_selector("#messages li:has-text('in the background')")
    # The real bulk run retries the three; the worker runs (and fails) them again.
    wait_for(lambda: Task.objects.filter(batch_id=batch_id, run=2).count() == 3, timeout=30)
    wait_for(lambda: settled(batch_id), timeout=30)
    page.wait_for_selector("#operations .operation strong:text-is('done')", timeout=30_000)
    # The operation's end refreshes the items in place: their new runs, failed again.
    page.wait_for_selector("#items tr[data-index='7'] td:nth-child(4):text-is('2')", timeout=30_000)
    page.wait_for_selector("#batch-status:text-is('finished')", timeout=30_000)
    assert page.evaluate("window.__noReload") is True
    assert Batch.objects.get(pk=batch_id).status == "finished"
    assert set(
        Task.objects.filter(batch_id=batch_id, run=2).values_list("batch_index", flat=True)
    ) == {3, 7, 11}
    page.click("#item-statuses a:has-text('all')")
    page.wait_for_selector("#item-statuses a[aria-current=page]:has-text('all')")
    screenshot(page, "batch-detail")


def test_the_batch_pages_run_under_the_strict_csp(browser, live_server, live_worker, make_app):
    User.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    context, page, errors = logged_in_page(browser, live_server.url, bypass_csp=False)
    violations: list[str] = []
    page.on("console", lambda msg: "Content Security Policy" in msg.text and violations.append(
        msg.text))  # fmt: skip
    batch_id = submit_batch(make_app("echo"), 3)
    wait_for(lambda: settled(batch_id), timeout=30)
    for path in ("/batches/", f"/batches/{batch_id}/"):
        response = page.goto(path)
        assert "script-src 'self'" in response.headers["content-security-policy"]
    page.evaluate("window.__noReload = true")
    page.click("#item-statuses a[data-status=succeeded]")
    page.wait_for_selector("#item-statuses a[data-status=succeeded][aria-current=page]")
    assert page.evaluate("window.__noReload") is True
    context.close()
    assert not violations, violations
    assert not errors, errors
