import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import CommandError, call_command
from django.db import connection

from tests.helpers import (
    backup_dirs,
    create_database,
    dump_name,
    replace_member,
    rewrite_manifest,
    spare_database,
    subprocess_env,
    tree,
)
from trusca.backups import maintenance, operations
from trusca.backups.models import Backup
from trusca.backups.operations import restore as restore_module
from trusca.portal import audit
from trusca.portal.models import AuditEvent, LicenseFinding, Project, Scan

# Rows the restore rewrites on purpose: the catalog is rebuilt from storage, later audit events
# are re-inserted, sessions are flushed, and the schedule's clock restarts from the restore (its
# last runs, and the change stamp that makes beat re-read it).
REWRITTEN = (
    "backups_backup",
    "portal_auditevent",
    "django_session",
    "django_celery_beat_periodictask",
    "django_celery_beat_periodictasks",
)


pytestmark = pytest.mark.usefixtures("drop_tables_made_after_backup")


def run(*args) -> list[str]:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().splitlines()


def take_backup() -> Path:
    path = Path(run("backup", "--no-prune")[-1])
    return path if path.is_absolute() else Path.cwd() / path


def restore(source, *extra) -> list[str]:
    return run("restore", str(source), "--yes", *extra)


def table_contents() -> dict[str, list[str]]:
    contents = {}
    with connection.cursor() as cursor:
        for table in sorted(connection.introspection.table_names(cursor)):
            if table in REWRITTEN:
                continue
            cursor.execute(f'SELECT * FROM "{table}"')
            contents[table] = sorted(repr(row) for row in cursor.fetchall())
    return contents


def sequences() -> dict[str, int]:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = current_schema()")
        else:
            cursor.execute("SELECT name, seq FROM sqlite_sequence")
        return {name: value for name, value in cursor.fetchall() if not name.startswith(REWRITTEN)}


def live_state() -> tuple:
    return table_contents(), sequences(), tree(settings.WORKSPACE_HOST_PATH)


def change_everything() -> None:
    project = Project.objects.create(name="after-the-backup")
    Scan.objects.create(project=project, revision="f" * 40)
    Project.objects.exclude(pk=project.pk).update(description="edited after the backup")
    LicenseFinding.objects.filter(pk__in=list(LicenseFinding.objects.values_list("pk", flat=True)[:5])).delete()
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE made_after_backup (id integer PRIMARY KEY)")
    ws = settings.WORKSPACE_HOST_PATH
    (ws / "new-scan").mkdir()
    (ws / "new-scan" / "file.txt").write_text("written after the backup")
    changed = next(ws.rglob("scancode.json"))
    changed.write_text("{}")


def test_a_round_trip_brings_back_every_row_sequence_and_file(demo):
    before = live_state()
    backup = take_backup()
    change_everything()
    assert live_state() != before
    lines = restore(backup)
    assert live_state() == before
    assert "made_after_backup" not in connection.introspection.table_names()
    revision = json.loads((backup / "manifest.json").read_text())["db_revision"]
    assert lines[-7:] == [
        "✓ database restored",
        "✓ workspace restored",
        lines[-5],
        "✓ portal back online",
        lines[-3],
        f"✓ db revision matches manifest ({revision})",
        "Restore complete",
    ]
    assert lines[-5].startswith("✓ sessions flushed, backup catalog rebuilt")
    assert lines[-3].startswith("✓ safety backup → ") and lines[-3].endswith("(restore it to undo this restore)")


def test_it_restores_from_a_bundle_and_by_name(demo):
    before = live_state()
    run("backup", "--no-prune", "--bundle")
    [directory] = backup_dirs()
    bundle = directory.with_name(f"{directory.name}.tar.gz")
    change_everything()
    restore(bundle, "--no-safety-backup")
    assert live_state() == before
    change_everything()
    restore(directory.name, "--no-safety-backup")
    assert live_state() == before


def test_a_session_valid_before_is_invalid_after(demo, superuser):
    backup = take_backup()
    session = SessionStore()
    session["_auth_user_id"] = str(superuser.pk)
    session.create()
    assert SessionStore().exists(session.session_key)
    restore(backup)
    assert not SessionStore().exists(session.session_key)


def test_later_backups_and_audit_events_survive_and_the_restore_is_recorded(demo):
    backup = take_backup()
    time.sleep(1)
    later = take_backup()
    audit.record(actor="alice", action="scan.finished", target="after-the-backup")
    lines = restore(backup)
    names = set(Backup.objects.values_list("name", flat=True))
    assert {backup.name, later.name} <= names
    assert any(n.startswith("pre-restore-") for n in names)
    assert AuditEvent.objects.filter(actor="alice", action="scan.finished").exists()
    assert AuditEvent.objects.filter(action="backup.restored", target=backup.name).exists()
    safety = [line for line in lines if line.startswith("✓ safety backup → ")]
    assert safety and Path(safety[0].split("→ ")[1].split(" ")[0]).is_dir()


def test_a_restore_without_a_workspace_archive_keeps_the_workspace(demo):
    backup = take_backup()
    rewrite_manifest(backup, lambda manifest: manifest["files"].pop("workspace.tar.gz"))
    (backup / "workspace.tar.gz").unlink()
    (settings.WORKSPACE_HOST_PATH / "kept.txt").write_text("still here")
    lines = restore(backup, "--no-safety-backup")
    assert (settings.WORKSPACE_HOST_PATH / "kept.txt").read_text() == "still here"
    assert "! workspace left as it is: the backup holds no workspace.tar.gz" in lines


# Failures midway leave everything as it was ----------------------------------------------------


def rewrite_dump(backup: Path, transform) -> None:
    """Change a backup's dump and re-sign it, so it passes preflight and fails while loading."""
    name = dump_name()
    replace_member(backup, name, transform(gzip.decompress((backup / name).read_bytes())))


def test_a_dump_failing_in_its_last_statement_changes_nothing(demo):
    backup = take_backup()
    change_everything()
    before = live_state()
    if connection.vendor == "postgresql":
        rewrite_dump(backup, lambda sql: sql + b"\nSELECT * FROM table_that_does_not_exist;\n")
        fault = "table_that_does_not_exist"
    else:
        rewrite_dump(backup, lambda db: db[: len(db) // 2] + b"\0" * (len(db) - len(db) // 2))
        fault = "SQLite"
    with pytest.raises(CommandError, match=f"Restore failed: restoring the database failed: .*{fault}.*unchanged"):
        restore(backup, "--no-safety-backup")
    assert live_state() == before
    assert not list(settings.WORKSPACE_HOST_PATH.parent.glob(".workspace.restore-*"))
    assert maintenance.active() is None


def test_a_restore_killed_while_loading_the_database_changes_nothing(transactional_db):
    # Enough rows that loading them takes a good fraction of a second on either engine.
    call_command("seed_demo", projects=2, scans=2, files=4, findings=40000, stdout=io.StringIO())
    backup = take_backup()
    change_everything()
    before = live_state()
    connection.close()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "restore", "--yes", "--no-safety-backup", str(backup)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=settings.BASE_DIR,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = operations.restore_status() or {}
        if status.get("step") == "restoring the database":
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.02)
    else:
        pytest.fail("the restore never reached the database step")
    time.sleep(0.1)
    assert proc.poll() is None, "the restore finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if connection.vendor == "postgresql":
        # psql sees end of input without COMMIT and the server rolls back; wait for it to go.
        for _ in range(200):
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'trusca-backup'")
                if cursor.fetchone()[0] == 0:
                    break
            time.sleep(0.05)
    assert proc.returncode == -signal.SIGKILL
    assert live_state() == before


# Bad archives are refused in preflight ---------------------------------------------------------


def refused(source, fault: str) -> None:
    before = live_state()
    with pytest.raises(CommandError, match=fault):
        restore(source)
    assert live_state() == before
    assert not [p for p in backup_dirs() if p.name.startswith("pre-restore-")]


def test_it_refuses_a_flipped_byte(demo):
    backup = take_backup()
    data = bytearray((backup / "workspace.tar.gz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (backup / "workspace.tar.gz").write_bytes(bytes(data))
    refused(backup, "workspace.tar.gz does not match its sha256")


def test_it_refuses_a_truncated_file(demo):
    backup = take_backup()
    dump = next(backup.glob("*.sql.gz"), None) or backup / "sqlite.db.gz"
    dump.write_bytes(dump.read_bytes()[:-100])
    refused(backup, f"{dump.name} is .* bytes; the manifest says .* \\(truncated or altered\\)")


def test_it_refuses_a_missing_manifest(demo):
    backup = take_backup()
    (backup / "manifest.json").unlink()
    refused(backup, "manifest.json is missing")


def test_it_refuses_a_backup_from_newer_migrations(demo):
    backup = take_backup()
    rewrite_manifest(backup, lambda manifest: manifest["migrations"].__setitem__("portal", "0042_from_the_future"))
    refused(backup, "taken by newer code.*portal.0042_from_the_future.*Deploy TRUSCA")


def test_an_older_backup_restores_and_says_to_migrate(demo):
    from django.db.migrations.recorder import MigrationRecorder

    MigrationRecorder.Migration.objects.filter(app="auth", name="0012_alter_user_first_name_max_length").delete()
    backup = take_backup()
    call_command("migrate", "auth", verbosity=0)
    lines = restore(backup, "--no-safety-backup")
    assert "! Run: python manage.py migrate" in lines
    assert any("predates migrations of this code (auth)" in line for line in lines)


def with_member(backup: Path, add) -> None:
    """Rebuild workspace.tar.gz with an extra hostile member and re-sign the manifest."""
    buffer = io.BytesIO()
    with tarfile.open(backup / "workspace.tar.gz", "r:gz") as src, tarfile.open(fileobj=buffer, mode="w") as dst:
        for info in src:
            dst.addfile(info, src.extractfile(info) if info.isreg() else None)
        add(dst)
    replace_member(backup, "workspace.tar.gz", buffer.getvalue())


def file_member(name: str, data: bytes = b"owned"):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    return add


def link_member(name: str, target: str, kind=tarfile.SYMTYPE):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tar.addfile(info)

    return add


def test_it_refuses_a_member_with_dotdot(demo):
    backup = take_backup()
    with_member(backup, file_member("1/../../escaped.txt"))
    refused(backup, "member '1/../../escaped.txt' contains '..'")


def test_it_refuses_an_absolute_member(demo):
    backup = take_backup()
    with_member(backup, file_member("/tmp/absolute.txt"))
    refused(backup, "member '/tmp/absolute.txt' has an absolute path")


def test_it_refuses_a_symlink_outside_followed_by_a_file_through_it(demo, tmp_path):
    backup = take_backup()

    def add(tar):
        link_member("escape", str(tmp_path / "outside"))(tar)
        file_member("escape/pwned.txt")(tar)

    with_member(backup, add)
    refused(backup, "symlink 'escape' points to the absolute path")
    assert not (tmp_path / "outside").exists()


def test_it_refuses_a_relative_symlink_climbing_out(demo):
    backup = take_backup()
    with_member(backup, lambda tar: (link_member("1/up", "../..")(tar), file_member("1/up/pwned.txt")(tar)))
    refused(backup, "member '1/up/pwned.txt' is written through the symlink '1/up'")


def test_it_refuses_a_file_written_through_an_inside_symlink(demo):
    backup = take_backup()
    with_member(backup, lambda tar: (link_member("alias", "1")(tar), file_member("alias/x.txt")(tar)))
    refused(backup, "member 'alias/x.txt' is written through the symlink 'alias'")


def test_it_refuses_a_hardlink_to_outside(demo):
    backup = take_backup()
    with_member(backup, link_member("passwd", "/etc/passwd", kind=tarfile.LNKTYPE))
    refused(backup, "hardlink 'passwd' points outside the archive")


def test_it_refuses_a_device_node(demo):
    backup = take_backup()

    def add(tar):
        info = tarfile.TarInfo("sda")
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(info)

    with_member(backup, add)
    refused(backup, "member 'sda' is a device or fifo")


# Asking ----------------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_it_refuses_without_a_terminal_or_yes(demo, monkeypatch):
    backup = take_backup()
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with pytest.raises(CommandError, match="no terminal to ask for confirmation on. Pass --yes"):
        run("restore", str(backup))


@pytest.fixture
def fresh_database_url(tmp_path):
    """The URL of a database that exists but was never migrated, as on a new host."""
    with spare_database("fresh", tmp_path / "fresh.sqlite3") as url:
        create_database(url)
        yield url


def test_a_restore_into_a_database_never_migrated_says_to_migrate_first(demo, fresh_database_url):
    backup = take_backup()
    workspace = tree(settings.WORKSPACE_HOST_PATH)
    refused = subprocess.run(
        [sys.executable, "manage.py", "restore", str(backup), "--yes"],
        env=subprocess_env(DATABASE_URL=fresh_database_url),
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "CommandError: the database (DATABASE_URL) holds no TRUSCA tables yet: run `manage.py migrate` first, then "
        "this command again (a restore replaces what migrate made). Nothing was changed."
    ]
    assert tree(settings.WORKSPACE_HOST_PATH) == workspace


@pytest.mark.parametrize("answer", ["\n", "n\n", "no\n", "maybe\n"])
def test_anything_but_yes_cancels(demo, monkeypatch, answer):
    backup = take_backup()
    change_everything()
    before = live_state()
    monkeypatch.setattr(sys, "stdin", FakeTerminal(answer))
    with pytest.raises(CommandError, match="Restore cancelled. Nothing was changed."):
        run("restore", str(backup))
    assert live_state() == before


def test_yes_at_the_prompt_restores_after_showing_what_will_happen(demo, monkeypatch):
    backup = take_backup()
    monkeypatch.setattr(sys, "stdin", FakeTerminal("y\n"))
    lines = run("restore", str(backup), "--no-safety-backup")
    text = "\n".join(lines)
    assert f"About to restore from {os.path.relpath(backup)}" in text or f"About to restore from {backup}" in text
    assert "! - REPLACE the current database content" in text
    assert f"! - REPLACE {settings.WORKSPACE_HOST_PATH} (if workspace.tar.gz present)" in text
    assert "! - LOSE everything written since " in text
    assert " UTC (just now), kind cli" in text
    assert "Continue? [y/N] " in text
    assert lines[-1] == "Restore complete"


def test_a_page_request_during_the_restore_gets_503_with_retry_after(demo, client, monkeypatch):
    backup = take_backup()
    seen = []
    original = restore_module._swap_in

    def swap_and_probe(journal):
        response = client.get("/admin/login/")
        seen.append((response.status_code, response.get("Retry-After")))
        original(journal)

    monkeypatch.setattr(restore_module, "_swap_in", swap_and_probe)
    restore(backup, "--no-safety-backup")
    assert seen == [(503, str(maintenance.RETRY_AFTER_SECONDS))]
    assert client.get("/admin/login/").status_code == 200


def test_a_second_restore_while_one_runs_is_refused(demo):
    from trusca.backups import locks

    backup = take_backup()
    with (
        locks.OperationLock("a manual backup"),
        pytest.raises(CommandError, match="a manual backup is already running"),
    ):
        restore(backup)


def test_an_archive_swapped_after_preflight_is_caught_before_anything_changes(demo, monkeypatch):
    backup = take_backup()
    (settings.WORKSPACE_HOST_PATH / "other.txt").write_text("a different workspace")
    other = take_backup()
    change_everything()
    before = live_state()
    checked = restore_module._preflight

    def preflight_then_swap(src, **options):
        plan = checked(src, **options)
        shutil.copyfile(other / "workspace.tar.gz", src.store.path(src.name) / "workspace.tar.gz")
        return plan

    monkeypatch.setattr(restore_module, "_preflight", preflight_then_swap)
    with pytest.raises(
        CommandError,
        match="staging the workspace failed: workspace.tar.gz (is .* bytes|does not match|decompresses).*unchanged",
    ):
        restore(backup, "--no-safety-backup")
    assert live_state() == before


def test_links_inside_the_workspace_come_back_as_links(demo):
    ws = settings.WORKSPACE_HOST_PATH
    (ws / "clone").mkdir()
    (ws / "clone" / "LICENSE").write_text("MIT License")
    os.symlink("LICENSE", ws / "clone" / "COPYING")
    os.link(ws / "clone" / "LICENSE", ws / "clone" / "LICENSE.hard")
    backup = take_backup()
    shutil.rmtree(ws / "clone")
    restore(backup, "--no-safety-backup")
    assert os.readlink(ws / "clone" / "COPYING") == "LICENSE"
    assert (ws / "clone" / "LICENSE.hard").read_text() == "MIT License"
    assert os.stat(ws / "clone" / "LICENSE.hard").st_ino == os.stat(ws / "clone" / "LICENSE").st_ino


def test_setuid_bits_do_not_survive_extraction(demo):
    backup = take_backup()

    def add(tar):
        info = tarfile.TarInfo("tool.sh")
        info.size, info.mode = 3, 0o4777
        tar.addfile(info, io.BytesIO(b"#!\n"))

    with_member(backup, add)
    restore(backup, "--no-safety-backup")
    assert (settings.WORKSPACE_HOST_PATH / "tool.sh").stat().st_mode & 0o7777 == 0o775


def chained_links(tar) -> None:
    """a -> . then b -> a/../outside-victim.txt: lexically inside, really outside (a/.. is the
    workspace's parent). With a file written through b, this overwrote a file beside the workspace."""
    link_member("a", ".")(tar)
    link_member("b", "a/../outside-victim.txt")(tar)


def test_a_link_chain_is_refused_by_verify_restore_and_a_bundle_and_touches_nothing_outside(demo):
    victim = settings.WORKSPACE_HOST_PATH.parent / "outside-victim.txt"
    victim.write_text("untouched")
    backup = take_backup()
    with_member(backup, chained_links)
    bundle = backup.with_name(f"{backup.name}.tar.gz")
    with tarfile.open(bundle, "w:gz") as tar:
        for name in ("manifest.json", dump_name(), "workspace.tar.gz"):
            tar.add(backup / name, arcname=name)
    for source in (backup, bundle):
        with pytest.raises(CommandError, match="symlink 'b' points outside the workspace"):
            call_command("verify_backup", str(source), stdout=io.StringIO())
        refused(source, "symlink 'b' points outside the workspace")
    assert victim.read_text() == "untouched"


def test_the_backups_own_row_and_other_runs_of_its_era_are_not_left_running(demo):
    backup = take_backup()
    restore(backup, "--no-safety-backup")
    assert not Backup.objects.filter(status__in=["queued", "running"]).exists()
    assert Backup.objects.get(name=backup.name).status == "succeeded"
