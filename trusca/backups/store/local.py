"""Backups on the local disk: ``<root>/<name>/`` with the manifest and the archives, as the
portal's manual lays them out.

A backup is written into the hidden ``.partial-<name>/`` and renamed into place once its
manifest is written and everything is on disk (fsync), so anything listed under its own name is
whole, and a crash leaves only a dot-name that the next sweep removes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

from trusca.backups import diskio
from trusca.backups import manifest as manifest_mod
from trusca.backups.errors import NotFound, OperationFailed
from trusca.backups.naming import parse_name
from trusca.backups.store.base import Store, StoredBackup, Upload

STAGING_PREFIX = ".partial-"
# One path component that cannot climb or hide: names come from the catalog, URLs and the
# command line, and are checked before any path is built from them.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MEMBERS = {manifest_mod.MANIFEST} | {
    name + suffix for name in manifest_mod.ARCHIVES for suffix in ("", manifest_mod.ENCRYPTED_SUFFIX)
}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".tar.gz"):
        raise NotFound(f"{name!r} is not a backup name")
    return name


def check_member(member: str) -> str:
    if member not in _MEMBERS:
        raise NotFound(f"{member!r} is not a file a backup holds")
    return member


class _FileUpload(Upload):
    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "xb")  # noqa: SIM115 - closed by close() or abort()
        self._flush = diskio.EarlyFlush(self._fh.fileno())

    def write(self, data) -> int:
        written = diskio.write_all(self._fh.write, data)
        self._flush.wrote(written)
        return written

    def close(self) -> None:
        if not self.closed:
            try:
                self._flush.wait()
                self._fh.flush()
                os.fsync(self._fh.fileno())
            finally:
                self._close()  # even on a full disk: a leaked descriptor pins the space
        super().close()

    def abort(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)
        super().close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self._flush.wait()  # before the descriptor goes; an error of its own was raised already, or is moot
        self._fh.close()


class LocalStore(Store):
    location = "local"

    def __init__(self, root: Path):
        self.root = root

    # Paths: the local store's own business; readers elsewhere use names and streams.

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def staging_path(self, name: str) -> Path:
        return self.root / f"{STAGING_PREFIX}{check_name(name)}"

    def bundle_path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.tar.gz"

    # The interface.

    def open_write(self, name: str, member: str, *, sha256: str | None = None) -> Upload:
        staging = self.staging_path(name)
        staging.mkdir(parents=True, exist_ok=True)
        return _FileUpload(staging / check_member(member))

    def publish(self, name: str, manifest: bytes) -> None:
        staging, final = self.staging_path(name), self.path(name)
        if final.exists():
            raise OperationFailed(f"a backup named {name} already exists")
        with _FileUpload(staging / manifest_mod.MANIFEST) as out:
            out.write(manifest)
        _fsync_dir(staging)
        os.rename(staging, final)
        _fsync_dir(self.root)

    def discard(self, name: str) -> None:
        shutil.rmtree(self.staging_path(name), ignore_errors=True)

    def open_read(self, name: str, member: str) -> BinaryIO:
        try:
            return open(self.path(name) / check_member(member), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{name} has no {member}") from None

    def read_manifest(self, name: str) -> bytes:
        path = self.path(name) / manifest_mod.MANIFEST
        try:
            with open(path, "rb") as fh:
                return fh.read(manifest_mod.MAX_MANIFEST_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{name} has no {manifest_mod.MANIFEST}") from None

    def list(self) -> list[StoredBackup]:
        found = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return found
        for entry in entries:
            parsed = parse_name(entry.name)
            if parsed is None or not entry.is_dir(follow_symlinks=False):
                continue
            found.append(self._load(entry.name, parsed.kind, parsed.timestamp))
        return sorted(found, key=lambda b: (b.timestamp, b.name))

    def _load(self, name: str, kind: str, timestamp) -> StoredBackup:
        size = sum(f.stat().st_size for f in self.path(name).iterdir() if f.is_file())
        try:
            document = manifest_mod.parse(self.read_manifest(name))
        except (manifest_mod.ManifestError, NotFound, OSError) as exc:
            return StoredBackup(name, kind, timestamp, None, size, str(exc))
        return StoredBackup(name, kind, document.timestamp, document, size)

    def exists(self, name: str) -> bool:
        return self.path(name).exists() or self.staging_path(name).exists()

    def delete(self, name: str) -> None:
        target = self.path(name)
        # Renamed away first, so a half-deleted backup is never listed as a backup.
        doomed = self.root / f"{STAGING_PREFIX}deleting-{name}"
        if target.exists():
            os.rename(target, doomed)
            shutil.rmtree(doomed)
        self.bundle_path(name).unlink(missing_ok=True)

    # Local only.

    def partial_names(self) -> list[str]:
        """Names of the hidden work-in-progress entries (``.partial-…``)."""
        try:
            return [e.name[len(STAGING_PREFIX) :] for e in os.scandir(self.root) if e.name.startswith(STAGING_PREFIX)]
        except FileNotFoundError:
            return []

    def partial_path(self, suffix: str) -> Path:
        """A hidden path for work in progress that is not a backup (a bundle being written, an
        upload being received): never listed, and removed by the sweep once its owner is gone."""
        if "/" in suffix or suffix.startswith("."):
            raise ValueError(f"bad partial name {suffix!r}")
        return self.root / f"{STAGING_PREFIX}{suffix}"

    def remove_partial(self, suffix: str) -> None:
        target = self.partial_path(suffix)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free


class DirectoryStore(LocalStore):
    """One backup directory anywhere (an operator's copy on another disk), whatever its name."""

    def __init__(self, directory: Path):
        super().__init__(directory.parent)
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory

    def list(self) -> list[StoredBackup]:
        raise NotImplementedError("a single backup directory is read by name, not listed")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
