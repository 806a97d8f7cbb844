"""The database door: dumps that cannot lie about being complete, restores that run a hostile dump
in psql's restricted mode inside one transaction they verify before committing, and children that
are killed when they hang or when we die."""

import errno
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from tests.helpers import subprocess_env
from trusca.backups import database
from trusca.portal.models import Project

postgresql_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL engine only")

HEADER_END = b"SET row_security = off;\n"


def dump_bytes() -> bytes:
    out = io.BytesIO()
    database.dump(out, progress=lambda n: None)
    return out.getvalue()


def restore_bytes(data: bytes, *, marker: str = "restore-1", before_commit=lambda: None) -> None:
    database.restore(io.BytesIO(data), marker=marker, before_commit=before_commit)


def snapshot() -> dict[str, list[str]]:
    with connection.cursor() as cursor:
        contents = {}
        for table in sorted(connection.introspection.table_names(cursor)):
            cursor.execute(f'SELECT * FROM "{table}"')
            contents[table] = sorted(repr(row) for row in cursor.fetchall())
    return contents


@pytest.fixture
def genuine(demo):
    """A dump of the demo data; whatever a test does to the database, it is loaded back after."""
    data = dump_bytes()
    yield data
    connection.close()
    restore_bytes(data, marker="repair")
    database.forget_markers()


def changed_since_dump() -> dict[str, list[str]]:
    Project.objects.create(name="made after the dump")
    return snapshot()


def restore_sessions() -> int:
    """The restore's server sessions left after a moment to exit (a terminated backend takes a few ms)."""
    deadline = time.monotonic() + 5
    with connection.cursor() as cursor:
        while True:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'trusca-restore-%'")
            count = cursor.fetchone()[0]
            if not count or time.monotonic() > deadline:
                return count
            time.sleep(0.05)


def fake_tool(monkeypatch, tmp_path: Path, name: str, script: str) -> Path:
    """A shell script named ``name`` first on PATH; ``{real}`` in it names the real tool."""
    real = subprocess.run(["which", name], capture_output=True, text=True).stdout.strip()
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    tool = directory / name
    tool.write_text("#!/bin/sh\n" + script.replace("{real}", real) + "\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
    return directory


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_until_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def read_pids(path: Path, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.count("\n") >= count:
            return [int(x) for x in text.split()]
        time.sleep(0.02)
    pytest.fail(f"{path} was never written")


# Round trip, both engines ------------------------------------------------------------------


def test_a_round_trip_restores_every_row_and_records_its_marker_until_forgotten(demo):
    before = snapshot()
    data = dump_bytes()
    assert changed_since_dump() != before
    restore_bytes(data, marker="restore-42")
    assert database.committed("restore-42") and not database.committed("restore-43")
    database.forget_markers()
    assert not database.committed("restore-42")
    assert snapshot() == before


def test_before_commit_runs_once_the_whole_dump_was_read_and_a_failure_there_changes_nothing(demo):
    data = dump_bytes()
    changed = changed_since_dump()
    source = io.BytesIO(data)
    seen = []

    def before_commit():
        seen.append(source.tell())
        raise RuntimeError("the workspace could not be staged")

    with pytest.raises(RuntimeError, match="could not be staged"):
        database.restore(source, marker="restore-1", before_commit=before_commit)
    assert seen == [len(data)]
    assert not database.committed("restore-1")
    assert snapshot() == changed


def test_it_refuses_a_marker_it_could_not_record_verbatim(demo):
    with pytest.raises(ValueError, match="restore marker"):
        restore_bytes(b"", marker="x'); DROP TABLE portal_project; --")


def test_a_marker_table_the_dump_brings_cannot_hide_the_commit(demo, tmp_path):
    data = dump_bytes()
    if connection.vendor == "postgresql":
        data += (
            b"CREATE TABLE public.trusca_restore_commit (marker text);\n"
            b"CREATE RULE swallow AS ON INSERT TO public.trusca_restore_commit DO INSTEAD NOTHING;\n"
        )
    else:
        staged = tmp_path / "forged.sqlite3"
        staged.write_bytes(data)
        forged = sqlite3.connect(staged)
        forged.executescript(
            "CREATE TABLE trusca_restore_commit (marker TEXT);"
            "CREATE TRIGGER swallow AFTER INSERT ON trusca_restore_commit BEGIN DELETE FROM trusca_restore_commit; END;"
        )
        forged.close()
        data = staged.read_bytes()
    restore_bytes(data, marker="restore-7")
    assert database.committed("restore-7")
    database.forget_markers()


# Dumps that cannot pass for complete ----------------------------------------------------------


@postgresql_only
@pytest.mark.parametrize(
    "script",
    ['echo "garbage"; exit 0', '{real} "$@" | head -c 5000'],
    ids=["garbage", "truncated"],
)
def test_a_pg_dump_that_exits_0_without_its_trailer_makes_no_dump(demo, monkeypatch, tmp_path, script):
    fake_tool(monkeypatch, tmp_path, "pg_dump", 'case "$1" in --version) exec {real} --version;; esac\n' + script)
    with pytest.raises(database.DatabaseError, match="pg_dump exited 0 but its output is incomplete"):
        dump_bytes()


@postgresql_only
def test_a_hung_pg_dump_is_killed_with_all_it_started_after_the_stall_timeout(demo, monkeypatch, tmp_path):
    settings.BACKUP_STALL_SECONDS = 1
    pids = tmp_path / "pids"
    fake_tool(
        monkeypatch,
        tmp_path,
        "pg_dump",
        'case "$1" in --version) exec {real} --version;; esac\n'
        f'echo "-- started"\necho $$ > {pids}\nsleep 1000 &\necho $! >> {pids}\nwait',
    )
    started = time.monotonic()
    with pytest.raises(database.DatabaseError, match="pg_dump made no progress for 1 s and was stopped"):
        dump_bytes()
    assert time.monotonic() - started < 10
    assert wait_until_gone(read_pids(pids, 2)) == []


@postgresql_only
def test_a_slow_but_steady_pg_dump_is_not_a_stall(demo, monkeypatch, tmp_path):
    settings.BACKUP_STALL_SECONDS = 1
    fake_tool(
        monkeypatch,
        tmp_path,
        "pg_dump",
        'case "$1" in --version) exec {real} --version;; esac\n'
        'for i in 1 2 3 4 5; do echo "-- $i"; sleep 0.4; done\nexec {real} "$@"',
    )
    assert b"-- PostgreSQL database dump complete" in dump_bytes()


@postgresql_only
def test_a_full_disk_stops_pg_dump_and_the_error_reaches_the_caller(demo, monkeypatch, tmp_path):
    pids = tmp_path / "pids"
    fake_tool(
        monkeypatch,
        tmp_path,
        "pg_dump",
        f'case "$1" in --version) exec {{real}} --version;; esac\necho $$ > {pids}\nexec yes filler',
    )
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(OSError) as raised:
        database.dump(full, progress=lambda n: None)
    assert raised.value.errno == errno.ENOSPC
    assert wait_until_gone(read_pids(pids, 1)) == []


@postgresql_only
def test_pg_dump_dies_with_a_sigkilled_parent(demo, monkeypatch, tmp_path):
    pids = tmp_path / "pids"
    bin_dir = fake_tool(
        monkeypatch,
        tmp_path,
        "pg_dump",
        f'case "$1" in --version) exec {{real}} --version;; esac\necho $$ > {pids}\nexec sleep 1000',
    )
    connection.close()
    parent = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "import io; from trusca.backups import database; database.dump(io.BytesIO(), progress=print)",
        ],
        cwd=settings.BASE_DIR,
        env=subprocess_env(PATH=f"{bin_dir}:{os.environ['PATH']}"),
    )
    try:
        [child] = read_pids(pids, 1)
        assert alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert wait_until_gone([child]) == []


def test_the_sqlite_snapshot_is_private_while_it_is_taken_and_gone_after(demo):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite engine only")
    live = Path(settings.DATABASES["default"]["NAME"])
    modes = []

    class Recorder(io.BytesIO):
        def write(self, data):
            modes.extend(p.stat().st_mode & 0o777 for p in live.parent.glob(f".{live.name}.snapshot*"))
            return super().write(data)

    out = Recorder()
    database.dump(out, progress=lambda n: None)
    assert modes and set(modes) == {0o600}
    assert not list(live.parent.glob(f".{live.name}.snapshot*"))
    assert out.getvalue().startswith(b"SQLite format 3\0")


# psql runs restricted ---------------------------------------------------------------------------

# A forged dump with pg_dump's own opening and closing lines, or without them.
PG_DUMP_HEAD = b"--\n-- PostgreSQL database dump\n--\n\n\\restrict abc123\n\nSET row_security = off;\n"
PG_DUMP_TAIL = b"\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc123\n\n"
META_COMMANDS = {
    "shell": "\\! touch {pwned}",
    "pipe-output": "\\o |touch {pwned}\nSELECT 1;",
    "copy-program": "\\copy (SELECT 1) TO PROGRAM 'touch {pwned}'",
    "g-pipe": "SELECT 1 \\g |touch {pwned}",
    "include": "\\i {script}",
    "lift-with-the-dumps-key": "\\unrestrict abc123\n\\! touch {pwned}",
    "lift-with-another-key": "\\unrestrict zzz999\n\\! touch {pwned}",
}


@postgresql_only
@pytest.mark.parametrize("pg_dump_lines", [False, True], ids=["bare", "pg_dump-restrict-lines"])
@pytest.mark.parametrize("meta", META_COMMANDS.values(), ids=META_COMMANDS.keys())
def test_no_meta_command_in_a_dump_runs(transactional_db, tmp_path, meta, pg_dump_lines):
    pwned, script = tmp_path / "pwned", tmp_path / "script.sql"
    script.write_text(f"\\! touch {pwned}\n")
    Project.objects.create(name="kept")
    before = snapshot()
    evil = PG_DUMP_HEAD + meta.format(pwned=pwned, script=script).encode() + b"\nCREATE TABLE evil (x int);\n"
    if pg_dump_lines:
        evil += PG_DUMP_TAIL
    else:
        evil = evil.replace(b"\\restrict abc123\n", b"")
    with pytest.raises(database.DatabaseError, match="psql exited with status 3: .*(restricted|wrong key)"):
        restore_bytes(evil)
    assert not pwned.exists()
    assert snapshot() == before


def cut_randomly(data: bytes, rng: random.Random) -> list[bytes]:
    pieces, at = [], 0
    while at < len(data):
        size = rng.choice([1, 2, 7, 50, 80, 81, 82, 200, 5000])
        pieces.append(data[at : at + size])
        at += size
    return pieces


def test_pg_dumps_own_restrict_lines_are_dropped_however_the_stream_is_cut():
    key = b"k" * 64
    body = b"".join(b"INSERT INTO t VALUES (%d);\n" % i for i in range(300))
    dump = (
        b"--\n-- PostgreSQL database dump\n--\n\n\\restrict " + key + b"\n\n"
        b"SET x = 1;\n" + body + b"\\unrestrict " + key + b"\n" + body + b"\\unrestrict other\n"
        b"-- PostgreSQL database dump complete\n--\n\n\\unrestrict " + key + b"\n\n"
    )
    expected = (
        b"--\n-- PostgreSQL database dump\n--\n\n\n"
        b"SET x = 1;\n" + body + body + b"\\unrestrict other\n-- PostgreSQL database dump complete\n--\n\n\n"
    )
    rng = random.Random(7)
    for cut in [[dump]] + [cut_randomly(dump, rng) for _ in range(200)]:
        assert b"".join(database._without_pg_dump_restrict(cut)) == expected


@postgresql_only
def test_a_dump_read_in_odd_sized_pieces_restores(genuine):
    changed_since_dump()

    class Trickle(io.BytesIO):
        def read(self, n=-1):
            return super().read(min(n, 61))

    database.restore(Trickle(genuine), marker="trickled", before_commit=lambda: None)
    assert database.committed("trickled")
    assert not Project.objects.filter(name="made after the dump").exists()


# The transaction is the restore's to end ----------------------------------------------------------

EARLY_COMMITS = {
    "commit": b"COMMIT;\n",
    "end": b"END;\n",
    "mid-line": b"SELECT 1; commit;\n",
    "commit-and-chain": b"COMMIT AND CHAIN;\n",
}


@postgresql_only
@pytest.mark.parametrize("statement", EARLY_COMMITS.values(), ids=EARLY_COMMITS.keys())
def test_an_early_commit_is_reported_as_committed_never_as_rolled_back(genuine, statement):
    changed = changed_since_dump()
    with pytest.raises(database.TransactionEndedEarly) as raised:
        restore_bytes(genuine.replace(HEADER_END, HEADER_END + statement, 1))
    message = str(raised.value)
    assert "COMMIT inside it" in message and "was committed" in message and "rolled back" not in message
    # What the restore had run by then, removing the existing tables, was committed indeed.
    assert snapshot() != changed
    assert "portal_project" not in connection.introspection.table_names()
    assert not database.committed("restore-1")


@postgresql_only
def test_an_early_commit_followed_by_a_failing_statement_is_still_reported_as_committed(genuine):
    changed = changed_since_dump()
    trailer = genuine.index(b"\n--\n-- PostgreSQL database dump complete")
    forged = genuine[:trailer] + b"\nCOMMIT;\nSELECT * FROM table_that_does_not_exist;\n" + genuine[trailer:]
    with pytest.raises(database.TransactionEndedEarly, match="was committed"):
        restore_bytes(forged)
    # The whole dump had loaded when it committed: the rows made since are gone, for good.
    assert snapshot() != changed
    assert not Project.objects.filter(name="made after the dump").exists()


@postgresql_only
def test_an_early_rollback_cannot_go_on_writing_outside_the_transaction(genuine):
    changed = changed_since_dump()
    with pytest.raises(database.DatabaseError, match="read-only transaction") as raised:
        restore_bytes(genuine.replace(HEADER_END, HEADER_END + b"ROLLBACK;\n", 1))
    assert not isinstance(raised.value, database.TransactionEndedEarly)
    assert snapshot() == changed


@postgresql_only
def test_an_early_rollback_that_lifts_read_only_and_goes_on_is_reported_as_such(genuine):
    changed_since_dump()
    forged = genuine.replace(HEADER_END, HEADER_END + b"ROLLBACK; SET default_transaction_read_only = off;\n", 1)
    with pytest.raises(database.TransactionEndedEarly) as raised:
        restore_bytes(forged)
    message = str(raised.value)
    assert "ROLLBACK inside it" in message and "not verified to be as it was" in message
    # The rest of the dump ran statement by statement and stayed: the row made since is gone.
    assert not Project.objects.filter(name="made after the dump").exists()
    assert not database.committed("restore-1")


@postgresql_only
def test_a_rollback_as_the_dumps_last_word_is_caught_before_commit(genuine):
    changed = changed_since_dump()
    with pytest.raises(database.TransactionEndedEarly, match="ROLLBACK inside it"):
        restore_bytes(genuine + b"ABORT;\n")
    assert snapshot() == changed


# Watchdog on psql ---------------------------------------------------------------------------------


@postgresql_only
def test_a_restore_asleep_on_the_server_is_stopped_rolled_back_and_its_session_ended(genuine):
    settings.BACKUP_STALL_SECONDS = 1
    changed = changed_since_dump()
    started = time.monotonic()
    with pytest.raises(database.DatabaseError, match="psql made no progress for 1 s and was stopped"):
        restore_bytes(genuine + b"SELECT pg_sleep(10000);\n")
    assert time.monotonic() - started < 15
    assert restore_sessions() == 0
    assert snapshot() == changed


@postgresql_only
def test_a_restore_waiting_on_a_lock_is_stopped_and_rolled_back(genuine):
    import psycopg

    settings.BACKUP_STALL_SECONDS = 1
    changed = changed_since_dump()
    db = connection.settings_dict
    with psycopg.connect(
        dbname=db["NAME"], user=db["USER"], host=db["HOST"], port=db["PORT"] or 5432, password=db["PASSWORD"]
    ) as other:
        other.execute("LOCK TABLE portal_project IN ACCESS SHARE MODE")
        with pytest.raises(database.DatabaseError, match="psql made no progress for 1 s"):
            restore_bytes(genuine)
    assert restore_sessions() == 0
    assert snapshot() == changed


@postgresql_only
def test_a_long_statement_the_server_is_working_on_is_progress(genuine):
    settings.BACKUP_STALL_SECONDS = 1
    changed_since_dump()
    started = time.monotonic()
    # Three seconds on the CPU, as an index build would be: active, and waiting on nothing.
    busy = b"DO $$ BEGIN WHILE clock_timestamp() < statement_timestamp() + interval '3 s' LOOP END LOOP; END $$;\n"
    restore_bytes(genuine + busy, marker="long")
    assert time.monotonic() - started > 3
    assert database.committed("long")


@postgresql_only
def test_time_spent_by_the_caller_is_not_a_stall(genuine):
    settings.BACKUP_STALL_SECONDS = 1

    class CongestedUpload(io.BytesIO):
        def write(self, data):
            if not self.tell():
                time.sleep(1.5)
            return super().write(data)

    out = CongestedUpload()
    database.dump(out, progress=lambda n: None)
    assert out.getvalue().count(b"PostgreSQL database dump complete") == 1
    # The workspace is still being staged when the dump has been read.
    database.restore(io.BytesIO(out.getvalue()), marker="patient", before_commit=lambda: time.sleep(2.5))
    assert database.committed("patient")


@postgresql_only
def test_a_source_that_fails_midway_stops_psql_and_changes_nothing(genuine):
    changed = changed_since_dump()

    class Broken(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 16 * 1024:
                raise OSError("connection reset while downloading the backup")
            return super().read(min(n, 8 * 1024))

    with pytest.raises(OSError, match="connection reset"):
        database.restore(Broken(genuine), marker="restore-1", before_commit=lambda: None)
    assert restore_sessions() == 0
    assert snapshot() == changed


# System checks ----------------------------------------------------------------------------------


@postgresql_only
@pytest.mark.parametrize(
    ("version", "needed"),
    [("15.13", "15.14"), ("17.5", "17.6"), ("13.21", "13.22"), ("12.22", "13.22/14.19/15.14/16.10/17.6")],
)
def test_a_psql_without_restricted_mode_is_a_check_error_and_restores_refuse(
    demo, monkeypatch, tmp_path, version, needed
):
    fake_tool(monkeypatch, tmp_path, "psql", f'echo "psql (PostgreSQL) {version} (Debian {version}-1)"')
    [error] = database.check_restricted_psql()
    assert error.id == "backups.E005" and f"install psql {needed} or newer" in error.msg
    before = snapshot()
    with pytest.raises(database.DatabaseError, match=f"psql {version} has no restricted mode.*Nothing was changed"):
        restore_bytes(b"SELECT 1;\n")
    assert snapshot() == before


@postgresql_only
@pytest.mark.parametrize("version", ["15.14", "16.10", "17.6", "18.0", "19devel"])
def test_a_psql_with_restricted_mode_passes_the_check(monkeypatch, tmp_path, version):
    fake_tool(monkeypatch, tmp_path, "psql", f'echo "psql (PostgreSQL) {version}"')
    assert database.check_restricted_psql() == []


@postgresql_only
def test_a_superuser_connection_is_warned_about_and_a_plain_role_is_not(transactional_db):
    assert database.check_database_role() == []  # only with --database, as migrate runs it
    [warning] = database.check_database_role(databases=["default"])
    assert warning.id == "backups.W001" and "superuser" in warning.msg and "TO PROGRAM" in warning.msg
    role = f"{connection.settings_dict['NAME']}_plain"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{role}" NOLOGIN')
        try:
            cursor.execute(f'SET ROLE "{role}"')
            assert database.check_database_role(databases=["default"]) == []
        finally:
            cursor.execute("RESET ROLE")
            cursor.execute(f'DROP ROLE "{role}"')


@postgresql_only
def test_settling_after_a_crash_leaves_another_databases_restore_alone(transactional_db):
    # Another installation on the same server, mid-restore: its psql session is idle in its
    # transaction while it waits for the next bytes of its dump.
    db = connection.settings_dict
    other = psycopg.connect(
        host=db["HOST"] or "localhost",
        port=db["PORT"] or 5432,
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname="postgres",
        application_name="trusca-restore-elsewhere",
    )
    try:
        other.execute("SELECT 1")  # psycopg opened a transaction: idle in it now
        assert database.committed("no-such-marker") is False
        assert other.execute("SELECT 2").fetchone() == (2,), "its session was not ended"
    finally:
        other.close()
