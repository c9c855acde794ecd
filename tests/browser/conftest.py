"""Browser fixtures: Debian's Chromium driven by Playwright, logged in as an operator, against a
live server with a real RQ worker. Set TASKHOOK_SCREENSHOTS=1 to (re)write the README's
screenshots (docs/screenshots/)."""

from __future__ import annotations

import os

import pytest
from django.contrib.auth.models import User

from tests.conftest import BASE_DIR, api_submit

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
SHOTS = BASE_DIR / "docs" / "screenshots"


@pytest.fixture(scope="session")
def browser():
    # Playwright's sync API runs an event loop in this thread; the ORM calls in these tests
    # are plain synchronous test code, so Django's async-safety guard does not apply.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # No skip: in CI a browser that cannot start is a failure (make test installs Chromium).
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield browser
        browser.close()


def logged_in_page(browser, base_url: str, *, bypass_csp: bool):
    context = browser.new_context(
        viewport={"width": 1400, "height": 900}, base_url=base_url, bypass_csp=bypass_csp
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto("/")
    page.fill("#id_username", "ops")
    page.fill("#id_password", "ops-password-123")
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Overview')")
    return context, page, errors


@pytest.fixture
def page(browser, live_server, live_worker):
    # Playwright's wait_for_function evaluates strings in the page, which the strict CSP
    # forbids; these functional tests bypass it, test_pages_run_under_the_strict_csp does not.
    User.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    context, page, errors = logged_in_page(browser, live_server.url, bypass_csp=True)
    yield page
    context.close()
    assert not errors, errors


def screenshot(page, name: str) -> None:
    if os.environ.get("TASKHOOK_SCREENSHOTS"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def submit(app, inputs: dict, callback_url: str = "") -> str:
    body = {"inputs": inputs, "response_mode": "async"}
    if callback_url:
        body["callback_url"] = callback_url
    return api_submit(app, body)
