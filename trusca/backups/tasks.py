"""Celery wrappers: they take an id, call the operation, and own the retries."""

from celery import shared_task

from trusca.backups import maintenance, operations

# A restore keeps maintenance mode for minutes, not hours; looking again this often starts the
# backup soon after it ends without busying the queue.
MAINTENANCE_RETRY_SECONDS = 30


@shared_task(bind=True, max_retries=None)
def run_backup(self, backup_id: int) -> None:
    if maintenance.active():
        # A restore is replacing the database and workspace this backup would read.
        raise self.retry(countdown=MAINTENANCE_RETRY_SECONDS)
    operations.backup_run_queued(backup_id=backup_id)
