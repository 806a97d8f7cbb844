"""Celery wrappers: they take an id, call the operation, and own the retries."""

import contextlib
import logging
from typing import NoReturn

from celery import shared_task
from celery.signals import beat_init, before_task_publish, worker_ready
from django.conf import settings

from trusca.backups import alerts, locks, maintenance, operations, schedule
from trusca.backups.models import Backup
from trusca.backups.operations.lifecycle import reason
from trusca.backups.operations.reverify import reverify_stored

log = logging.getLogger("trusca.backups")
# A restore keeps maintenance mode for minutes, not hours; looking again this often starts the
# backup soon after it ends without busying the queue.
MAINTENANCE_RETRY_SECONDS = 30
# The nightly backup waiting for another backup or restore to finish looks again this often,
# and says so in the log every tenth time.
BUSY_RETRY_SECONDS = 30
BUSY_LOG_EVERY = 10
SCHEDULE_ACTOR = "schedule"
SWEEP_RETRY_SECONDS = 600
SWEEP_TRIES = 24


@shared_task(bind=True, max_retries=None)
def run_backup(self, backup_id: int) -> None:
    if maintenance.active():
        # A restore is replacing the database and workspace this backup would read.
        raise self.retry(countdown=MAINTENANCE_RETRY_SECONDS)
    # A failure is recorded on the row, in the audit log and as one log line; nothing to retry.
    with contextlib.suppress(operations.OperationFailed):
        operations.backup_run_queued(backup_id=backup_id, offload=offload_backup.delay)


@shared_task(bind=True, max_retries=None)
def offload_backup(self, name: str, actor: str = "system") -> None:
    """The off-host copy of a backup that succeeded (or a retry from the list), then of whatever
    else the bucket lacks, then the bucket's retention."""
    if maintenance.active():
        # The catalog it writes to is being replaced; the copy waits for the restore to end.
        raise self.retry(countdown=MAINTENANCE_RETRY_SECONDS)
    # Failures are recorded on the rows, in the audit log and as log lines; the next backup and
    # the list's Retry try again.
    with contextlib.suppress(operations.OperationFailed):
        operations.offload_run(name=name, actor=actor)


@shared_task
def run_restore(restore_id: str) -> None:
    # The outcome is kept with the job, which the admin follows, and in the audit log. Not
    # retried: the operator who reads why it failed decides whether to ask again.
    with contextlib.suppress(operations.OperationFailed):
        operations.restore_run_queued(restore_id=restore_id)


@shared_task(bind=True, max_retries=None)
def auto_backup(self) -> None:
    """The nightly backup: the same queued backup as the admin's button, kind auto. While another
    backup or a restore holds the lock it waits and runs after; it is never skipped for a backup
    taken by hand."""
    if not settings.BACKUP_DAILY_ENABLED:
        log.warning("%s not run: BACKUP_DAILY_ENABLED is false for this worker", schedule.DAILY)
        return
    if done := _answered_already():
        # The same send delivered twice (the broker redelivers a message unacknowledged for an
        # hour), or several nights' sends queued while no worker ran: one backup answers them.
        log.info("%s not run again: %s answers beat's last send", schedule.DAILY, done.name)
        return
    if maintenance.active():
        _wait(self, "a restore is running")
    try:
        queued = operations.backup_enqueue(kind=Backup.Kind.AUTO, actor=SCHEDULE_ACTOR, send=lambda pk: None)
    except locks.Busy as exc:
        _wait(self, str(exc))
    except Exception as exc:
        # Not even started (BACKUP_ROOT unusable, the database away): unexpected, so the
        # traceback goes to the log, and the operator is told.
        alerts.auto_backup_failed(schedule.DAILY, f"not started: {reason(exc)}")
        raise
    try:
        operations.backup_run_queued(backup_id=queued.pk)
    except operations.OperationFailed:
        # Logged as backup.failed with the reason, without a traceback: an expected failure.
        failed = Backup.objects.get(pk=queued.pk)
        alerts.auto_backup_failed(failed.name, failed.message)


def _answered_already() -> Backup | None:
    sent = schedule.last_sent()
    if sent is None:
        return None
    # Backup names and created_at have whole seconds.
    return (
        Backup.objects.filter(kind=Backup.Kind.AUTO, created_at__gte=sent.replace(microsecond=0))
        .exclude(status=Backup.Status.FAILED)
        .first()
    )


def _wait(task, why: str) -> NoReturn:
    if task.request.retries % BUSY_LOG_EVERY == 0:
        log.info("%s waits: %s; trying again every %d s", schedule.DAILY, why, BUSY_RETRY_SECONDS)
    raise task.retry(countdown=BUSY_RETRY_SECONDS)


@shared_task(bind=True, max_retries=SWEEP_TRIES)
def retention_sweep(self) -> None:
    """The daily retention, also when no nightly backup ran to prune after itself. Under the
    lock: a restore may be reading the oldest backup."""
    try:
        if maintenance.active():
            raise locks.Busy({"what": "a restore"})
        with locks.OperationLock("the retention sweep"):
            operations.backup_prune()
    except locks.Busy as exc:
        if self.request.retries >= SWEEP_TRIES:
            log.warning("retention sweep skipped today: %s all day; it runs again tomorrow", exc)
            return
        raise self.retry(countdown=SWEEP_RETRY_SECONDS)
    # The bucket keeps its own days (BACKUP_S3_RETENTION_DAYS) and needs no lock: copies claim rows.
    try:
        operations.offsite_prune()
    except operations.OperationFailed as exc:
        log.warning("retention in the bucket skipped today: %s", exc)


@shared_task(bind=True, max_retries=SWEEP_TRIES)
def verify_sweep(self) -> None:
    if maintenance.active():
        if self.request.retries >= SWEEP_TRIES:
            log.warning("weekly verification skipped: maintenance mode all day; it runs again next week")
            return
        raise self.retry(countdown=SWEEP_RETRY_SECONDS)
    report = reverify_stored()
    log.info("weekly verification: %d intact, %d damaged", len(report.intact), len(report.damaged))
    if report.damaged:
        alerts.backups_damaged(report.damaged)


@shared_task
def watch() -> None:
    if maintenance.active():
        # A restore that runs is left alone (its tables are being replaced); one whose process
        # was killed is finished or undone now, not at the next restart.
        if recovered := operations.restore_recover():
            log.warning("%s", recovered)
        return
    for line in operations.sweep():
        log.warning("%s", line)
    alerts.check_last_auto()
    alerts.check_backup_age()


@shared_task(bind=True)
def beat_heartbeat(self) -> None:
    """Beat records its own heartbeat when it sends this; the worker that runs it records that a
    worker took it from the backups queue, which the health page cites when no worker answers."""
    schedule.worker_took_heartbeat(self.request.hostname)


@worker_ready.connect
def sweep_at_start(**kwargs) -> None:
    """A worker that starts finishes what a killed one left: a restore's journal, dead runs."""
    for line in operations.sweep():
        log.warning("%s", line)


@beat_init.connect
def schedule_at_beat_start(sender, **kwargs) -> None:
    before_task_publish.connect(_beat_sends)
    schedule.at_beat_start(sender.scheduler)


def _beat_sends(sender=None, headers=None, **kwargs) -> None:
    schedule.before_publish(headers or {})
