"""Dump and restore the portal's database: PostgreSQL through pg_dump/psql, SQLite through its
online backup API. Both write through ``gz`` and report uncompressed bytes as they go."""

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import connection

from trusca.backups import gz

Progress = Callable[[int], None]


class DatabaseError(Exception):
    pass


class TransactionEndedEarly(DatabaseError):
    pass


MARKER_TABLE = "trusca_restore_commit"


def engine() -> str:
    return "postgresql" if connection.vendor == "postgresql" else "sqlite"


def size() -> int:
    if engine() == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_database_size(current_database())")
            return cursor.fetchone()[0]
    path = Path(settings.DATABASES["default"]["NAME"])
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def dump(out, *, progress: Progress) -> None:
    if engine() == "postgresql":
        _pg_dump(out, progress)
    else:
        _sqlite_dump(out, progress)


def restore(source, *, marker: str, before_commit: Callable[[], None]) -> None:
    """Load a dump in one transaction. It commits only once every byte was read and
    ``before_commit`` returned, with ``marker`` recorded in the same transaction."""
    connection.close()
    if engine() == "postgresql":
        _psql_restore(source, marker, before_commit)
    else:
        _sqlite_restore(source, marker, before_commit)


def committed(marker: str) -> bool:
    connection.close()
    with connection.cursor() as cursor:
        if MARKER_TABLE not in connection.introspection.table_names(cursor):
            return False
        cursor.execute(f"SELECT 1 FROM {MARKER_TABLE} WHERE marker = %s", [marker])  # noqa: S608
        return cursor.fetchone() is not None


def forget_markers() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {MARKER_TABLE}")


# PostgreSQL ----------------------------------------------------------------------------------


def _pg_env() -> dict[str, str]:
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
    env["PGAPPNAME"] = "trusca-backup"
    return env


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise DatabaseError(
            f"{name} is not installed; install the PostgreSQL client (e.g. apt install postgresql-client)"
        )
    return found


def _client_major(tool: str) -> int:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    if not match:
        raise DatabaseError(f"cannot read the version of {tool} from {out.strip()!r}")
    return int(match.group(1))


def _server_major() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version_num")
        return int(cursor.fetchone()[0]) // 10000


def check_pg_dump_version() -> None:
    tool = _tool("pg_dump")
    client, server = _client_major(tool), _server_major()
    if client < server:
        raise DatabaseError(
            f"pg_dump {client} is older than the PostgreSQL {server} server and cannot dump it; "
            f"install the PostgreSQL {server} client tools (postgresql-client-{server}) and run the backup again"
        )


def _stderr_tail(fh) -> str:
    fh.seek(0)
    lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    return "; ".join(lines[-3:]) or "no error output"


def _pg_dump(out, progress: Progress) -> None:
    check_pg_dump_version()
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [_tool("pg_dump"), "--clean", "--if-exists", "--no-password"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=_pg_env(),
        )
        try:
            while chunk := proc.stdout.read(gz.CHUNK):
                out.write(chunk)
                progress(len(chunk))
        except BaseException:
            proc.kill()
            raise
        finally:
            proc.stdout.close()
            returncode = proc.wait()
        if returncode != 0:
            raise DatabaseError(f"pg_dump exited with status {returncode}: {_stderr_tail(stderr)}")


# Runs before the dump inside the restore's transaction. pg_dump --clean drops only what the dump
# holds; tables made since (a newer migration's) must go too, so the result is exactly the backup.
_DROP_EVERYTHING = """
BEGIN;
SET LOCAL lock_timeout = '60s';
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
"""


def _psql_restore(source, marker: str, before_commit: Callable[[], None]) -> None:
    # Not --single-transaction: psql commits that at end of input, and a reader killed halfway
    # looks like end of input. Here COMMIT is sent only after the whole file was read and checked.
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [_tool("psql"), "--no-psqlrc", "--quiet", "--no-password", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_pg_env(),
        )
        error = None
        try:
            proc.stdin.write(_DROP_EVERYTHING.encode())
            while chunk := source.read(gz.CHUNK):
                proc.stdin.write(chunk)
            before_commit()
            proc.stdin.write(
                f"\nRESET search_path;\nCREATE TABLE IF NOT EXISTS {MARKER_TABLE} (marker text PRIMARY KEY);\n"
                f"INSERT INTO {MARKER_TABLE} VALUES ('{marker}');\nCOMMIT;\n".encode()
            )
        except BrokenPipeError:
            pass  # psql stopped reading: its exit status and stderr say why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            returncode = proc.wait()
        if returncode != 0:
            raise DatabaseError(f"psql exited with status {returncode}: {_stderr_tail(stderr)}")
        if error:
            raise DatabaseError(error)


# SQLite --------------------------------------------------------------------------------------


def _sqlite_path() -> Path:
    return Path(settings.DATABASES["default"]["NAME"])


def _sqlite_dump(out, progress: Progress) -> None:
    live = _sqlite_path()
    snapshot = live.with_name(f".{live.name}.snapshot-{os.getpid()}")
    try:
        # The online backup API copies a consistent snapshot while other processes keep writing.
        src = sqlite3.connect(f"{live.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(snapshot)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        with open(snapshot, "rb") as fh:
            while chunk := fh.read(gz.CHUNK):
                out.write(chunk)
                progress(len(chunk))
    except sqlite3.Error as exc:
        raise DatabaseError(f"SQLite snapshot of {live} failed: {exc}") from None
    finally:
        snapshot.unlink(missing_ok=True)


def _sqlite_restore(source, marker: str, before_commit: Callable[[], None]) -> None:
    live = _sqlite_path()
    staged = live.with_name(f".{live.name}.restore")
    staged.unlink(missing_ok=True)
    try:
        with open(staged, "xb") as out:
            while chunk := source.read(gz.CHUNK):
                out.write(chunk)
        src = sqlite3.connect(staged)
        try:
            if src.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise DatabaseError("the dump does not hold an intact SQLite database")
            before_commit()
            src.execute(f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (marker text PRIMARY KEY)")
            src.execute(f"INSERT INTO {MARKER_TABLE} VALUES (?)", [marker])  # noqa: S608
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
        staged.unlink(missing_ok=True)
