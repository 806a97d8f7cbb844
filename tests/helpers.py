import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
from django.conf import settings
from django.db import connection

from trusca.backups import manifest


def backup_dirs() -> list[Path]:
    root = settings.BACKUP_ROOT
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, and every directory and link by name."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            if full.is_symlink():
                found[rel] = b"-> " + os.readlink(full).encode()
            elif full.is_file():
                found[rel] = full.read_bytes()
            else:
                found[rel] = b"<dir>"
    return found


def database_url() -> str:
    """The URL of the test database (not the one DATABASE_URL names) for another process."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = quote(db["USER"] or "", safe="") + (f":{quote(db['PASSWORD'], safe='')}" if db["PASSWORD"] else "")
    return f"postgres://{credentials}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextlib.contextmanager
def spare_database(suffix: str, sqlite_path: Path) -> Iterator[str]:
    """The URL of a database of the test's engine beside the test's own, which does not exist
    yet (``create_database`` makes it, as a new host's operator would) and is dropped afterwards."""
    if connection.vendor == "sqlite":
        yield f"sqlite:///{sqlite_path}"
        return
    name = f"{connection.settings_dict['NAME']}_{suffix}"
    url = database_url().rsplit("/", 1)[0]
    admin = f"{url}/postgres"
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    try:
        yield f"{url}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_database(url: str) -> None:
    """An empty database (SQLite makes its file on first use)."""
    if url.startswith("postgres"):
        base, name = url.rsplit("/", 1)
        with psycopg.connect(f"{base}/postgres", autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a manage.py, script or worker process that shares this test's
    database, directories and cache."""
    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "WORKSPACE_HOST_PATH": str(settings.WORKSPACE_HOST_PATH),
        "BACKUP_ROOT": str(settings.BACKUP_ROOT),
        "TRUSCA_VAR_DIR": str(settings.VAR_DIR),
        **extra,
    }


def fill_workspace(megabytes: int) -> None:
    """Scan-like text that compresses like real sources, so the archive takes long enough for
    the progress bar to be seen between 0 and 100."""
    letters = bytes.maketrans(bytes(range(256)), (b"abcdefghijklmnopqrstuvwxyz    \n" * 9)[:256])
    for i in range(megabytes):
        directory = settings.WORKSPACE_HOST_PATH / str(i // 10) / "source"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"file_{i:04}.txt").write_bytes(os.urandom(1 << 20).translate(letters))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite_manifest(backup: Path, edit) -> None:
    """Edit a backup's manifest as JSON, then sign it with this installation's key: what only
    someone holding BACKUP_SIGNING_KEY could do, to test the defences beneath the signature."""
    document = json.loads((backup / "manifest.json").read_text())
    edit(document)
    (backup / "manifest.json").write_bytes(manifest.from_document(document).signed().to_json())


def replace_member(backup: Path, name: str, content: bytes) -> None:
    """Give a backup's archive new (uncompressed) content, with a signed manifest to match."""
    compressed = gzip.compress(content)
    (backup / name).write_bytes(compressed)
    entry = {
        "size": len(compressed),
        "sha256": hashlib.sha256(compressed).hexdigest(),
        "uncompressed_size": len(content),
    }
    rewrite_manifest(backup, lambda document: document["files"].__setitem__(name, entry))


def dump_name() -> str:
    return "postgres.sql.gz" if connection.vendor == "postgresql" else "sqlite.db.gz"
