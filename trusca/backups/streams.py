"""One archive of a backup as a stream, in both directions.

Writing: what the producer (pg_dump, the tar writer) writes is compressed, and hashed as stored,
on its way into the store; the manifest's entry comes out at the end. Reading: the stored bytes
are hashed and counted as they come out of the store, decompressed, and cut off at the
uncompressed size the manifest records (a gzip bomb stops there, not when the disk is full);
``finish()`` reads to the end and proves the whole stream was the one the manifest describes.
A consumer commits nothing before ``finish()`` returned.
"""

from collections.abc import Callable
from typing import BinaryIO

from trusca.backups import gz
from trusca.backups.manifest import FileEntry
from trusca.backups.store import Upload

Checkpoint = Callable[[], None]  # raises when the operation was cancelled


class IntegrityError(Exception):
    """The stream is not the one the manifest describes; the message names the file and how."""


class MemberWriter:
    def __init__(self, upload: Upload, *, checkpoint: Checkpoint | None = None):
        self._upload = upload
        self._stored = gz.HashingWriter(upload)
        self._gzip = gz.GzipWriter(self._stored)
        self._checkpoint = checkpoint
        self.entry: FileEntry | None = None

    def write(self, data) -> int:
        if self._checkpoint:
            self._checkpoint()
        return self._gzip.write(data)

    def flush(self) -> None:
        pass

    def __enter__(self) -> "MemberWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._gzip.abort()
            self._upload.abort()
            return
        try:
            self._gzip.close()
            self._upload.close()
        except BaseException:
            self._upload.abort()
            raise
        self.entry = FileEntry(
            size=self._stored.size, sha256=self._stored.sha256.hexdigest(), uncompressed_size=self._gzip.uncompressed
        )


class MemberReader:
    """The uncompressed content of one stored archive. ``limit`` bounds the output when the
    manifest records no uncompressed size (manifests older than the field)."""

    def __init__(
        self,
        raw: BinaryIO,
        name: str,
        entry: FileEntry,
        *,
        progress: Callable[[int], None] | None = None,
        limit: int | None = None,
        checkpoint: Checkpoint | None = None,
    ):
        self.name = name
        self._entry = entry
        self._raw = raw
        self._stored = gz.HashingReader(raw, progress)
        self._gzip = gz.decompressing_reader(self._stored)
        self._limit = entry.uncompressed_size if entry.uncompressed_size is not None else limit
        self._checkpoint = checkpoint
        self.uncompressed = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._checkpoint:
            self._checkpoint()
        try:
            data = self._gzip.read(n)
        except (OSError, EOFError, ValueError) as exc:
            raise self._fault(exc) from None
        self.uncompressed += len(data)
        if self._limit is not None and self.uncompressed > self._limit:
            raise IntegrityError(
                f"{self.name} decompresses to more than the {self._limit} bytes its manifest records "
                "(altered, or a decompression bomb)"
            )
        return data

    def finish(self) -> None:
        """Read to the end; raise unless size, sha256 and uncompressed size are the manifest's."""
        while self.read(gz.CHUNK):
            pass
        self._check_stored()
        if self._entry.uncompressed_size is not None and self.uncompressed != self._entry.uncompressed_size:
            raise IntegrityError(
                f"{self.name} decompresses to {self.uncompressed} bytes; its manifest says "
                f"{self._entry.uncompressed_size} (altered)"
            )

    def _fault(self, exc: BaseException) -> IntegrityError:
        # Tell a damaged copy (its checksum differs) from a file that was broken when signed.
        self._gzip.close()
        while self._stored.read(gz.CHUNK):
            pass
        try:
            self._check_stored()
        except IntegrityError as damaged:
            return damaged
        reason = str(exc).split("\n")[0] or type(exc).__name__
        return IntegrityError(f"{self.name} is not an intact gzip stream ({reason})")

    def _check_stored(self) -> None:
        if self._stored.size != self._entry.size:
            raise IntegrityError(
                f"{self.name} is {self._stored.size} bytes; the manifest says {self._entry.size} (truncated or altered)"
            )
        if self._stored.sha256.hexdigest() != self._entry.sha256:
            raise IntegrityError(f"{self.name} does not match its sha256 in the manifest (corrupted or altered)")

    def close(self) -> None:
        try:
            self._gzip.close()
        finally:
            self._raw.close()

    def __enter__(self) -> "MemberReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
