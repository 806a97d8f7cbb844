"""What an operator names as a backup (a directory, a bundle file, a backup's name), opened as a
store and a name that every workflow reads the same way."""

import contextlib
import os
import secrets
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
    with open(path, "rb") as fh:
        if fh.read(2) == GZIP_MAGIC:
            fh.seek(0)
            with unpacking(fh, label=label) as source:
                yield source
            return
        fh.seek(0)
        # Not gzip: an OpenPGP-encrypted bundle, as `gpg --encrypt` of a bundle makes, or garbage
        # that decryption refuses in words.
        if keys is None:
            raise SourceError(
                f"{label} is not a gzip file; if it is an encrypted bundle, give the passphrase or private key "
                "that opens it"
            )
        with (
            contextlib.closing(crypto.decrypting_reader(fh, keys, name=path.name)) as plain,
            unpacking(plain, label=label, drain=True) as source,
        ):
            yield source


@contextlib.contextmanager
def unpacking(stream, *, label: str, drain: bool = False) -> Iterator[Source]:
    """Unpack a bundle stream into a hidden directory under BACKUP_ROOT that names its owning
    process, so the sweep can tell one in use from one a killed process left."""
    local = store.local()
    local.root.mkdir(parents=True, exist_ok=True)
    suffix = f"{UNPACK_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    root = local.partial_path(suffix)
    root.mkdir()
    try:
        scratch = store.LocalStore(root)
        try:
            manifest_bytes = bundle.unpack(stream, scratch, "bundle")
        except bundle.BundleError as exc:
            raise SourceError(f"{label}: {exc}") from None
        if drain:
            # To its very end, where an OpenPGP message proves it was not altered.
            while stream.read(1 << 20):
                pass
        scratch.publish("bundle", manifest_bytes)
        yield Source(scratch, "bundle", label)
    finally:
        local.remove_partial(suffix)


def unpack_owner(suffix: str) -> int | None:
    """The pid that owns a hidden unpack directory, from its name."""
    if not suffix.startswith(UNPACK_PREFIX):
        return None
    try:
        return int(suffix[len(UNPACK_PREFIX) :].split("-")[0])
    except ValueError:
        return None
