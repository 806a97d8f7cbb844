"""What an operator names as a backup (a directory, a bundle file, a backup's name, a copy in the
bucket), opened as a store and a name that every workflow reads the same way."""

import contextlib
import gc
import io
import os
import re
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from trusca.backups import bundle, crypto, manifest, store
from trusca.backups.errors import NotFound, OperationFailed
from trusca.backups.naming import parse_name
from trusca.backups.progress import Counter, Reporter
from trusca.backups.store.local import check_member
from trusca.backups.streams import MemberReader

UNPACK_PREFIX = "unpack-"
DOWNLOAD_PREFIX = "download-"
GZIP_MAGIC = b"\x1f\x8b"
S3_SCHEME = "s3://"
_BUCKET = re.compile(r"^[A-Za-z0-9._-]{3,255}$")
_PREFIX = re.compile(r"^(?!/)(?!.*//)(?!(.*/)?\.\.?(/|$))[A-Za-z0-9._/-]{0,512}$")  # as BACKUP_S3_PREFIX


@dataclass
class Source:
    store: store.Store
    name: str  # in the store
    label: str  # as the operator gave it, for messages
    unpacked: bool = False  # from a bundle (a file, an upload): arrived from elsewhere
    # A copy made for this run (an unpacked bundle, a download from the bucket), removed afterwards.
    scratch: bool = False
    downloaded_from: str = ""  # the bucket's URL of a backup downloaded for this run

    def reader(self, member: str, entry, *, keys: crypto.DecryptionKeys | None, **options) -> MemberReader:
        """A member's content. An archive the manifest lists that was encrypted by hand, the
        manual's way (``gpg --symmetric`` on it, the original removed), is read decrypted."""
        try:
            return MemberReader(self.store.open_read(self.name, member), member, entry, decrypt=keys, **options)
        except NotFound:
            if member.endswith(manifest.ENCRYPTED_SUFFIX):
                raise
            raw = self.store.open_read(self.name, member + manifest.ENCRYPTED_SUFFIX)
            return MemberReader(raw, member, entry, decrypt=keys, by_hand=True, **options)

    def encrypted(self, member: str) -> bool:
        """Whether reading the member needs a key (ours, or encrypted by hand)."""
        if member.endswith(manifest.ENCRYPTED_SUFFIX):
            return True
        try:
            self.store.open_read(self.name, member).close()
        except NotFound:
            # Encrypted by hand if the .gpg is there; missing (NotFound) if not.
            self.store.open_read(self.name, member + manifest.ENCRYPTED_SUFFIX).close()
            return True
        return False

    @property
    def title(self) -> str:
        """The backup's name as operators know it (a bundle's file name without .tar.gz)."""
        return Path(self.label).name.removesuffix(".tar.gz")


class SourceError(OperationFailed):
    pass


def decryption_keys(
    *, secret_key: str | None = None, key_passphrase: str | None = None, passphrase: str | None = None
) -> crypto.DecryptionKeys | None:
    """What opens encrypted backups: the installation's own passphrase, plus a private key (and
    its passphrase) an operator gives for one restore."""
    passphrase = passphrase or settings.BACKUP_ENCRYPTION_PASSPHRASE or None
    if passphrase is None and secret_key is None:
        return None
    return crypto.DecryptionKeys(passphrase=passphrase, secret_key=secret_key, key_passphrase=key_passphrase)


@contextlib.contextmanager
def open_source(
    given: str, *, keys: crypto.DecryptionKeys | None = None, reporter: Reporter | None = None
) -> Iterator[Source]:
    """A backup directory (either naming format, or any directory holding one), a bundle
    ``.tar.gz`` or an encrypted one ``.tar.gz.gpg`` (unpacked into a hidden directory beside the
    backups, removed afterwards), the name of a backup in BACKUP_ROOT or else in the bucket, or
    ``s3://BUCKET/PREFIX/NAME`` (downloaded into a hidden directory, removed afterwards;
    ``reporter`` hears the download's progress)."""
    if given.startswith(S3_SCHEME):
        remote, name = _bucket_source(given)
        with downloaded(remote, name, label=given, reporter=reporter) as source:
            yield source
        return
    path = Path(given).expanduser()
    if path.is_dir():
        yield Source(store.DirectoryStore(path.resolve()), path.name, given)
        return
    if path.exists():
        with unpacked_bundle(path, label=given, keys=keys) as source:
            yield source
        return
    if parse_name(given) is not None:
        local = store.local()
        if local.path(given).is_dir():
            yield Source(local, given, given)
            return
        if local.bundle_path(given).is_file():
            with unpacked_bundle(local.bundle_path(given), label=given, keys=keys) as source:
                yield source
            return
        remote = store.remote()
        if remote is not None:
            with downloaded(remote, given, label=given, reporter=reporter, elsewhere=True) as source:
                yield source
            return
    raise SourceError(f"{given} is not a backup directory, a bundle file, or the name of a stored backup")


def _bucket_source(url: str):
    """``s3://BUCKET/PREFIX/NAME``: the bucket's store (endpoint and region from the settings)."""
    from trusca.backups.store.s3 import S3Store

    bucket, _, key = url[len(S3_SCHEME) :].rstrip("/").partition("/")
    prefix, _, name = key.rpartition("/")
    if not (_BUCKET.match(bucket) and _PREFIX.match(prefix) and parse_name(name)):
        # Not repeated back: whatever was typed there (a key pasted by mistake) stays out of logs.
        raise SourceError(
            "the source is not s3://BUCKET/PREFIX/NAME with NAME a backup's name (2026-05-09-030000, "
            "auto-20260509T030000Z) and PREFIX letters, digits, . - _ and /"
        )
    remote = S3Store(
        bucket=bucket,
        prefix=f"{prefix}/" if prefix else "",
        endpoint_url=settings.BACKUP_S3_ENDPOINT_URL,
        region=settings.BACKUP_S3_REGION,
        storage_class=settings.BACKUP_S3_STORAGE_CLASS,
    )
    return remote, name


@contextlib.contextmanager
def downloaded(
    remote, name: str, *, label: str, reporter: Reporter | None = None, elsewhere: bool = False
) -> Iterator[Source]:
    """A backup in the bucket, downloaded into a hidden directory under BACKUP_ROOT that names its
    owning process (the sweep removes it once that process is gone). Each object's sha256 is
    checked as it arrives: a damaged copy is refused here, before anything changes, and the
    preflight then checks every file against the signed manifest as for any other source.
    ``elsewhere``: the name was looked for on this host's disk first, and the messages say so."""
    reporter = reporter or Reporter()
    with _owned_scratch(DOWNLOAD_PREFIX) as scratch:
        try:
            _download(remote, name, scratch, reporter)
        except NotFound:
            where = f"on this host's disk ({settings.BACKUP_ROOT}) nor in" if elsewhere else "in"
            raise SourceError(f"there is no backup named {name} {where} {remote.url()}") from None
        except OperationFailed as exc:
            if elsewhere:
                raise SourceError(
                    f"{name} is not on this host's disk, and the copy in the bucket could not be used: {exc}"
                ) from None
            raise SourceError(f"{label}: {exc}") from None
        remote.release()
        gc.collect()  # the client's reference cycles: its memory is the load's to use now
        yield Source(scratch, name, label, scratch=True, downloaded_from=remote.url(name))


def _download(remote, name: str, scratch: store.LocalStore, reporter: Reporter) -> None:
    data = remote.read_manifest(name)
    try:
        document = manifest.parse(data)
    except manifest.ManifestError as exc:
        raise SourceError(f"{remote.url(name)}{manifest.MANIFEST}: {exc}") from None
    counter = Counter(sum(entry.size for entry in document.files.values()))
    free = scratch.free_bytes()
    if counter.total > free:
        raise SourceError(
            f"not enough free disk space in {settings.BACKUP_ROOT} to download {name}: it needs "
            f"{counter.total:,} bytes and {free:,} are free. Free some space, then try again"
        )
    reporter.phase(f"downloading {name}")
    staging = scratch.staging_path(name)
    staging.mkdir()

    def advance(count: int) -> None:
        counter.add(count)
        reporter.progress(counter.done, counter.total)

    for member, entry in document.files.items():
        # Not the store's open_write, which syncs every file to disk: this copy lives for one run.
        with open(staging / check_member(member), "x+b") as out:
            remote.download(name, member, out, max_size=entry.size, progress=advance)
    scratch.publish(name, data)


@contextlib.contextmanager
def unpacked_bundle(path: Path, *, label: str, keys: crypto.DecryptionKeys | None = None) -> Iterator[Source]:
    if not path.is_file():
        raise SourceError(f"{label} is neither a backup directory nor a bundle file")
    if path.stat().st_size == 0:
        raise SourceError(f"{label} is an empty file, not a backup bundle")
    with open(path, "rb") as fh, unpacking(fh, label=label, keys=keys) as source:
        yield source


class _Peeked(io.RawIOBase):
    """A stream whose first bytes were read to tell what it is, handed on whole."""

    def __init__(self, head: bytes, rest):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count], self._head = self._head[:count], self._head[count:]
            return count
        return self._rest.readinto(buffer)


@contextlib.contextmanager
def unpacking(stream, *, label: str, keys: crypto.DecryptionKeys | None = None) -> Iterator[Source]:
    """Unpack a bundle stream (a file, an upload) into a hidden directory under BACKUP_ROOT that
    names its owning host and process, so the sweep can tell one in use from one a killed process
    left. A bundle encrypted whole (``gpg --encrypt`` of ``NAME.tar.gz``) is decrypted on the way."""
    head = stream.read(2)
    stream = io.BufferedReader(_Peeked(head, stream), buffer_size=1 << 20)
    encrypted = head != GZIP_MAGIC
    if encrypted and keys is None:
        raise SourceError(
            f"{label} is not a gzip file; if it is an encrypted bundle, give the passphrase or private key "
            "that opens it"
        )
    with _owned_scratch(UNPACK_PREFIX) as scratch:
        with contextlib.ExitStack() as stack:
            if encrypted:
                stream = stack.enter_context(contextlib.closing(crypto.decrypting_reader(stream, keys, name=label)))
            try:
                manifest_bytes = bundle.unpack(stream, scratch, "bundle")
            except bundle.BundleError as exc:
                raise SourceError(f"{label}: {exc}") from None
            if encrypted:
                # To its very end, where an OpenPGP message proves it was not altered.
                while stream.read(1 << 20):
                    pass
        scratch.publish("bundle", manifest_bytes)
        yield Source(scratch, "bundle", label, unpacked=True, scratch=True)


@contextlib.contextmanager
def _owned_scratch(prefix: str) -> Iterator[store.LocalStore]:
    """A hidden directory under BACKUP_ROOT named after this host and process (``unpack_owner``
    reads them back, so the sweep can tell one in use from one a killed process left), removed
    on the way out."""
    local = store.local()
    local.root.mkdir(parents=True, exist_ok=True)
    suffix = f"{prefix}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    root = local.partial_path(suffix)
    root.mkdir()
    try:
        yield store.LocalStore(root)
    finally:
        local.remove_partial(suffix)


def unpack_owner(suffix: str) -> tuple[str, int] | None:
    """(host, pid) of the process that owns a hidden unpack or download directory, from its name."""
    prefix = next((p for p in (UNPACK_PREFIX, DOWNLOAD_PREFIX) if suffix.startswith(p)), None)
    if prefix is None:
        return None
    try:
        host, pid, _token = suffix[len(prefix) :].rsplit("-", 2)
        return host, int(pid)
    except ValueError:
        return None
