"""The nightly backup end to end: a real beat (DatabaseScheduler) sends daily-auto-backup, a real
worker takes it from the backups queue on the real Redis, retention follows, and the lines the
manual's troubleshooting greps for are in both logs.

Waiting for midnight, or even for the next minute, is not needed to see beat fire on schedule:
at 00:00 every night beat holds a crontab whose fire time has just passed and a last run a day
before it, and that state is made here, at the current minute, while beat runs."""

import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask, PeriodicTasks

from tests.integration.beat import running_beat
from trusca.backups import operations, store
from trusca.backups.models import Backup
from trusca.backups.schedule import DAILY

pytestmark = pytest.mark.integration

RUN_TIMEOUT_SECONDS = 60
SENT = f"Sending due task {DAILY} (trusca.backups.tasks.auto_backup)"
FINISHED = re.compile(r"Task trusca\.backups\.tasks\.auto_backup\[[^]]+\] succeeded in ")
TOKEN = "monitor-token-" + "m" * 24


def set_daily(*, minute: str, hour: str, last_run_at) -> None:
    task = PeriodicTask.objects.get(name=DAILY)
    CrontabSchedule.objects.filter(pk=task.crontab_id).update(minute=minute, hour=hour)
    PeriodicTask.objects.filter(pk=task.pk).update(last_run_at=last_run_at)
    PeriodicTasks.update_changed()


def wait_for_auto_runs(worker_log: Path, count: int) -> list[Backup]:
    """The auto backups once the worker has finished ``count`` runs of the task (pruning included)."""
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while len(FINISHED.findall(worker_log.read_text())) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{count} run(s) of the auto backup task did not finish in {RUN_TIMEOUT_SECONDS} s")
        time.sleep(0.2)
    return list(Backup.objects.filter(kind="auto").order_by("created_at", "id"))


def test_beat_sends_the_nightly_backup_catches_up_a_missed_night_once_and_retention_follows(
    celery_worker, tmp_path, client, settings
):
    settings.BACKUP_HEALTH_TOKEN = TOKEN
    (settings.WORKSPACE_HOST_PATH / "scan.json").write_text('{"license": "MIT"}\n' * 500)
    with time_machine.travel(timezone.now() - timedelta(days=settings.BACKUP_RETENTION_DAYS + 3)):
        old_auto = operations.backup_create(kind="auto", actor="test", prune=False).backup.name
        old_manual = operations.backup_create(kind="manual", actor="test", prune=False).backup.name
    worker_log = tmp_path / "worker.log"  # where the celery_worker fixture writes

    # On time, beat running.
    start = timezone.now().replace(microsecond=0)
    with running_beat(tmp_path / "beat-1.log") as beat:
        set_daily(minute=str(start.minute), hour=str(start.hour), last_run_at=start - timedelta(days=1))
        [first] = wait_for_auto_runs(worker_log, 1)  # the old one was pruned after it
        assert first.status == "succeeded", first.message
        assert first.name.startswith("auto-") and first.actor == "schedule"

        health = client.get("/admin/health", headers={"accept": "application/json", "authorization": f"Bearer {TOKEN}"})
        assert health.status_code == 200
        assert {name: check["state"] for name, check in health.json()["checks"].items()} == dict.fromkeys(
            health.json()["checks"], "ok"
        ), health.json()
        assert health.json()["status"] == "ok"
    beat_log = (tmp_path / "beat-1.log").read_text()
    assert beat.returncode is not None
    assert beat_log.count(SENT) == 1
    assert worker_log.read_text().count(f"backup.completed {first.name} (auto, ") == 1, "one line, not one per handler"
    # Retention ran after it: the old auto backup went, the old manual one stays.
    assert f"backup.pruned {old_auto} (older than {settings.BACKUP_RETENTION_DAYS} days)" in worker_log.read_text()
    stored = {b.name for b in store.local().list()}
    assert old_auto not in stored
    assert {old_manual, first.name} <= stored

    # Beat down across the fire time: three nights went by without it, and the crontab's hour is
    # twelve hours from now, outside the two hours django-celery-beat reads crontabs for.
    away = timezone.now() + timedelta(hours=12)
    set_daily(minute="0", hour=str(away.hour), last_run_at=timezone.now() - timedelta(days=3))
    with running_beat(tmp_path / "beat-2.log"):
        wait_for_auto_runs(worker_log, 2)
        time.sleep(3)  # three of beat's one-second ticks, were it to send the same night again
    [again, second] = wait_for_auto_runs(worker_log, 2)
    assert again == first
    assert second.status == "succeeded", second.message
    beat_log = (tmp_path / "beat-2.log").read_text()
    assert beat_log.count(SENT) == 1
    assert f"{DAILY} did not run at " in beat_log and "(beat was down); sending it once now" in beat_log
    assert f"backup.completed {second.name} (auto, " in worker_log.read_text()
    assert timezone.now() - PeriodicTask.objects.get(name=DAILY).last_run_at < timedelta(seconds=30)
    assert old_manual in {b.name for b in store.local().list()}
