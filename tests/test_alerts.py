"""Alert emails: one per cause per 24 hours, through Django's mail settings."""

import logging
import socket
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.conf import settings
from django.utils import timezone

from tests.test_settings import start
from trusca.backups import alerts, operations, store, tasks
from trusca.backups.models import Backup
from trusca.backups.naming import format_name

OPS = ["ops@example.org", "oncall@example.org"]
T0 = datetime(2026, 5, 20, 0, 0, 5, tzinfo=UTC)


@pytest.fixture(autouse=True)
def recipients(settings):
    settings.BACKUP_ALERT_EMAILS = OPS


@pytest.fixture(autouse=True)
def outcome_log(caplog):
    # The management commands quieten this logger for their own output; the worker's log has it.
    caplog.set_level(logging.INFO, logger="trusca.backups.outcome")


def outcome_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "trusca.backups.outcome"]


def test_a_failed_nightly_backup_sends_one_email_and_a_second_failure_that_day_none(
    transactional_db, settings, mailoutbox, caplog
):
    settings.WORKSPACE_HOST_PATH = settings.WORKSPACE_HOST_PATH / "gone"
    tasks.auto_backup.apply()
    failed = Backup.objects.get()
    assert (failed.kind, failed.status) == ("auto", "failed")
    [mail] = mailoutbox
    assert mail.to == OPS
    assert mail.subject == f"[TRUSCA] Nightly backup {failed.name} failed"
    assert failed.message in mail.body and "does not exist" in mail.body
    [line] = [r for r in outcome_lines(caplog) if r.getMessage().startswith("backup.failed")]
    assert line.getMessage() == f"backup.failed {failed.name}: {failed.message}"
    assert line.exc_info is None, "an expected failure is one line, no traceback"

    tasks.auto_backup.apply()
    assert Backup.objects.filter(status="failed").count() == 2
    assert len(mailoutbox) == 1


def stored_row(when: datetime, kind: str = "manual", status: str = "succeeded") -> Backup:
    return Backup.objects.create(name=format_name(kind, when), kind=kind, status=status, created_at=when)


def test_no_backup_for_26_hours_sends_one_email_a_day(db, mailoutbox):
    with time_machine.travel(T0, tick=False) as clock:
        last = stored_row(T0)
        clock.move_to(T0 + timedelta(hours=25, minutes=59))
        tasks.watch.apply()
        assert mailoutbox == []

        clock.move_to(T0 + timedelta(hours=26, minutes=1))
        tasks.watch.apply()
        [mail] = mailoutbox
        assert mail.subject == "[TRUSCA] No backup has succeeded for 26 hours"
        assert f"the last one, {last.name}, is 26 hours old" in mail.body

        clock.move_to(T0 + timedelta(hours=49))
        tasks.watch.apply()
        assert len(mailoutbox) == 1, "at most one per cause per 24 hours"

        clock.move_to(T0 + timedelta(hours=50, minutes=2))
        tasks.watch.apply()
        assert len(mailoutbox) == 2


def test_a_backup_that_succeeds_in_time_keeps_the_alert_away(db, mailoutbox):
    with time_machine.travel(T0, tick=False) as clock:
        stored_row(T0)
        clock.move_to(T0 + timedelta(hours=20))
        stored_row(T0 + timedelta(hours=20), kind="auto")
        clock.move_to(T0 + timedelta(hours=30))
        assert not alerts.check_backup_age()
    assert mailoutbox == []


def test_a_nightly_backup_whose_worker_died_is_alerted_by_the_watch(db, settings, mailoutbox):
    silent = timezone.now() - timedelta(seconds=settings.BACKUP_STALE_SECONDS + 5)
    dead = Backup.objects.create(
        name=format_name("auto", silent), kind="auto", status="running", created_at=silent, heartbeat_at=silent
    )
    tasks.watch.apply()
    dead.refresh_from_db()
    assert dead.status == "failed"
    [mail] = mailoutbox
    assert mail.subject == f"[TRUSCA] Nightly backup {dead.name} failed"
    assert "worker lost" in mail.body


def test_the_weekly_check_marks_a_damaged_copy_failed_and_sends_one_email(transactional_db, mailoutbox, caplog):
    (settings.WORKSPACE_HOST_PATH / "scan.txt").write_text("license: MIT\n" * 2000)
    good = operations.backup_create(kind="cli", actor="test", prune=False).backup
    with time_machine.travel(timezone.now() + timedelta(seconds=2)):
        bad = operations.backup_create(kind="auto", actor="test", prune=False).backup
    archive = store.local().path(bad.name) / "workspace.tar.gz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit of rot in the middle
    archive.write_bytes(bytes(data))

    tasks.verify_sweep.apply()
    good.refresh_from_db()
    bad.refresh_from_db()
    assert good.status == "succeeded"
    assert bad.status == "failed"
    assert bad.message.startswith("damaged (found by the weekly check on ")
    assert "workspace.tar.gz" in bad.message
    [mail] = mailoutbox
    assert mail.subject == "[TRUSCA] 1 stored backup failed verification"
    assert bad.name in mail.body and good.name not in mail.body
    assert any(r.getMessage().startswith(f"backup.damaged {bad.name}: ") for r in outcome_lines(caplog))

    tasks.verify_sweep.apply()
    assert len(mailoutbox) == 1


def test_without_addresses_the_alert_is_a_log_line_only(db, settings, mailoutbox, caplog):
    settings.BACKUP_ALERT_EMAILS = []
    assert not alerts.send(alerts.STALE, "No backup has succeeded for 27 hours", "body")
    assert mailoutbox == []
    assert [r.getMessage() for r in outcome_lines(caplog)] == [
        "backup.alert no_recent_backup: No backup has succeeded for 27 hours"
    ]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_mail_server_that_refuses_is_logged_and_tried_again_an_hour_later(db, settings, caplog):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", closed_port()
    with time_machine.travel(T0, tick=False) as clock:
        assert not alerts.send(alerts.DAMAGED, "subject", "body")
        clock.move_to(T0 + timedelta(minutes=59))
        alerts.send(alerts.DAMAGED, "subject", "body")
        clock.move_to(T0 + timedelta(minutes=61))
        alerts.send(alerts.DAMAGED, "subject", "body")
    failures = [r.getMessage() for r in outcome_lines(caplog) if "alert_failed" in r.getMessage()]
    assert len(failures) == 2
    assert failures[0].startswith("backup.alert_failed backup_damaged: the mail was not sent (")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BACKUP_ALERT_EMAILS": "ops@example.org,pager"}, "BACKUP_ALERT_EMAILS holds 'pager', not an email address"),
        ({"EMAIL_USE_TLS": "true", "EMAIL_USE_SSL": "yes"}, "EMAIL_USE_TLS and EMAIL_USE_SSL are both true"),
        ({"EMAIL_PORT": "smtp"}, "EMAIL_PORT is 'smtp'; set it to a whole number"),
    ],
)
def test_bad_mail_settings_stop_the_start_naming_the_variable(tmp_path, env, message):
    result = start(tmp_path, **env)
    assert result.returncode != 0
    assert message in result.stderr
