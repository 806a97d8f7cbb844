"""Where backups live. Every reader goes through here, so S3 can slot in behind the same calls.

A backup is written into a hidden staging directory and renamed into place only when complete:
anything that ``list_backups`` sees is whole.
"""

import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from django.conf import settings

from trusca.backups import manifest as manifest_mod
from trusca.backups.naming import parse_name

STAGING_PREFIX = ".partial-"


@dataclass
class StoredBackup:
    name: str
    path: Path
    kind: str
    timestamp: datetime
    manifest: dict | None  # None when the manifest is missing or unreadable
    error: str = ""

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    @property
    def bundle_path(self) -> Path:
        return self.path.with_name(f"{self.name}.tar.gz")


def root() -> Path:
    return settings.BACKUP_ROOT


def path_of(name: str) -> Path:
    return root() / name


def staging_path(name: str) -> Path:
    return root() / f"{STAGING_PREFIX}{name}"


def staging_dir(name: str) -> Path:
    root().mkdir(parents=True, exist_ok=True)
    directory = staging_path(name)
    directory.mkdir()
    return directory


def publish(staging: Path, name: str) -> Path:
    final = path_of(name)
    if final.exists():
        raise FileExistsError(f"a backup named {name} already exists")
    _fsync_dir(staging)
    os.rename(staging, final)
    _fsync_dir(root())
    return final


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def delete(name: str) -> None:
    target = path_of(name)
    # Rename away first so a half-deleted backup is never listed as a backup.
    doomed = root() / f"{STAGING_PREFIX}deleting-{name}"
    if target.exists():
        os.rename(target, doomed)
        shutil.rmtree(doomed)
    target.with_name(f"{name}.tar.gz").unlink(missing_ok=True)


def partial_dirs() -> list[Path]:
    if not root().is_dir():
        return []
    return [p for p in root().iterdir() if p.name.startswith(STAGING_PREFIX)]


def list_backups() -> list[StoredBackup]:
    """Every complete backup under BACKUP_ROOT in either naming format, oldest first."""
    found = []
    if not root().is_dir():
        return found
    for entry in root().iterdir():
        parsed = parse_name(entry.name)
        if parsed is None or not entry.is_dir():
            continue
        found.append(load(entry, parsed_kind=parsed.kind, parsed_time=parsed.timestamp))
    return sorted(found, key=lambda b: (b.timestamp, b.name))


def load(path: Path, *, parsed_kind: str, parsed_time: datetime) -> StoredBackup:
    try:
        manifest = manifest_mod.read(path)
    except manifest_mod.ManifestError as exc:
        return StoredBackup(path.name, path, parsed_kind, parsed_time, None, str(exc))
    try:
        timestamp = datetime.fromisoformat(manifest["timestamp"])
    except (TypeError, ValueError):
        timestamp = parsed_time
    return StoredBackup(path.name, path, manifest.get("kind", parsed_kind), timestamp, manifest)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
