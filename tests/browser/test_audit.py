"""The audit log in a real browser: an action taken on one page, read on the Audit page."""

from __future__ import annotations

import pytest

from tests.browser.conftest import screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_settings_change_reads_old_to_new_with_its_target_linked(page, make_app):
    app = make_app("echo")
    page.goto(f"/applications/{app.application.id}/")
    page.select_option("#id_retention_preset", "168")
    page.click("button:has-text('Save settings')")
    page.wait_for_selector("#messages li:has-text('Settings saved (retention_hours)')")
    page.goto("/audit/")
    page.evaluate("window.__noReload = true")
    page.fill("input[name=action]", "application.update")
    page.click("#audit-filters button:has-text('Filter')")
    page.wait_for_selector("#entries tbody tr >> nth=0")
    assert page.locator("#entries tbody tr[data-entry]").count() == 1
    row = page.locator("#entries tbody tr[data-entry]")
    assert "ops" in row.inner_text()
    assert row.locator("table.changes td").all_inner_texts()[:4] == ["retention_hours", "24", "→",
                                                                     "168"]  # fmt: skip
    assert " UTC" in row.locator("td").first.inner_text()
    assert "action=application.update" in page.url  # the filter is in the address
    assert page.evaluate("window.__noReload") is True
    screenshot(page, "audit")
    row.locator(f"a[href='/applications/{app.application.id}/']").click()
    page.wait_for_selector(f"h1:has-text('{app.application.name}')")
