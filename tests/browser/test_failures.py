"""The Failures page in a real browser: failures of two kinds run by a real worker, grouped with
their counts, a click through to exactly the group's tasks, and retry all of a group confirmed
in the page and answered in place."""

from __future__ import annotations

import pytest

from tasks.models import Task
from tests.browser.conftest import screenshot, submit
from tests.conftest import wait_for, wait_for_status

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_two_groups_click_through_and_retry_all(page, make_app):
    timeouts = make_app("tests.test_failures.timeout_runner")
    keys = make_app("tests.test_failures.key_runner")
    timeout_ids = [submit(timeouts, {"seconds": seconds}) for seconds in (31.2, 12.0)]
    key_id = submit(keys, {"key": "email"})
    for task_id in (*timeout_ids, key_id):
        wait_for_status(task_id, ("failed",))

    page.goto("/failures/")
    rows = page.locator("#groups tbody tr[data-group]")
    assert rows.count() == 2
    timeout_row = page.locator("tr[data-group]:has-text('TimeoutError')")
    assert "TimeoutError: upstream took <n> s for task <id>" in timeout_row.inner_text()
    assert timeout_row.locator("[data-count=hour]").inner_text() == "2"
    assert timeout_row.locator("[data-count=day]").inner_text() == "2"
    assert " UTC" in timeout_row.locator("td").nth(4).inner_text()  # first seen, with its zone
    assert timeout_row.locator(f"a:has-text('{timeouts.application.name}')").count() == 1
    key_row = page.locator("tr[data-group]:has-text('KeyError')")
    assert key_row.locator("[data-count=hour]").inner_text() == "1"
    screenshot(page, "failures")

    timeout_row.locator("a.show-tasks").click()
    page.wait_for_selector("#group-filter")
    listed = page.locator("#results input[name=task]")
    assert sorted(listed.evaluate_all("els => els.map(e => e.value)")) == sorted(timeout_ids)

    page.goto("/failures/")
    page.evaluate("window.__noReload = true")
    page.locator("tr[data-group]:has-text('TimeoutError') button:has-text('Retry all')").click()
    page.wait_for_selector("#confirm-dialog[open]")
    page.click("#confirm-ok")
    page.wait_for_selector("#messages li:has-text('in the background')")
    assert page.evaluate("window.__noReload") is True
    # The real bulk run retries exactly the group; the worker runs (and fails) them again.
    wait_for(lambda: set(Task.objects.filter(pk__in=timeout_ids).values_list("run", flat=True))
             == {2}, timeout=30)  # fmt: skip
    assert Task.objects.get(pk=key_id).run == 1
    page.wait_for_selector("#operations .operation:has-text('done')", timeout=30_000)
