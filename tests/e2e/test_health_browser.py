import time
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from playwright.sync_api import expect

from tests.integration.beat import running_beat
from trusca.backups.models import Backup
from trusca.backups.schedule import DAILY

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

RUN_TIMEOUT_SECONDS = 60


def sign_in_in_tokyo(browser, live_server):
    """An operator whose browser is nine hours ahead of UTC (Japan has no daylight saving time)."""
    page = browser.new_context(timezone_id="Asia/Tokyo", locale="en-US").new_page()
    page.goto(f"{live_server.url}/admin/login/?next=/admin/backup/")
    page.get_by_label("Username").fill("root")
    page.get_by_label("Password").fill("correct-horse-battery")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live_server.url}/admin/backup/")
    return page


def wait_for_auto_backup() -> Backup:
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if done := Backup.objects.filter(kind="auto", status__in=["succeeded", "failed"]).first():
            return done
        time.sleep(0.2)
    pytest.fail(f"no auto backup finished in {RUN_TIMEOUT_SECONDS} s")


def test_the_backup_page_shows_the_schedule_and_the_nightly_backup_and_health_is_all_green(
    browser, live_server, celery_worker, superuser, screenshot, tmp_path
):
    # A night missed while beat was down: the beat started here sends it at once.
    PeriodicTask.objects.filter(name=DAILY).update(last_run_at=timezone.now() - timedelta(days=2))
    with running_beat(tmp_path / "beat.log"):
        auto = wait_for_auto_backup()
        assert auto.status == "succeeded", auto.message

        page = sign_in_in_tokyo(browser, live_server)
        box = page.locator("#backup-schedule")
        expect(box.locator(".health-state")).to_have_text("on")
        expect(box).to_contain_text("every day at 00:00 UTC")
        tomorrow = (timezone.now() + timedelta(days=1)).date()
        midnight = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC)
        next_run = box.locator("time[data-local-time]")
        expect(next_run).to_have_text(f"{midnight:%Y-%m-%d} 00:00 UTC")
        assert datetime.fromisoformat(next_run.get_attribute("datetime")) == midnight
        expect(box.locator(".local-time")).to_have_text(
            f" ({midnight:%b} {midnight.day}, {midnight.year}, 9:00 AM your time)"
        )
        row = page.locator(f'tr[data-backup="{auto.pk}"]')
        expect(row.locator(".backup-name")).to_have_text(auto.name)
        expect(row.locator(".backup-status")).to_have_text("succeeded")
        expect(row.locator(".backup-badge")).to_have_text("auto")
        expect(row.locator(".backup-lock svg")).to_be_visible()
        screenshot(page, "1-backup-page")

        page.get_by_role("link", name="Health").click()
        expect(page).to_have_url(f"{live_server.url}/admin/health")
        expect(page.locator(".health-summary")).to_have_attribute("data-health-status", "ok")
        expect(page.locator("tr[data-check]")).to_have_count(10)
        expect(page.locator('tr[data-check][data-state="ok"]')).to_have_count(10)
        expect(page.locator('tr[data-check="last_auto"]')).to_contain_text(f"{auto.name} succeeded")
        screenshot(page, "2-health")

    page.go_back()
    page.get_by_role("link", name="Edit the schedule (Periodic Tasks)").click()
    expect(page.get_by_label("Name")).to_have_value(DAILY)
    screenshot(page, "3-periodic-task")
