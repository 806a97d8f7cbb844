"""The store interface: where backups live, in backup names and streams.

A backup is made member by member through ``open_write`` into a hidden staging area and becomes
visible only through ``publish``, which writes the manifest last: whatever ``list`` returns is
whole. Readers stream members through ``open_read``. Nothing here hands out a path: the local
disk and S3 implement the same calls, and the layers above (gz, workspace, bundle, database,
crypto) move file objects.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO


@dataclass
class StoredBackup:
    name: str
    kind: str  # from the name: who made this copy (an uploaded bundle keeps its manifest's kind inside)
    timestamp: datetime
    # The parsed manifest (trusca.backups.manifest.Manifest); None when missing or unreadable,
    # and then ``error`` says why. A bad manifest is reported, never raised: one damaged backup
    # must not stop a listing, a prune or a catalog rebuild.
    manifest: object | None
    size: int
    error: str = ""


class Upload(io.RawIOBase):
    """A member being written. ``close()`` completes it; ``abort()`` throws away what was written.
    Used as a context manager, an exception inside the block aborts it."""

    def writable(self) -> bool:
        return True

    def abort(self) -> None:
        raise NotImplementedError

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Store(ABC):
    location: str  # "local" or "s3": what the admin's list shows

    @abstractmethod
    def open_write(self, name: str, member: str, *, sha256: str | None = None) -> Upload:
        """A new member of the unpublished backup ``name``. ``sha256``, when known up front (a
        copy of a finished backup), travels with the object so a reader can check it."""

    @abstractmethod
    def publish(self, name: str, manifest: bytes) -> None:
        """Write the manifest last, making the backup visible and whole."""

    @abstractmethod
    def discard(self, name: str) -> None:
        """Remove whatever an unpublished (failed, interrupted) backup ``name`` left."""

    @abstractmethod
    def open_read(self, name: str, member: str) -> BinaryIO:
        """Stream a member of a published backup (``NotFound`` when it has none)."""

    @abstractmethod
    def read_manifest(self, name: str) -> bytes:
        """The manifest's bytes, at most MAX_MANIFEST_BYTES (``NotFound`` when missing)."""

    @abstractmethod
    def list(self) -> list[StoredBackup]:
        """Every published backup in either naming format, oldest first."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether a published or unpublished backup of that name exists."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove a published backup; a reader never sees it half deleted."""
