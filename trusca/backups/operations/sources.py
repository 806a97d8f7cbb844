"""What an operator names as a backup (a directory, a bundle file, a backup's name), opened as a
store and a name that every workflow reads the same way."""

import contextlib
import io
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from trusca.backups import bundle, crypto, manifest, store
from trusca.backups.errors import NotFound, OperationFailed
from trusca.backups.naming import parse_name
from trusca.backups.streams import MemberReader

UNPACK_PREFIX = "unpack-"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Source:
    store: store.Store
    name: str  # in the store
    label: str  # as the operator gave it, for messages
    unpacked: bool = False  # from a bundle (a file, an upload): arrived from elsewhere

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
def open_source(given: str, *, keys: crypto.DecryptionKeys | None = None) -> Iterator[Source]:
    """A backup directory (either naming format, or any directory holding one), a bundle
    ``.tar.gz`` or an encrypted one ``.tar.gz.gpg`` (unpacked into a hidden directory beside the
    backups, removed afterwards), or the name of a backup in BACKUP_ROOT."""
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
    raise SourceError(f"{given} is not a backup directory, a bundle file, or the name of a stored backup")


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
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


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
    local = store.local()
    local.root.mkdir(parents=True, exist_ok=True)
    suffix = f"{UNPACK_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    root = local.partial_path(suffix)
    root.mkdir()
    try:
        scratch = store.LocalStore(root)
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
        yield Source(scratch, "bundle", label, unpacked=True)
    finally:
        local.remove_partial(suffix)


def unpack_owner(suffix: str) -> tuple[str, int] | None:
    """(host, pid) of the process that owns a hidden unpack directory, from its name."""
    if not suffix.startswith(UNPACK_PREFIX):
        return None
    try:
        host, pid, _token = suffix[len(UNPACK_PREFIX) :].rsplit("-", 2)
        return host, int(pid)
    except ValueError:
        return None
