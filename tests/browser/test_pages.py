"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a live server
with a real RQ worker. Set TASKHOOK_SCREENSHOTS=1 to (re)write the README's screenshots."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
from django.contrib.auth.models import User

from tasks.models import Application, Task
from tests.browser.conftest import logged_in_page, screenshot, submit
from tests.conftest import wait_for, wait_for_status

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_login_and_queue_depth_moves_live(page, make_app):
    app = make_app("sleep")
    cell = page.locator("tr[data-queue='tasks'] [data-queued]")
    assert cell.inner_text() == "0"
    page.evaluate("window.__noReload = true")
    for _ in range(6):
        submit(app, {"seconds": 1.2})
    # The overview refreshes itself (HTMX polling): the backlog shows up, then drains.
    page.wait_for_function(
        "Number(document.querySelector(\"tr[data-queue='tasks'] [data-queued]\").innerText) > 0",
        timeout=8000,
    )
    screenshot(page, "overview")
    page.wait_for_function(
        "Number(document.querySelector(\"tr[data-queue='tasks'] [data-queued]\").innerText) == 0"
        " && Number(document.querySelector(\"[data-status-count='succeeded']\").innerText) >= 6",
        timeout=30000,
    )
    assert page.evaluate("window.__noReload") is True


def test_failing_task_shows_its_traceback(page, make_app):
    app = make_app("fail")
    task_id = submit(app, {"message": "model overloaded <script>alert(1)</script>"})
    wait_for_status(task_id, ("failed",))
    page.goto("/tasks/")
    page.click(f"a[href='/tasks/{task_id}/']")
    trace = page.locator("#task-traceback")
    assert "Traceback (most recent call last)" in trace.inner_text()
    assert "RunnerError: model overloaded <script>alert(1)</script>" in trace.inner_text()
    assert page.locator("#task-error script").count() == 0  # text, not markup
    screenshot(page, "task-detail")
    page.goto("/tasks/?status=failed")
    screenshot(page, "tasks")


def test_failed_callback_is_redelivered_without_reload(page, make_app, receiver):
    app = make_app("echo", retry_schedule=[])
    receiver.default = (500, {}, b"receiver down", 0.0)
    task_id = submit(app, {"q": 1}, callback_url=receiver.url)
    wait_for(lambda: Task.objects.get(pk=task_id).callback_status == "failed")
    page.goto(f"/tasks/{task_id}/")
    assert page.locator("#attempts tbody tr").count() == 1
    page.evaluate("window.__noReload = true")
    receiver.default = (200, {}, b"thanks", 0.0)
    page.click("button:has-text('Redeliver callback')")
    page.wait_for_selector("#attempts tbody tr:has-text('manual')", timeout=15000)
    page.wait_for_selector("#callback-status:has-text('delivered')", timeout=15000)
    assert page.evaluate("window.__noReload") is True
    assert page.locator("#attempts tbody tr").count() == 2
    assert receiver.received[-1].headers["X-Taskhook-Attempt"] == "2"


def test_select_all_checks_the_rows_and_the_bulk_form_posts_them(page, make_app):
    from playwright.sync_api import expect

    console_errors: list[str] = []
    page.on("console", lambda msg: msg.type == "error" and console_errors.append(msg.text))
    app = make_app("fail")
    task_ids = [submit(app, {"message": f"boom {i}"}) for i in range(3)]
    for task_id in task_ids:
        wait_for_status(task_id, ("failed",))
    page.goto("/tasks/?status=failed")
    rows = page.locator("#results tbody input[type=checkbox][name=task]")
    expect(rows).to_have_count(3)
    select_all = page.locator("input[data-select-all=task]")
    select_all.check()
    assert [rows.nth(i).is_checked() for i in range(3)] == [True] * 3
    select_all.uncheck()
    assert [rows.nth(i).is_checked() for i in range(3)] == [False] * 3
    # After an htmx swap of the results (filter) the new select-all works on the new rows.
    page.evaluate("document.getElementById('results').dataset.old = 'yes'")
    page.click("button:has-text('Filter')")
    expect(page.locator("#results:not([data-old])")).to_have_count(1)
    expect(page.locator("[id=results]")).to_have_count(1)  # replaced, not nested in the old
    select_all.check()
    assert [rows.nth(i).is_checked() for i in range(3)] == [True] * 3
    retry_post = lambda r: r.method == "POST" and r.url.endswith("/tasks/retry")  # noqa: E731
    with page.expect_request(retry_post) as sent:
        page.click("#bulk-form button[value=selected]")
    posted = parse_qs(sent.value.post_data)
    assert posted["scope"] == ["selected"] and sorted(posted["task"]) == sorted(task_ids)
    page.wait_for_selector(".messages li:has-text('3 of 3 selected')")
    assert Task.objects.filter(pk__in=task_ids, run=2).count() == 3
    assert not console_errors, console_errors


def test_cancel_and_retry_swap_the_task_in_place(page, make_app):
    app = make_app("sleep")
    task_id = submit(app, {"seconds": 30})
    wait_for_status(task_id, ("running",))
    page.goto(f"/tasks/{task_id}/")
    page.evaluate("window.__noReload = true")
    page.click("#task-live button:has-text('Cancel')")
    # The in-page confirmation: Cancel in the dialog changes nothing.
    page.wait_for_selector("#confirm-dialog[open]:has-text('Cancel this task?')")
    page.click("#confirm-cancel")
    page.wait_for_timeout(300)
    assert Task.objects.get(pk=task_id).status == "running"
    page.click("#task-live button:has-text('Cancel')")
    page.click("#confirm-ok")
    page.wait_for_selector("#messages li:has-text('Task cancelled.')")
    page.wait_for_selector("#task-status:has-text('cancelled')")
    page.click("button:has-text('Retry task')")
    page.wait_for_selector("#messages li:has-text('A new run was started.')")
    assert Task.objects.get(pk=task_id).run == 2
    page.click("#task-live button:has-text('Cancel')")  # the new run too: the worker is free again
    page.click("#confirm-ok")
    page.wait_for_selector("#messages li:has-text('Task cancelled.')")
    assert page.evaluate("window.__noReload") is True
    assert wait_for_status(task_id, ("cancelled",)).run == 2


def test_retention_is_edited_and_saved(page, make_app):
    app = make_app("echo")
    page.goto(f"/applications/{app.application.id}/")
    page.evaluate("window.__noReload = true")
    page.select_option("#id_retention_preset", "72")
    page.click("button:has-text('Save settings')")
    page.wait_for_selector("#messages li:has-text('Settings saved (retention_hours)')")
    assert Application.objects.get(pk=app.application.id).retention_hours == 72
    # The retention panel and the summary show the new value without a reload.
    page.wait_for_selector("#retention strong:has-text('72 h')")
    page.wait_for_selector("#app-summary:has-text('3 d')")
    page.select_option("#id_retention_preset", "custom")
    page.fill("#id_retention_custom_hours", "")  # custom without hours: refused by the server
    page.click("button:has-text('Save settings')")
    page.wait_for_selector(".field-error")
    assert Application.objects.get(pk=app.application.id).retention_hours == 72
    page.fill("#id_retention_custom_hours", "36")
    page.click("button:has-text('Save settings')")
    page.wait_for_selector("#retention strong:has-text('36 h')")
    assert Application.objects.get(pk=app.application.id).retention_hours == 36
    page.click("#retention button:has-text('Run cleanup now')")
    page.click("#confirm-ok")
    page.wait_for_selector("#messages li:has-text('Cleanup removed 0 task(s)')")
    assert page.evaluate("window.__noReload") is True
    screenshot(page, "application-settings")


def test_pages_run_under_the_strict_csp(browser, live_server, live_worker, make_app):
    """No CSP violation on any dashboard page (the header is sent, htmx still works)."""
    from playwright.sync_api import expect

    User.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    context, page, errors = logged_in_page(browser, live_server.url, bypass_csp=False)
    violations: list[str] = []
    page.on("console", lambda msg: "Content Security Policy" in msg.text and violations.append(
        msg.text))  # fmt: skip
    app = make_app("echo")
    task_id = submit(app, {"q": 1})
    wait_for_status(task_id, ("succeeded",))
    for path in ("/", "/tasks/", f"/tasks/{task_id}/", "/callbacks/failed/", "/applications/",
                 f"/applications/{app.application.id}/", "/audit/", "/time-zone/",
                 "/history/", "/work/", "/workers/", "/failures/"):  # fmt: skip
        response = page.goto(path)
        assert "script-src 'self'" in response.headers["content-security-policy"]
        page.wait_for_timeout(300)
    # htmx is live under the policy: filtering swaps the results in place.
    page.goto("/tasks/")
    page.evaluate("window.__noReload = true")
    page.fill("input[name=q]", task_id[:8])
    page.click("button:has-text('Filter')")
    expect(page.locator("#results tbody tr")).to_have_count(1)
    assert page.evaluate("window.__noReload") is True
    context.close()
    assert not violations, violations
    assert not errors, errors


def test_times_say_their_zone_and_follow_the_operators_choice(page, make_app):
    app = make_app("echo")
    task_id = submit(app, {"q": 1})
    wait_for_status(task_id, ("succeeded",))
    page.goto(f"/tasks/{task_id}/")
    timeline = page.locator("#timeline").inner_text()
    assert " UTC" in timeline and ("ago" in timeline or "just now" in timeline), timeline
    # Milliseconds at most, never microseconds: "2026-12-02 21:04:20.123 UTC".
    created = timeline.split("created ")[1].split(" UTC")[0]
    assert len(created.rsplit(".", 1)[1]) == 3, created
    page.click("#zone-link")
    page.fill("#id_time_zone", "Asia/Kolkata")
    page.click("button:has-text('Use this zone')")
    page.wait_for_selector("#messages li:has-text('Times are now shown in Asia/Kolkata.')")
    assert page.url.endswith(f"/tasks/{task_id}/")  # back where the operator was
    assert " IST" in page.locator("#timeline").inner_text()
    # The date filter is read in that zone too, and says so.
    page.goto("/tasks/")
    assert page.locator(".filters .hint").inner_text() == "Asia/Kolkata"
    page.click("#zone-link")
    page.fill("#id_time_zone", "Mars/Olympus")
    page.click("button:has-text('Use this zone')")
    page.wait_for_selector("#zone-error:has-text('Unknown time zone')")


def test_retry_all_matching_answers_in_place_and_the_rows_show_the_new_runs(page, make_app):
    app = make_app("fail")
    ids = [submit(app, {"n": n}) for n in range(3)]
    for task_id in ids:
        wait_for_status(task_id, ("failed",))
    page.goto(f"/tasks/?application={app.application.id}")
    page.evaluate("window.__noReload = true")
    runs = page.locator("#results tbody td.num:nth-of-type(5)")
    assert runs.all_inner_texts() == ["1", "1", "1"]
    page.click("button:has-text('Retry all matching')")
    page.click("#confirm-ok")
    page.wait_for_selector("#messages li:has-text('in the background')")
    page.wait_for_selector("#operations .operation:has-text('done')", timeout=30_000)
    # The list refreshed itself when the operation ended: every row is on its second run.
    wait_for(lambda: page.locator("#results tbody td.num:nth-of-type(5)").all_inner_texts()
             == ["2", "2", "2"], timeout=15)  # fmt: skip
    assert page.evaluate("window.__noReload") is True
