"""Celery wrappers: they take an id, call the operation, and own the retries."""

import contextlib
import logging

from celery import shared_task
from celery.signals import worker_ready

from trusca.backups import maintenance, operations

log = logging.getLogger("trusca.backups")
# A restore keeps maintenance mode for minutes, not hours; looking again this often starts the
# backup soon after it ends without busying the queue.
MAINTENANCE_RETRY_SECONDS = 30


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


@worker_ready.connect
def sweep_at_start(**kwargs) -> None:
    """A worker that starts finishes what a killed one left: a restore's journal, dead runs."""
    for line in operations.sweep():
        log.warning("%s", line)
