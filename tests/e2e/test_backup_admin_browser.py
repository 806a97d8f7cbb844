import io

import pytest
from django.core.management import call_command
from django.utils import timezone
from playwright.sync_api import expect

from tests.helpers import fill_workspace
from trusca.backups import locks
from trusca.backups.models import Backup
from trusca.backups.naming import format_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

RUN_TIMEOUT_MS = 60_000


def sign_in(browser, live_server, username: str, password: str):
    page = browser.new_context(accept_downloads=True).new_page()
    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("link", name="Log out").or_(page.get_by_role("button", name="Log out"))).to_be_visible()
    return page


def test_a_superuser_runs_a_backup_watches_it_finish_and_downloads_a_bundle_that_verifies(
    browser, live_server, celery_worker, superuser, screenshot, tmp_path
):
    fill_workspace(megabytes=60)
    page = sign_in(browser, live_server, "root", "correct-horse-battery")
    # From the admin index, as an operator would: the Backups entry leads to the Backup page.
    page.locator('#content-main a[href="/admin/backups/backup/"]').first.click()
    expect(page).to_have_url(f"{live_server.url}/admin/backup/")
    expect(page.get_by_text("No backups yet…")).to_be_visible()
    screenshot(page, "1-empty")

    page.get_by_role("button", name="Run manual backup now").click()
    row = page.locator("tr[data-backup]")
    expect(row).to_have_count(1)
    expect(row.locator("progress")).to_be_visible()
    screenshot(page, "2-running")

    expect(page.locator('tr[data-status="succeeded"]')).to_have_count(1, timeout=RUN_TIMEOUT_MS)
    expect(row.locator(".backup-status")).to_have_text("succeeded")
    screenshot(page, "3-succeeded")

    backup = Backup.objects.get()
    with page.expect_download() as download_info:
        row.get_by_role("link", name="Download").click()
    download = download_info.value
    assert download.suggested_filename == f"{backup.name}.tar.gz"
    bundle = tmp_path / download.suggested_filename
    download.save_as(bundle)
    out = io.StringIO()
    call_command("verify_backup", str(bundle), stdout=out)
    assert f"db revision {backup.db_revision}" in out.getvalue()


def test_a_second_run_is_refused_and_the_page_says_why(browser, live_server, celery_worker, superuser, screenshot):
    page = sign_in(browser, live_server, "root", "correct-horse-battery")
    page.goto(f"{live_server.url}/admin/backup/")
    with locks.OperationLock("a restore"):
        page.get_by_role("button", name="Run manual backup now").click()
        expect(page.locator("ul.messagelist li.error")).to_contain_text("a restore is already running")
    screenshot(page, "refused")
    assert not Backup.objects.exists()


def test_a_staff_member_without_rights_sees_the_list_but_no_toolbar(browser, live_server, staff, screenshot, settings):
    when = timezone.now().replace(microsecond=0)
    Backup.objects.create(
        name=format_name("auto", when), kind="auto", status="succeeded", created_at=when, size_bytes=5_000_000
    )
    page = sign_in(browser, live_server, "staffer", "staff-password-123")
    page.goto(f"{live_server.url}/admin/backup/")
    row = page.locator("tr[data-backup]")
    expect(row.locator(".backup-badge")).to_have_text("auto")
    days = settings.BACKUP_RETENTION_DAYS
    expect(row.locator(".backup-lock")).to_have_attribute(
        "title", f"Removed by the automatic retention after {days} days (BACKUP_RETENTION_DAYS)"
    )
    expect(page.get_by_role("button", name="Run manual backup now")).to_have_count(0)
    expect(row.get_by_role("link", name="Download")).to_have_count(0)
    expect(row.get_by_role("link", name="Delete")).to_have_count(0)
    screenshot(page, "staff")
