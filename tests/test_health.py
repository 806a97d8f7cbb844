"""/admin/health: who may read it, and each line going red for the right reason, fast.

The page with everything up (all green) needs a real worker and beat: tests/integration/test_beat.py
and the browser test read it there."""

import os
import socket
import subprocess
import time
from datetime import timedelta

import pytest
import time_machine
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from tests.test_settings import start
from trusca.backups import schedule
from trusca.backups.models import Backup
from trusca.backups.naming import format_name

TOKEN = "health-token-" + "x" * 24
URL = "/admin/health"
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def token_and_no_broker(settings):
    settings.BACKUP_HEALTH_TOKEN = TOKEN
    # Refused at once, so the lines about something else are read without waiting for workers.
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{closed_port()}/0"


def as_monitor(client, token: str = TOKEN):
    return client.get(URL, headers={"accept": "application/json", "authorization": f"Bearer {token}"})


def states(response) -> dict[str, str]:
    return {name: check["state"] for name, check in response.json()["checks"].items()}


def backup_row(*, hours_ago: float, kind: str = "manual", status: str = "succeeded", **fields) -> Backup:
    when = (timezone.now() - timedelta(hours=hours_ago)).replace(microsecond=0)
    return Backup.objects.create(
        name=format_name(kind, when), kind=kind, status=status, created_at=when, finished_at=when, **fields
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_broker():
    """A broker that accepts the connection and never says a word: the worst kind of down."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


# Who may read it ---------------------------------------------------------------------------


def test_a_monitor_with_the_token_reads_the_json(db, client):
    response = as_monitor(client)
    assert response.status_code in (200, 503)
    body = response.json()
    assert body["status"] in ("ok", "warning", "failing")
    assert list(body["checks"]) == [
        "database",
        "broker",
        "worker",
        "beat",
        "storage",
        "last_backup",
        "last_auto",
        "schedule",
        "stored_copies",
        "offsite",
    ]
    assert set(body["checks"]["database"]) == {"title", "state", "detail", "action"}

    page = client.get(URL, headers={"authorization": f"Bearer {TOKEN}"})
    assert page.content.count(b"<tr data-check=") == 10
    assert b'id="nav-sidebar"' not in page.content, "the token shows the health page, not the admin"


@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"bearer {TOKEN.upper()}", "Bearer "]
)
def test_a_wrong_token_gets_401(db, client, authorization):
    response = client.get(URL, headers={"accept": "application/json", "authorization": authorization})
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["type"] == "urn:trustedoss:problem:not_authenticated"


def test_a_monitor_without_the_token_gets_401(db, client):
    response = client.get(URL, headers={"accept": "application/json"})
    assert response.status_code == 401
    assert "BACKUP_HEALTH_TOKEN" in response.json()["detail"]


def test_no_token_configured_lets_no_bearer_in(db, client, settings):
    settings.BACKUP_HEALTH_TOKEN = ""
    assert as_monitor(client, "").status_code == 401


def test_staff_read_the_page_in_the_admin_and_others_are_sent_to_sign_in(db, client, staff_client):
    page = staff_client.get(URL)
    assert page.status_code in (200, 503)
    assert b"<title>Health | TRUSCA</title>" in page.content
    assert page.content.count(b"<tr data-check=") == 10
    # A proxy's own Basic sign-in in front of the admin is not taken for a wrong health token.
    behind_proxy = staff_client.get(URL, headers={"authorization": "Basic cHJveHk6c2VjcmV0"})
    assert behind_proxy.content.count(b"<tr data-check=") == 10

    client.logout()
    anonymous = client.get(URL)
    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith(reverse("admin:login"))


def test_a_short_token_stops_the_start(tmp_path):
    result = start(tmp_path, BACKUP_HEALTH_TOKEN="letmein")
    assert result.returncode != 0
    assert "BACKUP_HEALTH_TOKEN is shorter than 24 characters" in result.stderr


# Each line red for the right reason --------------------------------------------------------


def test_broker_down_no_worker_storage_unwritable_and_a_30_hour_old_backup_each_fail_in_under_a_second(
    transactional_db, client, settings
):
    # The broker: the fixture's closed port.
    settings.BACKUP_ROOT.parent.mkdir(parents=True, exist_ok=True)
    settings.BACKUP_ROOT.write_text("a file where the backups directory should be")
    last = backup_row(hours_ago=30)

    started = time.monotonic()
    response = as_monitor(client)
    elapsed = time.monotonic() - started

    assert elapsed < 1.0
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "failing"
    checks = body["checks"]
    assert {name: checks[name]["state"] for name in ("broker", "worker", "storage", "last_backup")} == dict.fromkeys(
        ("broker", "worker", "storage", "last_backup"), "failing"
    )
    assert "Connection refused" in checks["broker"]["detail"]
    assert checks["broker"]["action"].startswith("Check that the broker (Redis) is up")
    assert "cannot be written: Not a directory" in checks["storage"]["detail"]
    assert checks["last_backup"]["detail"] == (
        f"no backup has succeeded for more than 26 hours: the last, {last.name}, was taken 30 h ago"
    )
    assert checks["database"]["state"] == "ok"


def test_a_broker_that_never_answers_fails_in_under_a_second(db, client, settings, silent_broker):
    settings.CELERY_BROKER_URL = silent_broker
    started = time.monotonic()
    response = as_monitor(client)
    assert time.monotonic() - started < 1.0
    assert states(response)["broker"] == states(response)["worker"] == "failing"


def test_a_live_broker_without_a_worker_on_the_backups_queue_fails_the_worker_line(db, client, settings):
    settings.CELERY_BROKER_URL = REDIS_URL
    checks = as_monitor(client).json()["checks"]
    assert checks["broker"]["state"] == "ok"
    assert checks["worker"]["state"] == "failing"
    assert checks["worker"]["detail"].startswith("no worker consuming the backups queue answered within")
    assert checks["worker"]["action"].startswith("Start one: celery -A trusca worker -Q backups,default")


def test_a_worker_that_took_the_heartbeat_task_lately_counts_as_alive(db, client, settings):
    settings.CELERY_BROKER_URL = REDIS_URL
    schedule.worker_took_heartbeat("w1@host")
    assert as_monitor(client).json()["checks"]["worker"]["detail"].startswith("w1@host took a task from the backups")
    with time_machine.travel(timezone.now() + timedelta(minutes=5)):
        worker = as_monitor(client).json()["checks"]["worker"]
    assert worker["state"] == "failing"
    assert worker["detail"].endswith("a worker last took a task from it 5 min ago")


def test_storage_on_a_read_only_disk_fails(db, client, settings, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        settings.BACKUP_ROOT = mount
        storage = as_monitor(client).json()["checks"]["storage"]
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert storage["state"] == "failing"
    assert storage["detail"] == f"BACKUP_ROOT {mount} cannot be written: Read-only file system"


def test_storage_without_room_for_the_next_backup_fails(transactional_db, client, settings):
    settings.BACKUP_ROOT.mkdir()
    import shutil

    free = shutil.disk_usage(settings.BACKUP_ROOT).free
    last = backup_row(hours_ago=1, size_bytes=free)  # the next one, 10% larger, does not fit
    storage = as_monitor(client).json()["checks"]["storage"]
    assert storage["state"] == "failing"
    assert f"the last, {last.name}, was" in storage["detail"]
    Backup.objects.filter(pk=last.pk).update(size_bytes=free // 50)
    storage = as_monitor(client).json()["checks"]["storage"]
    assert storage["state"] == "ok"
    assert "room for 45 more backups like the last" in storage["detail"]


def test_beat_silent_for_two_minutes_fails_and_a_fresh_heartbeat_is_green(db, client):
    assert states(as_monitor(client))["beat"] == "failing"
    cache.set(schedule.BEAT_HEARTBEAT_KEY, (timezone.now() - timedelta(minutes=2)).isoformat())
    assert as_monitor(client).json()["checks"]["beat"]["detail"].startswith("beat has not been heard from since ")
    schedule.before_publish({})
    assert states(as_monitor(client))["beat"] == "ok"


def test_a_failed_nightly_backup_fails_until_a_later_backup_succeeds(transactional_db, client):
    failed = backup_row(hours_ago=2, kind="auto", status="failed", message="No space left on device")
    last_auto = as_monitor(client).json()["checks"]["last_auto"]
    assert last_auto["state"] == "failing"
    assert last_auto["detail"] == f"{failed.name} failed: No space left on device"
    backup_row(hours_ago=1)
    assert states(as_monitor(client))["last_auto"] == "warning"


def test_the_schedule_line_follows_the_periodic_task(transactional_db, client, settings):
    assert as_monitor(client).json()["checks"]["schedule"]["detail"].startswith("on, every day at 00:00 UTC; next run ")
    PeriodicTask.objects.filter(name=schedule.DAILY).update(enabled=False)
    assert states(as_monitor(client))["schedule"] == "warning"
    settings.BACKUP_DAILY_ENABLED = False
    assert states(as_monitor(client))["schedule"] == "ok"
    PeriodicTask.objects.filter(name=schedule.DAILY).delete()
    assert states(as_monitor(client))["schedule"] == "failing"


def test_a_copy_found_damaged_is_a_warning(transactional_db, client):
    damaged = backup_row(hours_ago=3, status="failed", message="damaged (found by the weekly check on 2026-05-17): x")
    copies = as_monitor(client).json()["checks"]["stored_copies"]
    assert copies["state"] == "warning"
    assert copies["detail"].startswith(f"damaged: {damaged.name}")
