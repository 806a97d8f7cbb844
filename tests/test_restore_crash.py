"""A restore killed at any step is finished or undone by whatever starts next: both-old or
both-new, never a mix, with the audit events kept and the portal closed until then."""

import subprocess
import sys
import time

import pytest
from django.conf import settings
from django.core.management import call_command

from tests.helpers import subprocess_env
from tests.test_restore_command import change_everything, live_state, run, take_backup
from trusca.backups import locks, maintenance
from trusca.backups.models import Backup
from trusca.portal import audit
from trusca.portal.models import AuditEvent

pytestmark = pytest.mark.usefixtures("drop_tables_made_after_backup")

# Where the restore is killed, and what the next start must make of it.
BEFORE_COMMIT = ["after-staging"]
AFTER_COMMIT = ["after-commit", "mid-swap", "after-swap", "before-audit"]
# With the portal back online: the safety backup is being finished from the replaced workspace.
ONLINE = ["safety-archived", "before-cleanup"]


def restore_killed_at(point: str, backup, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "restore", "--yes", *extra, str(backup)],
        env=subprocess_env(TRUSCA_TEST_KILL_AT=point),
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def scene(demo):
    """A backup, then changes after it, an audit event among them: (backup, state at backup
    time, state before the restore)."""
    backup = take_backup()
    at_backup = live_state()
    time.sleep(1)  # audit events after the backup's second
    change_everything()
    audit.record(actor="alice", action="scan.finished", target="after-the-backup")
    return backup, at_backup, live_state()


def test_a_restore_killed_before_maintenance_mode_leaves_nothing_to_finish(scene):
    backup, _, before = scene
    killed = restore_killed_at("before-maintenance", backup)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert maintenance.active() is None and not maintenance.journal_path().exists()
    run("verify_backup", str(backup))  # the next command
    assert locks.current() is None, "the dead holder's lock is freed"
    assert live_state() == before
    assert not Backup.objects.filter(name__startswith="pre-restore-").exists()


@pytest.mark.parametrize("point", BEFORE_COMMIT + AFTER_COMMIT + ONLINE)
def test_a_killed_restore_is_finished_or_undone_by_the_next_command(scene, point):
    backup, at_backup, before = scene
    killed = restore_killed_at(point, backup)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    if point in ONLINE:
        assert maintenance.active() is None and maintenance.journal_path().exists()
    else:
        assert maintenance.active() is not None, "the journal keeps the portal closed until the next start"

    lines = run("verify_backup", str(backup))  # any command: it sweeps first

    assert maintenance.active() is None
    assert not maintenance.journal_path().exists()
    assert not list(settings.WORKSPACE_HOST_PATH.parent.glob(".workspace.restore-*"))
    assert AuditEvent.objects.filter(actor="alice", action="scan.finished").exists()
    if point in BEFORE_COMMIT:
        assert live_state() == before
        assert any("undid the interrupted restore" in line for line in lines)
        assert not AuditEvent.objects.filter(action="backup.restored").exists()
    else:
        assert live_state() == at_backup
        assert any("finished the interrupted restore" in line for line in lines)
        assert AuditEvent.objects.filter(action="backup.restored", target=backup.name).count() == 1
        assert Backup.objects.filter(name=backup.name).exists()
        # The safety backup holds the state the restore replaced, whole and restorable.
        [safety] = Backup.objects.filter(name__startswith="pre-restore-")
        assert safety.status == "succeeded"
        run("verify_backup", safety.name)


def test_a_restore_killed_after_its_commit_is_finished_by_resume(scene):
    backup, at_backup, _before = scene
    assert restore_killed_at("mid-swap", backup).returncode == -9
    lines = run("restore", "--resume")
    assert lines == ["✓ workspace restored", lines[1], "✓ portal back online", lines[3], lines[4]]
    assert lines[3].startswith("✓ safety backup → ")
    assert lines[4].startswith("✓ finished the interrupted restore")
    assert live_state() == at_backup
    assert run("restore", "--resume") == ["No interrupted restore to finish (or it is still running)."]


def test_finishing_twice_keeps_the_audit_events_once(scene):
    backup, at_backup, _before = scene
    assert restore_killed_at("before-audit", backup).returncode == -9
    run("restore", "--resume")
    events = AuditEvent.objects.filter(actor="alice", action="scan.finished").count()
    # The journal is gone once finished; a second pass has nothing to repeat.
    run("restore", "--resume")
    assert AuditEvent.objects.filter(actor="alice", action="scan.finished").count() == events == 1
    assert live_state() == at_backup


def test_the_safety_copy_of_a_restore_undone_before_its_commit_is_dropped(scene):
    backup, _at_backup, before = scene
    killed = restore_killed_at("after-staging", backup)
    assert killed.returncode == -9
    call_command("backup", "--no-prune", stdout=open("/dev/null", "w"))
    [safety] = [b for b in Backup.objects.all() if b.name.startswith("pre-restore-")]
    assert safety.status == "failed" and safety.message.startswith("not needed")
    assert not (settings.BACKUP_ROOT / safety.name).exists()
    assert live_state()[0] == before[0]
