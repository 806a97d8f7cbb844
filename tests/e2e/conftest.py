import os

import pytest
from django.conf import settings
from django.db import connections
from playwright.sync_api import sync_playwright

from tests.integration.worker import celery_worker

__all__ = ["browser", "celery_worker", "screenshot"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def browser(monkeypatch):
    # Playwright's sync API runs an event loop in this thread; the test's own database calls
    # (fixtures, assertions) are still plain synchronous code, which Django would refuse.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
            # While Playwright's loop runs, Django keeps the database connections it opens apart
            # from the thread's usual ones; close them here, or the test database cannot be dropped.
            connections.close_all()


@pytest.fixture
def screenshot(request):
    """Saves a full-page screenshot under artifacts/, named for the test and the moment."""
    directory = settings.BASE_DIR / "artifacts"
    directory.mkdir(exist_ok=True)

    def take(page, moment: str) -> None:
        page.screenshot(path=os.fspath(directory / f"{request.node.name}-{moment}.png"), full_page=True)

    return take
