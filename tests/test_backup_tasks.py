import pytest
from celery.exceptions import Retry

from trusca.backups import maintenance, operations, tasks
from trusca.backups.models import Backup


@pytest.fixture
def queued(transactional_db) -> Backup:
    return operations.backup_enqueue(kind="manual", actor="root", send=lambda pk: None)


def test_the_task_runs_a_queued_backup_to_succeeded(queued):
    tasks.run_backup(queued.pk)
    queued.refresh_from_db()
    assert (queued.status, queued.progress) == ("succeeded", 100)
    assert queued.size_bytes > 0


def test_the_task_holds_back_while_maintenance_mode_is_on(queued):
    maintenance.enter("restoring auto-20260509T030000Z")
    try:
        with pytest.raises(Retry):
            tasks.run_backup.apply(args=[queued.pk], throw=True)
    finally:
        maintenance.leave()
    queued.refresh_from_db()
    assert queued.status == "queued"


def test_a_backup_already_claimed_is_not_run_twice(queued):
    tasks.run_backup(queued.pk)
    finished_at = Backup.objects.get(pk=queued.pk).finished_at
    tasks.run_backup(queued.pk)
    assert Backup.objects.get(pk=queued.pk).finished_at == finished_at
