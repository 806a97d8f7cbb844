import re
import time

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone
from playwright.sync_api import expect

from tests.helpers import fill_workspace
from trusca.backups import locks
from trusca.backups.models import Backup
from trusca.backups.naming import format_name
from trusca.portal.models import Project

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

RUN_TIMEOUT_MS = 90_000
NEAR_MISSES = ["Restore", " restore", "restore ", "restor", "RESTORE", "restore."]


def sign_in(page, live_server, username: str, password: str) -> None:
    if "/admin/login/" not in page.url:
        page.goto(f"{live_server.url}/admin/login/?next=/admin/backup/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()


def confirm_and_restore(page) -> None:
    field = page.get_by_label("Type restore to confirm")
    button = page.get_by_role("button", name="Restore", exact=True)
    for near_miss in NEAR_MISSES:
        field.fill(near_miss)
        expect(button).to_be_disabled()
        expect(button).to_have_attribute("aria-disabled", "true")
    field.fill("restore")
    expect(button).to_be_enabled()
    expect(button).to_have_attribute("aria-disabled", "false")
    button.click()


def follow_to_the_sign_in_page(page, live_server, screenshot, name: str) -> None:
    expect(page.get_by_role("heading", name="TRUSCA is down for maintenance")).to_be_visible(timeout=RUN_TIMEOUT_MS)
    expect(page.locator("[data-step]")).to_contain_text(re.compile(r"safety backup|restoring"))
    screenshot(page, f"{name}-maintenance")
    expect(page).to_have_url(re.compile(r"/admin/login/\?next="), timeout=RUN_TIMEOUT_MS)
    expect(page.locator("ul.messagelist li.success")).to_contain_text("completed")
    expect(page.locator("ul.messagelist li.success")).to_contain_text("sign in with the credentials of that time")
    screenshot(page, f"{name}-signed-out")


def throttle(cdp, *, upload: int) -> None:
    """Bytes per second the page may upload (-1: no limit)."""
    conditions = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": upload}
    cdp.send("Network.emulateNetworkConditions", conditions)


def project_names(page, live_server) -> str:
    page.goto(f"{live_server.url}/admin/portal/project/")
    return page.locator("#result_list").inner_text()


@pytest.fixture
def watchable_restores(monkeypatch):
    """The worker's restores hold a few seconds before maintenance mode (the page shows the
    restore under way) and in it (after staging: the maintenance page), long enough for the
    browser to see both however fast this machine restores."""
    monkeypatch.setenv("TRUSCA_TEST_PAUSE_AT", "before-maintenance,after-staging")


def test_a_superuser_restores_an_uploaded_bundle_then_undoes_it_from_the_list(
    browser, live_server, watchable_restores, celery_worker, superuser, screenshot, tmp_path
):
    fill_workspace(megabytes=40)
    Project.objects.create(name="of-the-backups-era")
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, live_server, "root", "correct-horse-battery")

    # A backup from the list, downloaded as a bundle.
    page.goto(f"{live_server.url}/admin/backup/")
    page.get_by_role("button", name="Run manual backup now").click()
    expect(page.locator('tr[data-status="succeeded"]')).to_have_count(1, timeout=RUN_TIMEOUT_MS)
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download").click()
    bundle = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(bundle)

    # Life goes on: a new project, a new password (which signs this browser out).
    Project.objects.create(name="after-the-backup")
    root = get_user_model().objects.get(username="root")
    root.set_password("a-newer-password-1")
    root.save()
    sign_in(page, live_server, "root", "a-newer-password-1")

    # Upload and restore, through the gate.
    page.goto(f"{live_server.url}/admin/backup/")
    page.get_by_role("link", name="Upload and restore…").click()
    expect(page.get_by_role("heading", name="What the restore replaces")).to_be_visible()
    page.get_by_label("Backup bundle (.tar.gz)").set_input_files(bundle)
    # Slow the upload down enough to watch it (about four seconds).
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    throttle(cdp, upload=bundle.stat().st_size // 4)

    # A first try, cancelled halfway: nothing is left behind and nothing is held.
    before = sorted(p.name for p in settings.BACKUP_ROOT.iterdir())
    confirm_and_restore(page)
    expect(page.locator("#upload-text")).to_contain_text(re.compile(r"· [1-9]\d?% ·"))
    page.get_by_role("button", name="Cancel upload").click()
    expect(page.locator("ul.messagelist li.warning")).to_have_text("Upload cancelled. Nothing was changed.")
    expect(page.locator("#restore-confirmation")).to_be_enabled()
    screenshot(page, "upload-0-cancelled")
    deadline = time.monotonic() + 15
    while (sorted(p.name for p in settings.BACKUP_ROOT.iterdir()) != before or locks.current()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert sorted(p.name for p in settings.BACKUP_ROOT.iterdir()) == before
    assert locks.current() is None

    confirm_and_restore(page)
    expect(page.locator("#upload-text")).to_contain_text(re.compile(r"MB of .* · \d+% · .*MB/s"))
    screenshot(page, "upload-1-uploading")
    expect(page.locator("#upload-cancel")).to_be_visible()
    expect(page.locator("#restore-text")).to_be_visible(timeout=RUN_TIMEOUT_MS)
    screenshot(page, "upload-2-queued")
    throttle(cdp, upload=-1)
    follow_to_the_sign_in_page(page, live_server, screenshot, "upload-3")

    # The backup's era: its password, its projects.
    sign_in(page, live_server, "root", "correct-horse-battery")
    names = project_names(page, live_server)
    assert "of-the-backups-era" in names
    assert "after-the-backup" not in names
    uploaded = Backup.objects.get(kind="uploaded")
    safety = Backup.objects.get(kind="pre_restore")

    # Undo it: "Restore…" on the safety backup in the list.
    page.goto(f"{live_server.url}/admin/backup/")
    expect(page.locator(f'tr:has-text("{uploaded.name}") .backup-status')).to_have_text("succeeded")
    screenshot(page, "undo-1-list")
    page.locator(f'tr:has-text("{safety.name}")').get_by_role("link", name="Restore…").click()
    expect(page.locator(".backup-facts")).to_contain_text(safety.name)
    expect(page.locator("#restore-trust")).to_have_count(0)
    confirm_and_restore(page)
    follow_to_the_sign_in_page(page, live_server, screenshot, "undo-2")
    sign_in(page, live_server, "root", "a-newer-password-1")
    assert "after-the-backup" in project_names(page, live_server)


def overflowing(page) -> list[str]:
    """What in the content area runs past its right edge (and whether the page scrolls sideways)."""
    return page.evaluate(
        """() => {
            const content = document.getElementById("content");
            const limit = content.getBoundingClientRect().right + 1;
            const out = [...content.querySelectorAll("*")]
                .filter((e) => e.getBoundingClientRect().right > limit)
                .map((e) => `${e.tagName}.${e.className} ends at ${e.getBoundingClientRect().right} > ${limit}`);
            if (document.documentElement.scrollWidth > window.innerWidth) {
                out.push(`the page is ${document.documentElement.scrollWidth} px wide`);
            }
            return out;
        }"""
    )


def test_the_backup_pages_fit_from_800_px_with_the_sidebar_open(browser, live_server, superuser, screenshot):
    now = timezone.now().replace(microsecond=0)
    rows = [
        ("auto", "succeeded", 0, ""),
        ("pre_restore", "succeeded", 1, ""),
        ("manual", "running", 2, ""),
        ("manual", "queued", 3, ""),
        ("uploaded", "failed", 4, "worker lost: the process running it is gone; its partial files were removed"),
    ]
    for kind, status, minutes, message in rows:
        when = now - timezone.timedelta(minutes=minutes)
        Backup.objects.create(
            name=format_name(kind, when),
            kind=kind,
            status=status,
            created_at=when,
            size_bytes=123_456_789,
            db_revision="0123456789ab",
            progress=42,
            heartbeat_at=timezone.now() if status in ("running", "queued") else None,
            message=message,
        )
    # The running and queued rows belong to a live run: one holds the lock.
    with locks.OperationLock("a manual backup"):
        for width in (800, 1280):
            check_layout(browser, live_server, screenshot, width)


def check_layout(browser, live_server, screenshot, width: int) -> None:
    page = browser.new_page(viewport={"width": width, "height": 900})
    sign_in(page, live_server, "root", "correct-horse-battery")
    page.goto(f"{live_server.url}/admin/backup/")
    expect(page.locator("#nav-sidebar")).to_be_visible()
    expect(page.locator("#nav-sidebar a[aria-current=page]")).to_have_text("Backup")
    screenshot(page, f"list-{width}")
    assert overflowing(page) == [], f"at {width} px"
    page.get_by_role("link", name="Upload and restore…").click()
    screenshot(page, f"upload-page-{width}")
    assert overflowing(page) == [], f"at {width} px"
    page.close()


def test_a_browser_gets_the_admins_404_for_a_missing_backup_and_no_404_for_the_favicon(
    browser, live_server, superuser, screenshot
):
    page = browser.new_page()
    sign_in(page, live_server, "root", "correct-horse-battery")
    response = page.goto(f"{live_server.url}/admin/backup/999/restore")
    assert response.status == 404
    expect(page.get_by_role("heading", name="Page not found")).to_be_visible()
    expect(page.locator("#nav-sidebar")).to_be_visible()
    screenshot(page, "missing")
    assert page.goto(f"{live_server.url}/favicon.ico").status == 200
