"""Browser fixtures: Debian's Chromium driven by Playwright, logged in as an operator, against a
live server with a real RQ worker. Set TASKHOOK_SCREENSHOTS=1 to (re)write the README's
screenshots (docs/screenshots/)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psutil
import pytest
from django.contrib.auth.models import User

from dashboard.runtime.processes import web_argv
from tests.conftest import BASE_DIR, api_submit, subprocess_env, wait_for
from tests.stack import free_port

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


@dataclass
class WebProcess:
    """The web process a test started: its base URL and gunicorn's master."""

    url: str
    master: subprocess.Popen

    def kill_workers(self) -> None:
        """SIGKILL gunicorn's workers (the master starts new ones): every open connection
        drops, as in a crash or a proxy cutting idle streams."""
        for child in psutil.Process(self.master.pid).children():
            child.kill()


@pytest.fixture
def served_web(transactional_db, tmp_path) -> Iterator[WebProcess]:
    """The web process as deployed (gunicorn with uvicorn workers, the ASGI application, which
    alone serves the event stream) on the test database and Redis. Django's live_server is
    WSGI and answers the event stream with 501."""
    port = free_port()
    log_path = tmp_path / "web.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        web_argv(),
        cwd=BASE_DIR,
        env=subprocess_env(GUNICORN_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY="1"),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, interval=0.1)
        yield WebProcess(url=base, master=process)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def screenshot(page, name: str) -> None:
    if os.environ.get("TASKHOOK_SCREENSHOTS"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def submit(app, inputs: dict, callback_url: str = "") -> str:
    body = {"inputs": inputs, "response_mode": "async"}
    if callback_url:
        body["callback_url"] = callback_url
    return api_submit(app, body)
