"""The nightly backup task and the sweeps beat runs: what each does when it runs, waits or skips."""

from datetime import timedelta

import pytest
import time_machine
from celery.exceptions import Retry
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from tests.helpers import backup_dirs
from trusca.backups import locks, maintenance, operations, schedule, store, tasks
from trusca.backups.models import Backup

pytestmark = pytest.mark.django_db
# A backup reads the database from other connections (pg_dump, its heartbeat thread): the tests
# that take one commit for real.
takes_backups = pytest.mark.django_db(transaction=True)


def beat_sends_it() -> None:
    """What beat does as it sends daily-auto-backup, before the worker runs it."""
    schedule.before_publish({"periodic_task_name": schedule.DAILY})


def auto_rows() -> list[Backup]:
    return list(Backup.objects.filter(kind="auto").order_by("created_at"))


@takes_backups
def test_the_nightly_backup_is_a_queued_backup_of_kind_auto(settings):
    beat_sends_it()
    tasks.auto_backup.apply()
    [row] = auto_rows()
    assert (row.status, row.actor, row.progress) == ("succeeded", "schedule", 100)
    assert row.name.startswith("auto-") and len(row.name) == len("auto-20260520T000000Z")
    assert [d.name for d in backup_dirs()] == [row.name]


@takes_backups
def test_it_waits_while_a_restore_holds_the_lock_and_runs_after():
    beat_sends_it()
    with locks.OperationLock("a restore"), pytest.raises(Retry):
        tasks.auto_backup.apply(throw=True)
    assert auto_rows() == []
    tasks.auto_backup.apply()  # the retry, once the lock is free
    assert [r.status for r in auto_rows()] == ["succeeded"]


def test_it_waits_while_maintenance_mode_is_on():
    beat_sends_it()
    maintenance.enter("restoring manual-20260509T030000Z")
    try:
        with pytest.raises(Retry):
            tasks.auto_backup.apply(throw=True)
    finally:
        maintenance.leave()
    assert auto_rows() == []


@takes_backups
def test_a_manual_backup_an_hour_ago_does_not_make_it_skip():
    operations.backup_create(kind="manual", actor="root", prune=False)
    beat_sends_it()
    tasks.auto_backup.apply()
    assert [r.status for r in auto_rows()] == ["succeeded"]


@takes_backups
def test_one_send_delivered_twice_makes_one_backup():
    beat_sends_it()
    tasks.auto_backup.apply()
    tasks.auto_backup.apply()  # redelivered, or a second night's send queued while no worker ran
    assert len(auto_rows()) == 1
    with time_machine.travel(timezone.now() + timedelta(days=1)):
        beat_sends_it()  # the next night
        tasks.auto_backup.apply()
    assert len(auto_rows()) == 2


@takes_backups
def test_a_send_whose_backup_failed_is_tried_again_when_delivered_again(settings):
    beat_sends_it()
    workspace = settings.WORKSPACE_HOST_PATH
    settings.WORKSPACE_HOST_PATH = workspace / "gone"
    tasks.auto_backup.apply()
    settings.WORKSPACE_HOST_PATH = workspace
    with time_machine.travel(timezone.now() + timedelta(seconds=2)):
        tasks.auto_backup.apply()
    assert [r.status for r in auto_rows()] == ["failed", "succeeded"]


def test_a_worker_with_daily_backups_switched_off_does_not_run_one(settings):
    settings.BACKUP_DAILY_ENABLED = False
    beat_sends_it()
    tasks.auto_backup.apply()
    assert auto_rows() == []


@takes_backups
def test_the_nightly_backup_prunes_after_itself(settings):
    with time_machine.travel(timezone.now() - timedelta(days=settings.BACKUP_RETENTION_DAYS + 1)):
        old_auto = operations.backup_create(kind="auto", actor="schedule", prune=False).backup.name
        old_manual = operations.backup_create(kind="manual", actor="root", prune=False).backup.name
    beat_sends_it()
    tasks.auto_backup.apply()
    stored = {b.name for b in store.local().list()}
    assert old_auto not in stored and old_manual in stored


@takes_backups
def test_the_daily_retention_sweep_prunes_without_a_nightly_backup_and_waits_for_the_lock(settings):
    with time_machine.travel(timezone.now() - timedelta(days=settings.BACKUP_RETENTION_DAYS + 1)):
        old_cli = operations.backup_create(kind="cli", actor="cron", prune=False).backup.name
    operations.backup_create(kind="cli", actor="cron", prune=False)
    with locks.OperationLock("a restore"), pytest.raises(Retry):
        tasks.retention_sweep.apply(throw=True)
    assert old_cli in {b.name for b in store.local().list()}, "nothing is pruned under a running restore"
    tasks.retention_sweep.apply()
    assert old_cli not in {b.name for b in store.local().list()}


def test_the_beat_heartbeat_task_records_the_worker_that_took_it():
    assert schedule.worker_seen() is None
    tasks.beat_heartbeat.apply()
    at, worker = schedule.worker_seen()
    assert timezone.now() - at < timedelta(seconds=5) and worker


def test_the_periodic_tasks_name_real_tasks():
    registered = set(tasks.auto_backup.app.tasks)
    assert {t.task for t in PeriodicTask.objects.all()} <= registered


def test_the_watch_finishes_a_restore_whose_process_was_killed(demo, drop_tables_made_after_backup):
    from tests.test_restore_command import take_backup
    from tests.test_restore_crash import restore_killed_at

    backup = take_backup()
    assert restore_killed_at("after-commit", backup).returncode == -9
    assert maintenance.active() is not None
    tasks.watch.apply()
    assert maintenance.active() is None, "the portal reopens within a minute, without a restart"
    assert not maintenance.journal_path().exists()


def test_the_watch_leaves_a_running_restore_alone(settings):
    maintenance.enter("restoring manual-20260509T030000Z")
    try:
        silent = timezone.now() - timedelta(seconds=settings.BACKUP_STALE_SECONDS + 5)
        row = Backup.objects.create(
            name="pre-restore-20260509T030000Z",
            kind="pre_restore",
            status="running",
            created_at=silent,
            heartbeat_at=silent,
        )
        tasks.watch.apply()
        row.refresh_from_db()
        assert row.status == "running"
    finally:
        maintenance.leave()
