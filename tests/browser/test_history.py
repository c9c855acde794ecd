"""History in a real browser: ranges and applications switch in place, points tell their
value on hover."""

from __future__ import annotations

import pytest

from tasks.telemetry import rollups
from tests.browser.conftest import screenshot, submit
from tests.conftest import wait_for_status

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_ranges_and_applications_switch_in_place_with_hover_values(page, make_app):
    app, other = make_app("echo"), make_app("fail")
    for n in range(3):
        wait_for_status(submit(app, {"n": n}), ("succeeded",))
    wait_for_status(submit(other, {"n": 1}), ("failed",))
    rollups.roll_up()
    page.goto("/history/")
    page.evaluate("window.__noReload = true")
    throughput = page.locator("figure[data-chart='throughput']")
    titles = throughput.locator("g.s-ok circle title").all_text_contents()
    assert any(t.endswith("succeeded: 3 tasks/min") and " UTC · " in t for t in titles), titles
    assert "tasks/min" in throughput.locator("text.unit").text_content()
    page.click("a[data-range='24h']")
    page.wait_for_selector("a[data-range='24h'][aria-current]")
    assert "range=24h" in page.url
    assert "tasks/h" in page.locator("figure[data-chart='throughput'] text.unit").text_content()
    page.click(f"a[data-application='{other.application.name}']")
    page.wait_for_selector(f"a[data-application='{other.application.name}'][aria-current]")
    totals = page.locator("#history-totals tbody td").all_inner_texts()
    assert totals[1:3] == ["0", "1"], totals  # the failing app: 0 succeeded, 1 failed
    page.click("a[data-range='7d']")
    page.wait_for_selector("a[data-range='7d'][aria-current]")
    assert page.evaluate("window.__noReload") is True
    page.click("a[data-application-all]")
    page.wait_for_selector("a[data-application-all][aria-current]")
    page.click("a[data-range='1h']")
    page.wait_for_selector("a[data-range='1h'][aria-current]")
    screenshot(page, "history")
