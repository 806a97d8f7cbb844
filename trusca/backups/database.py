"""Dump and restore the portal's database: PostgreSQL through pg_dump/psql, SQLite through its
online backup API. Both take and give uncompressed streams; the caller compresses and hashes.

A dump is hostile until its signature says otherwise, and even then psql runs it in restricted
mode, inside one transaction that the restore alone may commit, and that it checks is still its
own before it does."""

import contextlib
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.core import checks
from django.db import Error as DjangoDatabaseError
from django.db import connection

from trusca.backups import children

CHUNK = 1024 * 1024
# Where a restore records, inside its own transaction, that it committed: after a crash this
# row is the proof. Not backup data: forget_markers() drops it once the restore is finished.
MARKERS = "trusca_restore_commit"
_MARKER = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


class DatabaseError(Exception):
    """The dump or restore failed and the database is unchanged (a restore's rollback was
    verified)."""


class TransactionEndedEarly(DatabaseError):
    """The restore could not keep the database unchanged: the dump ended the restore's
    transaction itself, and part of it was (or may have been) committed. The message says what
    is known; it never claims a rollback."""


def engine() -> str:
    return "postgresql" if connection.vendor == "postgresql" else "sqlite"


def size() -> int:
    if engine() == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_database_size(current_database())")
            return cursor.fetchone()[0]
    path = Path(settings.DATABASES["default"]["NAME"])
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def dump(out: BinaryIO, *, progress: Callable[[int], None]) -> None:
    """Write the uncompressed dump into ``out``, reporting bytes as they pass. Whatever
    ``out.write`` raises (a full disk, a cancelled run) stops the dump and propagates."""
    if engine() == "postgresql":
        _pg_dump(out, progress)
    else:
        _sqlite_dump(out, progress)


def restore(source: BinaryIO, *, marker: str, before_commit: Callable[[], None]) -> None:
    """Load the uncompressed dump read from ``source`` in one transaction. Once ``source`` is
    read to its end, ``before_commit()`` runs (if it raises, everything rolls back); then
    ``marker`` is recorded inside the same transaction, which commits. ``committed(marker)``
    later says whether it did."""
    if not _MARKER.fullmatch(marker):
        raise ValueError(f"a restore marker is 1 to 200 of A-Z a-z 0-9 _ . : -, not {marker!r}")
    connection.close()
    if engine() == "postgresql":
        _psql_restore(source, marker, before_commit)
    else:
        _sqlite_restore(source, marker, before_commit)


def committed(marker: str) -> bool:
    with connection.cursor() as cursor:
        if engine() == "postgresql":
            _settle_restore_sessions(cursor)
            table = _pg_markers_table(cursor)
            cursor.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", [table])
        else:
            table = MARKERS
            cursor.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = %s", [table])
        if not cursor.fetchone()[0]:
            return False
        cursor.execute(f"SELECT count(*) FROM {table} WHERE marker = %s", [marker])  # noqa: S608 (our own name)
        return cursor.fetchone()[0] > 0


def _settle_restore_sessions(cursor) -> None:
    """Asked after a crash, with the restore's process gone (its lock broke): a server session of
    that restore may still be finishing a COMMIT psql sent just before it died, so the answer
    waits for it; one idle in its transaction has no client left to end it, so it is ended."""
    deadline = time.monotonic() + _stall_seconds()
    while True:
        cursor.execute(
            "SELECT pid, state FROM pg_catalog.pg_stat_activity "
            # This database's only: another installation on the same server may be restoring.
            "WHERE application_name LIKE 'trusca-restore-%%' AND datname = pg_catalog.current_database() "
            "AND pid <> pg_catalog.pg_backend_pid()"
        )
        sessions = cursor.fetchall()
        if not sessions:
            return
        for pid, state in sessions:
            if state and state.startswith("idle in transaction"):
                cursor.execute("SELECT pg_catalog.pg_terminate_backend(%s)", [pid])
        if time.monotonic() > deadline:
            raise DatabaseError(
                f"a restore's database session (server process {sessions[0][0]}) is still running after "
                f"{_stall_seconds()} s; whether it committed cannot be told yet. Try again once it has ended"
            )
        time.sleep(0.05)


def forget_markers() -> None:
    with connection.cursor() as cursor:
        table = _pg_markers_table(cursor) if engine() == "postgresql" else MARKERS
        cursor.execute(f"DROP TABLE IF EXISTS {table}")


def _chunks(read: Callable[[int], bytes]) -> Iterator[bytes]:
    while chunk := read(CHUNK):
        yield chunk


# PostgreSQL: tools and their versions ----------------------------------------------------------


def _pg_env(application_name: str = "trusca-backup") -> dict[str, str]:
    # Everything, the password above all, goes through the environment: nothing shows in `ps`.
    # What DATABASE_URL leaves out (a password, say) libpq takes from PG* variables or ~/.pgpass.
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    pairs = {
        "PGDATABASE": db["NAME"],
        "PGUSER": db.get("USER"),
        "PGPASSWORD": db.get("PASSWORD"),
        "PGHOST": db.get("HOST"),
        "PGPORT": str(db.get("PORT") or ""),
        "PGSSLMODE": db.get("OPTIONS", {}).get("sslmode"),
    }
    env.update({k: str(v) for k, v in pairs.items() if v})
    env["PGAPPNAME"] = application_name
    return env


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise DatabaseError(
            f"{name} is not installed; install the PostgreSQL client (e.g. apt install postgresql-client)"
        )
    return found


def _stall_seconds() -> int:
    return settings.BACKUP_STALL_SECONDS


def _version(tool: str) -> tuple[int, int | None]:
    proc = children.spawn([tool, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with children.Watchdog(proc, stall_seconds=_stall_seconds()) as watchdog:
        out = proc.communicate()[0].decode(errors="replace")
    if watchdog.stalled:
        raise DatabaseError(f"{tool} --version made no progress for {_stall_seconds()} s and was stopped")
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not match:
        raise DatabaseError(f"cannot read the version of {tool} from {out.strip()!r}")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def _server_major() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version_num")
        return int(cursor.fetchone()[0]) // 10000


def check_pg_dump_version() -> None:
    tool = _tool("pg_dump")
    client, server = _version(tool)[0], _server_major()
    if client < server:
        raise DatabaseError(
            f"pg_dump {client} is older than the PostgreSQL {server} server and cannot dump it; "
            f"install the PostgreSQL {server} client tools (postgresql-client-{server}) and run the backup again"
        )


# The first releases whose psql has \restrict (CVE-2025-8714); every release from 18 on has it.
_RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}


def _restricted_mode_problem(tool: str) -> str | None:
    major, minor = _version(tool)
    if major >= 18 or (major in _RESTRICT_SINCE and minor is not None and minor >= _RESTRICT_SINCE[major]):
        return None
    needed = (
        f"{major}.{_RESTRICT_SINCE[major]}"
        if major in _RESTRICT_SINCE
        else "/".join(f"{m}.{n}" for m, n in _RESTRICT_SINCE.items())
    )
    found = f"{major}.{minor}" if minor is not None else str(major)
    return (
        f"psql {found} has no restricted mode (\\restrict), which keeps a dump's psql meta-commands "
        f"(\\! and the like) from running during a restore; install psql {needed} or newer"
    )


# PostgreSQL: dump ----------------------------------------------------------------------------

# pg_dump's last words. 15.14 and later add their \unrestrict line after them.
_TRAILER = re.compile(rb"\n-- PostgreSQL database dump complete\n--\n\s*(?:\\unrestrict [A-Za-z0-9]+\n\s*)?\Z")


def _errors(raw: bytes) -> str:
    lines = [line.strip() for line in raw.decode(errors="replace").splitlines() if line.strip()]
    return "; ".join(lines[-3:]) or "no error output"


def _pg_dump(out: BinaryIO, progress: Callable[[int], None]) -> None:
    check_pg_dump_version()
    proc = children.spawn(
        [_tool("pg_dump"), "--clean", "--if-exists", "--no-password"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_pg_env(),
    )
    stderr = children.Drain(proc.stderr)
    tail = b""
    with children.Watchdog(proc, stall_seconds=_stall_seconds()) as watchdog:
        try:
            # read1: a slow pg_dump's every write counts as progress, not only whole chunks.
            while chunk := proc.stdout.read1(CHUNK):
                watchdog.progressed()
                with watchdog.paused():
                    out.write(chunk)
                    progress(len(chunk))
                tail = (tail + chunk[-512:])[-512:]
        except BaseException:
            children.kill(proc)
            raise
        finally:
            proc.stdout.close()
            returncode = proc.wait()
    errors = _errors(stderr.result())
    if watchdog.stalled:
        raise DatabaseError(f"pg_dump made no progress for {_stall_seconds()} s and was stopped")
    if returncode != 0:
        raise DatabaseError(f"pg_dump exited with status {returncode}: {errors}")
    if not _TRAILER.search(tail):
        raise DatabaseError(
            "pg_dump exited 0 but its output is incomplete: it does not end with pg_dump's completion "
            "trailer ('-- PostgreSQL database dump complete')"
        )


# PostgreSQL: restore -------------------------------------------------------------------------

# Sent before the dump. Outside the restore's transaction the session refuses writes, so a dump
# that ends the transaction early (COMMIT, ROLLBACK) cannot go on writing unless it turns that
# off on purpose. The first row psql prints identifies the transaction and the server process.
# pg_dump --clean drops only what the dump holds; tables made since (a newer migration's) must
# go too, so the result is exactly the backup. The dump itself is included from a pipe: at its
# end psql's lexer starts afresh, so whatever the dump leaves open (a quote, a COPY) cannot
# swallow or reinterpret the statements that close the restore.
_OPEN = """
SET default_transaction_read_only = on;
BEGIN READ WRITE;
SELECT pg_catalog.txid_current(), pid, extract(epoch FROM backend_start)::text
  FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid();
\\o /dev/null
SET LOCAL lock_timeout = '60s';
SET LOCAL client_min_messages = warning;
DO $trusca$
DECLARE r record;
BEGIN
  FOR r IN SELECT format('%I.%I', schemaname, viewname) AS obj FROM pg_views
           WHERE schemaname = current_schema() LOOP
    EXECUTE 'DROP VIEW IF EXISTS ' || r.obj || ' CASCADE';
  END LOOP;
  FOR r IN SELECT format('%I.%I', schemaname, matviewname) AS obj FROM pg_matviews
           WHERE schemaname = current_schema() LOOP
    EXECUTE 'DROP MATERIALIZED VIEW IF EXISTS ' || r.obj || ' CASCADE';
  END LOOP;
  FOR r IN SELECT format('%I.%I', schemaname, tablename) AS obj FROM pg_tables
           WHERE schemaname = current_schema() LOOP
    EXECUTE 'DROP TABLE IF EXISTS ' || r.obj || ' CASCADE';
  END LOOP;
  FOR r IN SELECT format('%I.%I', sequence_schema, sequence_name) AS obj FROM information_schema.sequences
           WHERE sequence_schema = current_schema() LOOP
    EXECUTE 'DROP SEQUENCE IF EXISTS ' || r.obj || ' CASCADE';
  END LOOP;
END
$trusca$;
\\i /dev/fd/{fd}
"""

# Sent after the dump and before_commit(). The dump may have redefined anything in the schemas
# it can write, so names resolve in pg_catalog only. The check raises unless this is still the
# transaction _OPEN began; its message carries a token the dump never saw. A marker table the
# dump made, whatever it is, is dropped: ours has no triggers or rules.
_CLOSE = """
SET LOCAL search_path = pg_catalog;
DO $trusca$ BEGIN
  IF txid_current_if_assigned() IS DISTINCT FROM {xid} THEN
    RAISE EXCEPTION 'trusca {token}: the restore''s transaction ended before its COMMIT';
  END IF;
END $trusca$;
DROP TABLE IF EXISTS {table} CASCADE;
CREATE TABLE {table} (marker text PRIMARY KEY, committed_at timestamptz NOT NULL DEFAULT now());
INSERT INTO {table} (marker) VALUES ('{marker}');
COMMIT;
"""


def _pg_markers_table(cursor) -> str:
    # Qualified with the schema Django works in, so that psql (whatever search_path a dump sets)
    # and committed() (through Django) name the same table.
    cursor.execute("SELECT current_schema()")
    schema = cursor.fetchone()[0]
    if schema is None:
        raise DatabaseError("the connection has no current schema to record the restore in; check its search_path")
    return '"{}".{}'.format(schema.replace('"', '""'), MARKERS)


class _Backend:
    """The server process running the restore, and the transaction it opened."""

    def __init__(self, line: bytes):
        match = re.fullmatch(rb"(\d+)\|(\d+)\|([0-9.]+)\n", line)
        if not match:
            raise DatabaseError(f"psql did not open the restore's transaction (it printed {line[:200]!r})")
        self.xid, self.pid, self.started = int(match[1]), int(match[2]), match[3].decode()

    _THIS = "pid = %s AND extract(epoch FROM backend_start)::text = %s"

    def busy(self) -> bool:
        """Still working on a statement (an index build, a long COPY), not waiting on a lock, a
        sleep or the client. Asked from the watchdog's thread, on a connection of its own."""
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT state, wait_event_type FROM pg_catalog.pg_stat_activity WHERE {self._THIS}",  # noqa: S608
                    [self.pid, self.started],
                )
                row = cursor.fetchone()
        finally:
            connection.close()
        return row is not None and row[0] == "active" and row[1] not in ("Lock", "Timeout", "Client")

    def fate(self, *, terminate: bool) -> str:
        """'committed' or 'aborted', once the transaction has ended. The backend is terminated
        first if psql did not end cleanly: one busy with a statement (or asleep) outlives its
        client, holding the transaction open."""
        with connection.cursor() as cursor:
            if terminate:
                cursor.execute(
                    f"SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE {self._THIS}",  # noqa: S608
                    [self.pid, self.started],
                )
            deadline = time.monotonic() + _stall_seconds()
            while True:
                cursor.execute("SELECT pg_catalog.txid_status(%s)", [self.xid])
                status = cursor.fetchone()[0]
                if status != "in progress":
                    return status
                if time.monotonic() > deadline:
                    raise TransactionEndedEarly(
                        f"the restore's transaction was still open {_stall_seconds()} s after psql ended "
                        f"(server process {self.pid}), so whether the database changed cannot be checked; "
                        "check it, or restore the safety backup"
                    )
                time.sleep(0.02)


_COMMITTED_EARLY = (
    "the dump ended the restore's transaction itself (a COMMIT inside it): what it had run up to that "
    "point, the removal of the existing tables included, was committed: the database is no longer as it "
    "was, and holds the backup only as far as the dump had got. Restore the safety backup (or another backup "
    "you trust)"
)
_ROLLED_BACK_EARLY = (
    "the dump ended the restore's transaction itself (a ROLLBACK inside it) and ran the rest of its "
    "statements outside it, where each commits on its own; the session refuses writes there unless the "
    "dump turned that off, so the database is not verified to be as it was. Check it, or restore the "
    "safety backup"
)


class _PsqlGone(Exception):
    """psql stopped reading: how it ended says why."""


def _send(pipe: BinaryIO, data) -> None:
    try:
        pipe.write(data)
        pipe.flush()
    except BrokenPipeError:
        raise _PsqlGone from None


def _psql_restore(source: BinaryIO, marker: str, before_commit: Callable[[], None]) -> None:
    tool = _tool("psql")
    problem = _restricted_mode_problem(tool)
    if problem:
        raise DatabaseError(f"{problem}. Nothing was changed.")
    with connection.cursor() as cursor:
        table = _pg_markers_table(cursor)
    key, token = secrets.token_hex(32), secrets.token_hex(16)
    dump_in, dump_out = os.pipe()
    try:
        proc = children.spawn(
            # Not --single-transaction: psql commits that at end of input, and a reader killed
            # halfway looks like end of input. Here COMMIT is sent only after the whole file was
            # read and checked.
            [tool, "--no-psqlrc", "--quiet", "--no-password", "--no-align", "--tuples-only", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_pg_env(f"trusca-restore-{token[:12]}"),
            pass_fds=(dump_in,),
        )
    except BaseException:
        os.close(dump_out)
        raise
    finally:
        os.close(dump_in)
    feed = open(dump_out, "wb")  # noqa: SIM115 (closed below, on every path)
    stderr = children.Drain(proc.stderr)
    backend = None
    watchdog = children.Watchdog(
        proc, stall_seconds=_stall_seconds(), busy=lambda: backend is not None and backend.busy()
    )
    try:
        with watchdog:
            try:
                _send(proc.stdin, _OPEN.replace("{fd}", str(dump_in)).encode())
                line = proc.stdout.readline()
                if not line:
                    raise _PsqlGone
                backend = _Backend(line)
                children.Drain(proc.stdout, keep=0)
                # Restricted mode with a key only this restore knows: no meta-command in the dump
                # (\!, \o |cmd, \copy ... program, \i, \unrestrict with a key it made up) can run.
                _send(feed, b"\\restrict %s\n" % key.encode())
                for chunk in _without_pg_dump_restrict(_paused_reads(source, watchdog)):
                    _send(feed, chunk)
                    watchdog.progressed()
                feed.close()
                if proc.poll() is None:
                    with watchdog.paused():
                        before_commit()
                    _send(proc.stdin, _CLOSE.format(xid=backend.xid, token=token, table=table, marker=marker).encode())
                proc.stdin.close()
            except _PsqlGone:
                pass
            except BaseException as exc:
                children.kill(proc)
                if backend is not None and backend.fate(terminate=True) == "committed":
                    raise TransactionEndedEarly(_COMMITTED_EARLY) from exc
                raise
            returncode = proc.wait()
    finally:
        for pipe in (feed, proc.stdin):
            with contextlib.suppress(OSError):
                pipe.close()
    errors = stderr.result()
    # Nothing is reported before the transaction's fate is known: never a rollback that was not.
    fate = backend.fate(terminate=returncode != 0) if backend is not None else "never began"
    if returncode == 0 and fate == "committed" and committed(marker):
        return
    if fate == "committed":
        raise TransactionEndedEarly(_COMMITTED_EARLY)
    if f"trusca {token}:".encode() in errors:
        raise TransactionEndedEarly(_ROLLED_BACK_EARLY)
    if watchdog.stalled:
        raise DatabaseError(f"psql made no progress for {_stall_seconds()} s and was stopped")
    raise DatabaseError(f"psql exited with status {returncode}: {_errors(errors)}")


def _paused_reads(source: BinaryIO, watchdog: children.Watchdog) -> Iterator[bytes]:
    # Time spent reading the source (decompressing, downloading) is not psql's to account for.
    while True:
        with watchdog.paused():
            chunk = source.read(CHUNK)
        if not chunk:
            return
        yield chunk


# pg_dump 15.14 and later write `\restrict KEY` among the comments that open a dump and
# `\unrestrict KEY` after its trailer. Under our own restriction psql would refuse both, so that
# \restrict line and every `\unrestrict KEY` line with its key are dropped (a line appended after
# pg_dump's end must still find its error reported); any other \restrict or \unrestrict passes
# and is refused, failing the restore. The head is parsed; the rest is searched by bytes.replace,
# about 0.1 s per GB, copying nothing unless it finds the line.
_HEAD_COMMENTS = re.compile(rb"(?:[ \t]*(?:--[^\n]*)?\n)*")
_PG_DUMP_RESTRICT = re.compile(rb"\\restrict ([A-Za-z0-9]+)[ \t]*\n")
_HEAD_LIMIT = 64 * 1024


def _without_pg_dump_restrict(chunks: Iterable[bytes]) -> Iterator[bytes]:
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        start = _HEAD_COMMENTS.match(head).end()
        if b"\n" in head[start:] or len(head) >= _HEAD_LIMIT:
            break
    start = _HEAD_COMMENTS.match(head).end()
    restrict = _PG_DUMP_RESTRICT.match(head, start)
    if not restrict:
        yield head
        yield from chunks
        return
    line = b"\n\\unrestrict " + restrict[1] + b"\n"
    overlap = len(line) - 1  # an unfinished line at the end of `pending` starts within its last `overlap` bytes
    pending = head[:start] + head[restrict.end() :]
    for chunk in chunks:
        if len(chunk) >= overlap and len(pending) >= overlap:
            spanning = (pending[-overlap:] + chunk[:overlap]).find(line)
            if spanning != -1:
                pending, chunk = pending[: len(pending) - overlap + spanning + 1], chunk[spanning + 1 :]
            yield pending.replace(line, b"\n")
            pending = chunk
        else:
            pending = (pending + chunk).replace(line, b"\n")
            if len(pending) >= 2 * overlap:
                yield pending[:-overlap]
                pending = pending[-overlap:]
    yield pending.replace(line, b"\n")


# SQLite --------------------------------------------------------------------------------------


def _sqlite_path() -> Path:
    return Path(settings.DATABASES["default"]["NAME"])


def _private_file(path: Path) -> Path:
    """A new empty file only we can read, at a fixed name: one a killed run left is replaced."""
    _remove(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    return path


def _remove(path: Path) -> None:
    for name in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
        name.unlink(missing_ok=True)


def _integrity_problems(db: sqlite3.Connection) -> str:
    rows = [row[0] for row in db.execute("PRAGMA integrity_check(3)")]
    return "" if rows == ["ok"] else "; ".join(rows)


def _sqlite_dump(out: BinaryIO, progress: Callable[[int], None]) -> None:
    live = _sqlite_path()
    snapshot = _private_file(live.with_name(f".{live.name}.snapshot"))
    try:
        # The online backup API copies a consistent snapshot while other processes keep writing.
        src = sqlite3.connect(f"{live.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(snapshot)
        try:
            src.backup(dst)
            problems = _integrity_problems(dst)
        finally:
            dst.close()
            src.close()
        if problems:
            raise DatabaseError(f"the SQLite snapshot of {live} fails its integrity check: {problems}")
        with open(snapshot, "rb") as fh:
            for chunk in _chunks(fh.read):
                out.write(chunk)
                progress(len(chunk))
    except sqlite3.Error as exc:
        raise DatabaseError(f"SQLite snapshot of {live} failed: {exc}") from None
    finally:
        _remove(snapshot)


def _sqlite_restore(source: BinaryIO, marker: str, before_commit: Callable[[], None]) -> None:
    live = _sqlite_path()
    staged = _private_file(live.with_name(f".{live.name}.restore"))
    try:
        with open(staged, "wb") as fh:
            for chunk in _chunks(source.read):
                fh.write(chunk)
        src = sqlite3.connect(staged)
        try:
            problems = _integrity_problems(src)
            if problems:
                raise DatabaseError(f"the dump does not hold an intact SQLite database: {problems}")
            before_commit()
            # A table of that name in the backup, or anything else by that name, goes first: ours
            # has no triggers. The marker thus lands in the live file with the copy, atomically.
            src.execute(f"DROP TABLE IF EXISTS {MARKERS}")
            src.execute(f"CREATE TABLE {MARKERS} (marker TEXT PRIMARY KEY, committed_at TEXT DEFAULT (datetime()))")
            src.execute(f"INSERT INTO {MARKERS} (marker) VALUES (?)", [marker])  # noqa: S608
            src.commit()
            # Copying pages into the live file is one write transaction: processes that hold the
            # file open (web, worker, beat) see the old database or the new one, never a mix,
            # which renaming a file over a WAL database they hold open would not give.
            dst = sqlite3.connect(live, timeout=60)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise DatabaseError(f"SQLite restore into {live} failed: {exc}; the live database is unchanged") from None
    finally:
        _remove(staged)


# System checks (registered in apps.py) ------------------------------------------------------


def check_restricted_psql(app_configs=None, **kwargs):
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        return []
    tool = shutil.which("psql")
    if tool is None:
        return []  # backups.E004 says so
    try:
        problem = _restricted_mode_problem(tool)
    except DatabaseError as exc:
        problem = str(exc)
    if not problem:
        return []
    return [
        checks.Error(
            problem,
            hint="Restores refuse to run without it. Install the PostgreSQL client tools of a current minor release.",
            id="backups.E005",
        )
    ]


def check_database_role(app_configs=None, databases=None, **kwargs):
    """Tagged ``database``: it runs with ``migrate`` and ``check --database default``, not at
    every start."""
    if not databases or "default" not in databases or engine() != "postgresql":
        return []
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT current_user, rolsuper, rolcreaterole,"
                " pg_catalog.pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER')"
                " FROM pg_catalog.pg_roles WHERE rolname = current_user"
            )
            row = cursor.fetchone()
    except DjangoDatabaseError:
        return []  # a database that cannot be reached is reported where it is used
    if row is None:
        return []
    user, superuser, createrole, programs = row
    powers = [
        what
        for what, held in (
            ("a superuser", superuser),
            ("a member of pg_execute_server_program", programs and not superuser),
            ("allowed to create roles (it can grant itself more)", createrole and not superuser),
        )
        if held
    ]
    if not powers:
        return []
    return [
        checks.Warning(
            f"the portal connects to PostgreSQL as {user}, which is {' and '.join(powers)}: a restored "
            "backup's SQL runs with those rights, and a dump could run programs on the database server "
            "with COPY ... TO PROGRAM",
            hint="Connect as a least-privilege role that owns the portal's database and nothing more; "
            "see 'A least-privilege database role' in the README.",
            id="backups.W001",
        )
    ]
