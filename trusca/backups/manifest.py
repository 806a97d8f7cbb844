"""manifest.json: what a backup holds, and the database revision it was taken at."""

import hashlib
import json
import os
from pathlib import Path

from django.db import connection
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder

FORMAT = 1
MANIFEST = "manifest.json"
WORKSPACE_ARCHIVE = "workspace.tar.gz"
DUMP_FILES = {"postgresql": "postgres.sql.gz", "sqlite": "sqlite.db.gz"}
REQUIRED_KEYS = (
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
)
# Bigger than any real manifest by far; refusing larger ones keeps a hostile file out of memory.
MAX_MANIFEST_BYTES = 1024 * 1024


class ManifestError(Exception):
    pass


def applied_migrations() -> list[tuple[str, str]]:
    """(app, migration) in the order they were applied to the live database."""
    recorder = MigrationRecorder(connection)
    if not recorder.has_table():
        return []
    return list(recorder.migration_qs.order_by("id").values_list("app", "name"))


def db_revision(applied: list[tuple[str, str]]) -> str:
    # The set, not the order: two databases migrated along different paths to the same state match.
    digest = hashlib.sha256("\n".join(f"{a}.{n}" for a, n in sorted(applied)).encode())
    return digest.hexdigest()[:12]


def latest_per_app(applied: list[tuple[str, str]]) -> dict[str, str]:
    latest: dict[str, str] = {}
    for app, name in applied:
        latest[app] = name
    return dict(sorted(latest.items()))


def live_revision() -> str:
    return db_revision(applied_migrations())


def write(directory: Path, manifest: dict) -> int:
    data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    path = directory / MANIFEST
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return len(data)


def read(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a TRUSCA manifest")
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{MANIFEST} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{MANIFEST} does not decode as JSON ({exc})") from None
    return validate(manifest)


def validate(manifest) -> dict:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{MANIFEST} is not a JSON object")
    if "db_revision" not in manifest and "alembic_head" in manifest:
        manifest["db_revision"] = manifest["alembic_head"]  # legacy manifests
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ManifestError(f"{MANIFEST} lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ManifestError(f"{MANIFEST} has format {manifest['format']!r}; this version reads format {FORMAT}")
    if manifest["engine"] not in DUMP_FILES:
        raise ManifestError(f"{MANIFEST} names engine {manifest['engine']!r}; expected one of {', '.join(DUMP_FILES)}")
    files = manifest["files"]
    if not isinstance(files, dict) or DUMP_FILES[manifest["engine"]] not in files:
        raise ManifestError(f"{MANIFEST} does not list the database dump {DUMP_FILES[manifest['engine']]}")
    for name, entry in files.items():
        if name not in (*DUMP_FILES.values(), WORKSPACE_ARCHIVE):
            raise ManifestError(f"{MANIFEST} lists an unexpected file {name!r}")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
        ):
            raise ManifestError(f"{MANIFEST} entry for {name} needs an integer size and a sha256")
    if not isinstance(manifest["migrations"], dict):
        raise ManifestError(f"{MANIFEST} migrations is not an object")
    return manifest


def compare_migrations(backup_migrations: dict[str, str]) -> tuple[list[str], list[str]]:
    """(unknown, behind): migrations this code lacks, and apps the backup is behind the code on."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    unknown, behind = [], []
    for app, name in sorted(backup_migrations.items()):
        if (app, name) not in loader.disk_migrations:
            unknown.append(f"{app}.{name}")
            continue
        leaves = loader.graph.leaf_nodes(app)
        if leaves and (app, name) not in leaves:
            behind.append(app)
    for app in sorted({a for a, _ in loader.disk_migrations} - set(backup_migrations)):
        behind.append(app)
    return unknown, behind
