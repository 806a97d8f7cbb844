import gzip
import io
import json
import os
import subprocess
import tarfile

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection

from tests.helpers import backup_dirs, sha256_of
from trusca.backups.models import Backup
from trusca.backups.terminal import display_path
from trusca.portal.models import AuditEvent, Scan


def run_backup(*args) -> list[str]:
    from io import StringIO

    out = StringIO()
    call_command("backup", *args, stdout=out)
    return out.getvalue().splitlines()


def row_counts() -> dict[str, int]:
    counts = {}
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f'SELECT COUNT(*) FROM "{table}"')
            counts[table] = cursor.fetchone()[0]
    return counts


def test_it_writes_three_files_and_prints_the_path_last(demo):
    lines = run_backup()
    [directory] = backup_dirs()
    dump = "postgres.sql.gz" if connection.vendor == "postgresql" else "sqlite.db.gz"
    assert sorted(p.name for p in directory.iterdir()) == sorted([dump, "manifest.json", "workspace.tar.gz"])
    assert lines[0] == f"Backup → {display_path(directory)}"
    assert lines[1].startswith(f"✓ wrote {display_path(directory)}/{dump} (")
    assert lines[2].startswith(f"✓ wrote {display_path(directory)}/workspace.tar.gz (")
    assert lines[-3].startswith(f"✓ wrote {display_path(directory)}/manifest.json (db revision = ")
    assert lines[-2:] == ["Backup complete", display_path(directory)]
    assert Backup.objects.get(name=directory.name).kind == "cli"


def test_the_archives_pass_gunzip_and_tar_and_the_checksums_match(demo):
    run_backup()
    [directory] = backup_dirs()
    manifest = json.loads((directory / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        subprocess.run(["gunzip", "-t", str(directory / name)], check=True)
        assert (directory / name).stat().st_size == entry["size"]
        assert sha256_of(directory / name) == entry["sha256"]
    listing = subprocess.run(
        ["tar", "-tzf", str(directory / "workspace.tar.gz")], check=True, capture_output=True, text=True
    ).stdout.split()
    scan = Scan.objects.first()
    assert f"{scan.pk}/scancode/scancode.json" in listing
    assert f"{scan.pk}/cdxgen/bom.json" in listing
    for key in (
        "format",
        "timestamp",
        "kind",
        "engine",
        "db_revision",
        "migrations",
        "db_size",
        "workspace_path",
        "app_version",
        "files",
        "signature",
    ):
        assert key in manifest
    assert manifest["alembic_head"] == manifest["db_revision"]
    assert manifest["workspace_path"] == str(settings.WORKSPACE_HOST_PATH)
    assert len(manifest["db_revision"]) == 12
    assert manifest["migrations"]["portal"] == "0001_initial"


def test_the_postgres_dump_loads_by_hand_into_an_empty_database(demo):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL engine only")
    expected = row_counts()
    expected["backups_backup"] += 1  # the backup's own row, status running, is in its dump
    run_backup()
    [directory] = backup_dirs()
    db = settings.DATABASES["default"]
    scratch = f"{db['NAME']}_byhand"
    env = {**os.environ, "PGHOST": db["HOST"] or "", "PGPORT": str(db["PORT"] or ""), "PGUSER": db["USER"] or ""}
    subprocess.run(["dropdb", "--if-exists", scratch], env=env, check=True)
    subprocess.run(["createdb", scratch], env=env, check=True)
    try:
        subprocess.run(
            f"gunzip -c {directory}/postgres.sql.gz | psql -q -v ON_ERROR_STOP=1 -d {scratch}",
            shell=True,
            env=env,
            check=True,
            capture_output=True,
        )
        for table, count in expected.items():
            out = subprocess.run(
                ["psql", "-tAc", f'SELECT COUNT(*) FROM "{table}"', "-d", scratch],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            assert int(out) == count, table
    finally:
        subprocess.run(["dropdb", "--if-exists", scratch], env=env, check=True)


def fake_pg_dump(monkeypatch, tmp_path, script: str) -> None:
    """Put a shell script named pg_dump first on PATH; ``{real}`` in it names the real one."""
    real = subprocess.run(["which", "pg_dump"], capture_output=True, text=True).stdout.strip()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pg_dump").write_text("#!/bin/sh\n" + script.replace("{real}", real) + "\n")
    (fake / "pg_dump").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


def test_the_sqlite_snapshot_loads_by_hand(demo, tmp_path):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite engine only")
    import sqlite3

    expected = row_counts()
    expected["backups_backup"] += 1  # the backup's own row, status running, is in its dump
    run_backup()
    [directory] = backup_dirs()
    restored = tmp_path / "by-hand.sqlite3"
    restored.write_bytes(gzip.decompress((directory / "sqlite.db.gz").read_bytes()))
    db = sqlite3.connect(restored)
    for table, count in expected.items():
        assert db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0] == count, table


def test_the_bundle_holds_the_three_files(demo):
    lines = run_backup("--bundle")
    [directory] = backup_dirs()
    bundle = directory.with_name(f"{directory.name}.tar.gz")
    assert any(line.startswith(f"✓ wrote {display_path(bundle)}") for line in lines)
    with tarfile.open(bundle, "r:gz") as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and "workspace.tar.gz" in names and len(names) == 3
    call_command("verify_backup", str(bundle), stdout=open(os.devnull, "w"))


def test_it_fails_cleanly_when_the_workspace_cannot_be_read(demo):
    settings.WORKSPACE_HOST_PATH = settings.WORKSPACE_HOST_PATH / "does-not-exist"
    with pytest.raises(CommandError, match="workspace directory .* does not exist"):
        run_backup()
    assert backup_dirs() == []
    assert not any(settings.BACKUP_ROOT.iterdir())
    row = Backup.objects.get()
    assert row.status == "failed" and "does not exist" in row.message


def test_it_fails_cleanly_when_pg_dump_fails(demo, monkeypatch, tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL engine only")
    fake_pg_dump(
        monkeypatch,
        tmp_path,
        'case "$1" in --version) exec {real} --version;; esac\n'
        '{real} "$@" | head -c 2000\necho "pg_dump: error: connection lost" >&2\nexit 1',
    )
    with pytest.raises(CommandError, match="pg_dump exited with status 1: pg_dump: error: connection lost"):
        run_backup()
    assert not any(settings.BACKUP_ROOT.iterdir())
    assert Backup.objects.get().status == "failed"


def test_it_refuses_a_pg_dump_older_than_the_server(demo, monkeypatch, tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL engine only")
    fake_pg_dump(monkeypatch, tmp_path, 'echo "pg_dump (PostgreSQL) 9.6.24"')
    with pytest.raises(CommandError, match=r"pg_dump 9 is older than the PostgreSQL \d+ server"):
        run_backup()
    assert not any(settings.BACKUP_ROOT.iterdir())


def test_it_fails_cleanly_when_the_disk_is_full(demo, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        (settings.WORKSPACE_HOST_PATH / "big.bin").write_bytes(os.urandom(512 * 1024))
        settings.BACKUP_ROOT = small / "backups"
        with pytest.raises(CommandError, match="No space left on device"):
            run_backup()
        assert list(settings.BACKUP_ROOT.iterdir()) == []
        assert Backup.objects.get().status == "failed"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_second_backup_while_one_runs_is_refused(demo):
    from trusca.backups import locks

    with locks.OperationLock("a restore"), pytest.raises(CommandError, match="a restore is already running"):
        run_backup()
    assert backup_dirs() == []


def test_the_row_records_size_revision_and_manifest(demo):
    run_backup()
    row = Backup.objects.get()
    [directory] = backup_dirs()
    assert row.status == "succeeded" and row.progress == 100
    assert row.size_bytes == sum(p.stat().st_size for p in directory.iterdir())
    assert row.db_revision == row.manifest["db_revision"]
    assert AuditEvent.objects.filter(action="backup.created", target=row.name).exists()


def test_the_database_password_never_reaches_a_command_line(demo, monkeypatch, tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL engine only")
    # Trust authentication ignores the password, so it can be set to a marker and traced.
    monkeypatch.setitem(settings.DATABASES["default"], "PASSWORD", "hunter2-do-not-leak")
    trace = tmp_path / "trace"
    fake_pg_dump(
        monkeypatch, tmp_path, f'echo "ARGS $*" >> {trace}\necho "ENV $PGPASSWORD" >> {trace}\nexec {{real}} "$@"'
    )
    lines = run_backup()
    args = [line for line in trace.read_text().splitlines() if line.startswith("ARGS")]
    assert args and not any("hunter2" in line for line in args)
    assert "ENV hunter2-do-not-leak" in trace.read_text()
    [directory] = backup_dirs()
    assert b"hunter2" not in (directory / "manifest.json").read_bytes()
    assert not any("hunter2" in line for line in lines)


def test_a_backup_that_loses_its_lock_stops_and_says_so(demo):
    from tests.test_interruptions import big_workspace, start, wait_for
    from trusca.backups import locks

    big_workspace(256)
    proc = start("backup")
    wait_for(lambda: Backup.objects.filter(status="running", progress__gt=0).exists(), proc, "the backup running")
    # Another process breaks the lock (as after BACKUP_STALE_SECONDS of silence) and takes it.
    (settings.VAR_DIR / "operation.lock").unlink()
    with locks.OperationLock("a restore"):
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Backup failed: lost the operation lock" in err
    assert "the partial backup was removed" in err
    assert backup_dirs() == []
    assert Backup.objects.get().status == "failed"


def test_the_bundle_is_at_most_half_a_percent_larger_than_the_backup(demo):
    from tests.test_interruptions import big_workspace

    big_workspace(32)
    run_backup("--bundle")
    [directory] = backup_dirs()
    files = sum(p.stat().st_size for p in directory.iterdir())
    bundle = directory.with_name(f"{directory.name}.tar.gz").stat().st_size
    assert files < bundle <= files * 1.005
    subprocess.run(["gunzip", "-t", str(directory.with_name(f"{directory.name}.tar.gz"))], check=True)


def test_a_full_disk_while_writing_the_bundle_removes_it_and_keeps_the_backup(demo, tmp_path):
    from tests.test_interruptions import big_workspace

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        big_workspace(16)  # 16 MB that do not compress: the backup fits, the bundle beside it does not
        settings.BACKUP_ROOT = small / "backups"
        out = io.StringIO()
        with pytest.raises(
            CommandError,
            match="Bundle failed: No space left on device.*the partial bundle was removed; the backup itself is good",
        ):
            call_command("backup", "--bundle", stdout=out)
        [directory] = backup_dirs()
        assert sorted(p.name for p in settings.BACKUP_ROOT.iterdir()) == [directory.name]
        call_command("verify_backup", str(directory), stdout=io.StringIO())
        assert Backup.objects.get().status == "succeeded"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_progress_moves_inside_one_large_file_on_the_terminal_and_in_the_row(demo):
    import pty
    import re
    import sys
    import time

    from tests.helpers import subprocess_env

    letters = bytes.maketrans(bytes(range(256)), (b"abcdefghijklmnopqrstuvwxyz    \n" * 9)[:256])
    with open(settings.WORKSPACE_HOST_PATH / "one-large-clone.txt", "wb") as fh:
        for _ in range(384):
            fh.write(os.urandom(1 << 20).translate(letters))
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "backup", "--no-prune"],
        env=subprocess_env(),
        cwd=settings.BASE_DIR,
        stdout=subprocess.DEVNULL,
        stderr=secondary,
    )
    os.close(secondary)
    rows, terminal = set(), b""
    while proc.poll() is None:
        rows |= set(Backup.objects.filter(status="running").values_list("progress", flat=True))
        try:
            terminal += os.read(primary, 65536)
        except OSError:
            break
        time.sleep(0.05)
    proc.wait()
    os.close(primary)
    assert proc.returncode == 0
    shown = {int(p) for p in re.findall(rb"\] +(\d+)%", terminal)}
    assert len({p for p in shown if 0 < p < 100}) >= 3, shown
    assert len({p for p in rows if 0 < p < 100}) >= 3, rows
