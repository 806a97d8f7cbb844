"""One archive of a backup as a stream, in both directions.

Writing: what the producer (pg_dump, the tar writer) writes is compressed, encrypted when keys
are configured, and hashed as stored on its way into the store; the manifest's entry comes out
at the end. Reading: the stored bytes are hashed and counted as they come out of the store,
decrypted, decompressed, and cut off at the uncompressed size the manifest records (a gzip bomb
stops there, not when the disk is full); ``finish()`` reads to the end and proves the whole
stream was the one the manifest describes. A consumer commits nothing before ``finish()``.

    producer -> gzip -> [plain hash -> OpenPGP] -> stored hash -> store
    store -> stored hash -> [OpenPGP -> plain hash] -> gunzip -> size limit -> consumer
"""

from collections.abc import Callable
from typing import BinaryIO

from trusca.backups import crypto, gz
from trusca.backups.manifest import FileEntry
from trusca.backups.store import Upload

Checkpoint = Callable[[], None]  # raises when the operation was cancelled


class IntegrityError(Exception):
    """The stream is not the one the manifest describes; the message names the file and how."""


class MemberWriter:
    def __init__(
        self,
        upload: Upload,
        *,
        name: str,
        encrypt: crypto.EncryptionKeys | None = None,
        checkpoint: Checkpoint | None = None,
    ):
        self._upload = upload
        self._stored = gz.HashingWriter(upload)
        self._encrypting = crypto.encrypting_writer(self._stored, encrypt, name=name) if encrypt else None
        self._plain = gz.HashingWriter(self._encrypting) if self._encrypting else None
        self._gzip = gz.GzipWriter(self._plain or self._stored)
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
            self._abort()
            return
        try:
            self._gzip.close()
            if self._encrypting:
                self._encrypting.close()
            self._upload.close()
        except BaseException:
            self._abort()
            raise
        plain = {}
        if self._plain:
            plain = {"plain_size": self._plain.size, "plain_sha256": self._plain.sha256.hexdigest()}
        self.entry = FileEntry(
            size=self._stored.size,
            sha256=self._stored.sha256.hexdigest(),
            uncompressed_size=self._gzip.uncompressed,
            **plain,
        )

    def _abort(self) -> None:
        self._gzip.abort()
        if self._encrypting:
            self._encrypting.abort()
        self._upload.abort()


class MemberReader:
    """The uncompressed content of one stored archive.

    ``decrypt`` opens an encrypted one: either ours (its stored name ends in ``.gpg`` and the
    manifest holds the hashes of both the ciphertext and the gzip inside), or one encrypted by
    hand the manual's way (``by_hand``: ``gpg --symmetric`` on the archive, the manifest left as
    it was, so its hashes are checked on the decrypted bytes). ``limit`` bounds the output when
    the manifest records no uncompressed size (manifests older than the field)."""

    def __init__(
        self,
        raw: BinaryIO,
        name: str,
        entry: FileEntry,
        *,
        decrypt: crypto.DecryptionKeys | None = None,
        by_hand: bool = False,
        progress: Callable[[int], None] | None = None,
        limit: int | None = None,
        checkpoint: Checkpoint | None = None,
    ):
        self.name = name
        self._entry = entry
        self._raw = raw
        self._stored = gz.HashingReader(raw, progress)
        encrypted = by_hand or name.endswith(".gpg")
        if encrypted and decrypt is None:
            raise crypto.EncryptionError(f"{name} is encrypted: give the passphrase or private key that opens it")
        self._plain = self._decrypting = None
        source = self._stored
        if encrypted:
            shown = f"{name}.gpg" if by_hand else name
            self._decrypting = crypto.decrypting_reader(self._stored, decrypt, name=shown)
            self._plain = source = gz.HashingReader(self._decrypting)
        # What the manifest's size and sha256 describe: the stored bytes, or for a file encrypted
        # by hand, the gzip inside it; ours also record the gzip inside, as plain_*.
        self._checks = [(self._plain if by_hand else self._stored, entry.size, entry.sha256, "")]
        if encrypted and not by_hand and entry.plain_sha256:
            self._checks.append((self._plain, entry.plain_size, entry.plain_sha256, " once decrypted"))
        self._gzip = gz.decompressing_reader(source)
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
        except crypto.EncryptionError:
            raise
        except (OSError, EOFError, ValueError, gz.InflateError) as exc:
            raise self._fault(exc) from None
        self.uncompressed += len(data)
        if self._limit is not None and self.uncompressed > self._limit:
            raise IntegrityError(
                f"{self.name} decompresses to more than the {self._limit} bytes its manifest records "
                "(altered, or a decompression bomb)"
            )
        return data

    def finish(self) -> None:
        """Read to the end; raise unless sizes and hashes are the manifest's."""
        while self.read(gz.CHUNK):
            pass
        self._check_hashes()
        if self._entry.uncompressed_size is not None and self.uncompressed != self._entry.uncompressed_size:
            raise IntegrityError(
                f"{self.name} decompresses to {self.uncompressed} bytes; its manifest says "
                f"{self._entry.uncompressed_size} (altered)"
            )

    def _fault(self, exc: BaseException) -> IntegrityError:
        # Tell a damaged copy (its checksum differs) from a file that was broken when signed.
        self._gzip.close()
        source = self._plain or self._stored
        while source.read(gz.CHUNK):
            pass
        try:
            self._check_hashes()
        except IntegrityError as damaged:
            return damaged
        reason = str(exc).split("\n")[0] or type(exc).__name__
        return IntegrityError(f"{self.name} is not an intact gzip stream ({reason})")

    def _check_hashes(self) -> None:
        for seen, size, sha256, how in self._checks:
            if seen.size != size:
                raise IntegrityError(
                    f"{self.name} is {seen.size} bytes{how}; the manifest says {size} (truncated or altered)"
                )
            if seen.sha256.hexdigest() != sha256:
                raise IntegrityError(
                    f"{self.name} does not match its sha256 in the manifest{how} (corrupted or altered)"
                )

    def close(self) -> None:
        try:
            self._gzip.close()
            if self._decrypting:
                self._decrypting.close()  # its gpg ends now, not when collected
        finally:
            self._raw.close()

    def __enter__(self) -> "MemberReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_stored(raw: BinaryIO, name: str, entry: FileEntry, *, progress=None, checkpoint=None) -> None:
    """An encrypted archive checked without its key: the ciphertext's size and sha256 only."""
    stored = gz.HashingReader(raw, progress)
    with raw:
        while stored.read(gz.CHUNK):
            if checkpoint:
                checkpoint()
    if stored.size != entry.size:
        raise IntegrityError(f"{name} is {stored.size} bytes; the manifest says {entry.size} (truncated or altered)")
    if stored.sha256.hexdigest() != entry.sha256:
        raise IntegrityError(f"{name} does not match its sha256 in the manifest (corrupted or altered)")
