"""Ctrl-C (SIGINT) and SIGTERM sent to real commands mid-run: they stop within a second or two,
remove what they were writing, print one line, exit 130 or 143, and leave nothing held."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from tests.helpers import backup_dirs, subprocess_env
from trusca.backups import locks, maintenance, operations, store
from trusca.backups.models import Backup

pytestmark = pytest.mark.usefixtures("drop_tables_made_after_backup")
SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
# Stopping must not wait for the work to end: well under the time the work itself takes.
STOP_WITHIN_SECONDS = 3


def big_workspace(megabytes: int) -> None:
    """Incompressible files, so that archiving and copying them takes a while."""
    directory = settings.WORKSPACE_HOST_PATH / "1" / "source"
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(megabytes // 16):
        (directory / f"blob{i}.bin").write_bytes(os.urandom(16 << 20))


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        env=subprocess_env(),
        cwd=settings.BASE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}: {proc.communicate()}")
        time.sleep(0.005)
    pytest.fail(f"never saw {what}")


def interrupt(proc: subprocess.Popen, signum: int) -> tuple[str, str, float]:
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    return out, err, time.monotonic() - sent


def running_row() -> bool:
    return Backup.objects.filter(status="running", progress__gt=0).exists()


def assert_nothing_held() -> None:
    assert locks.current() is None
    assert maintenance.active() is None
    assert store.local().partial_names() == []


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_an_interrupted_backup_removes_its_partial_files_and_marks_the_row(demo, signum, code):
    big_workspace(256)
    proc = start("backup")
    wait_for(running_row, proc, "the backup making progress")
    out, err, took = interrupt(proc, signum)
    assert proc.returncode == code
    assert took < STOP_WITHIN_SECONDS
    assert err.strip().splitlines() == [
        "Backup interrupted: the partial backup was removed and nothing else was changed."
    ]
    assert "Traceback" not in out + err
    assert backup_dirs() == []
    assert_nothing_held()
    row = Backup.objects.get()
    assert (row.status, row.message) == ("failed", "interrupted")
    call_command("backup", "--no-prune", stdout=io.StringIO())  # the next one starts at once
    assert len(backup_dirs()) == 1


def test_an_interrupted_bundle_is_removed_and_the_backup_stays_good(demo):
    big_workspace(512)
    proc = start("backup", "--bundle")
    local = store.local()
    wait_for(lambda: any(n.endswith(".tar.gz") for n in local.partial_names()), proc, "the bundle being written")
    out, err, took = interrupt(proc, signal.SIGINT)
    assert proc.returncode == 130
    assert took < STOP_WITHIN_SECONDS
    assert "Traceback" not in out + err
    [directory] = backup_dirs()
    assert not directory.with_name(f"{directory.name}.tar.gz").exists()
    assert_nothing_held()
    assert Backup.objects.get().status == "succeeded"
    call_command("verify_backup", directory.name, stdout=io.StringIO())


def test_an_interrupted_verify_of_a_bundle_removes_what_it_unpacked(demo):
    big_workspace(512)
    call_command("backup", "--no-prune", "--bundle", stdout=io.StringIO())
    [directory] = backup_dirs()
    proc = start("verify_backup", str(directory.with_name(f"{directory.name}.tar.gz")))
    wait_for(lambda: store.local().partial_names(), proc, "the bundle being unpacked")
    out, err, took = interrupt(proc, signal.SIGINT)
    assert proc.returncode == 130
    assert took < STOP_WITHIN_SECONDS
    assert err.strip().splitlines() == ["Verify interrupted: nothing was changed."]
    assert_nothing_held()


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_restore_interrupted_before_its_commit_changes_nothing(demo, signum, code):
    from tests.test_restore_command import change_everything, live_state

    big_workspace(256)
    backup = Path(settings.BACKUP_ROOT) / _backup_name()
    change_everything()
    before = live_state()
    proc = start("restore", "--yes", "--no-safety-backup", str(backup))
    wait_for(lambda: (operations.restore_status() or {}).get("step") == "restoring the database", proc, "the load")
    out, err, took = interrupt(proc, signum)
    assert proc.returncode == code
    assert took < STOP_WITHIN_SECONDS
    assert err.strip().splitlines() == ["Restore interrupted: nothing was changed."]
    assert "Traceback" not in out + err
    _wait_for_the_server_to_roll_back()
    assert live_state() == before
    assert_nothing_held()
    assert not maintenance.journal_path().exists()
    assert not list(settings.WORKSPACE_HOST_PATH.parent.glob(".workspace.restore-*"))


def _backup_name() -> str:
    out = io.StringIO()
    call_command("backup", "--no-prune", stdout=out)
    return Path(out.getvalue().splitlines()[-1]).name


def _wait_for_the_server_to_roll_back() -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    for _ in range(200):
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'trusca%%restore%%'")
            if cursor.fetchone()[0] == 0:
                return
        time.sleep(0.05)
