"""What an operator names as a backup (a directory, a bundle file, a backup's name), opened as a
store and a name that every workflow reads the same way."""

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trusca.backups import bundle, store
from trusca.backups.errors import OperationFailed
from trusca.backups.naming import parse_name

UNPACK_PREFIX = "unpack-"


@dataclass
class Source:
    store: store.Store
    name: str  # in the store
    label: str  # as the operator gave it, for messages

    @property
    def title(self) -> str:
        """The backup's name as operators know it (a bundle's file name without .tar.gz)."""
        return Path(self.label).name.removesuffix(".tar.gz")


class SourceError(OperationFailed):
    pass


@contextlib.contextmanager
def open_source(given: str) -> Iterator[Source]:
    """A backup directory (either naming format, or any directory holding one), a bundle
    ``.tar.gz`` (unpacked into a hidden directory beside the backups, removed afterwards), or
    the name of a backup in BACKUP_ROOT."""
    path = Path(given).expanduser()
    if path.is_dir():
        yield Source(store.DirectoryStore(path.resolve()), path.name, given)
        return
    if path.exists():
        with unpacked_bundle(path, label=given) as source:
            yield source
        return
    if parse_name(given) is not None:
        local = store.local()
        if local.path(given).is_dir():
            yield Source(local, given, given)
            return
        if local.bundle_path(given).is_file():
            with unpacked_bundle(local.bundle_path(given), label=given) as source:
                yield source
            return
    raise SourceError(f"{given} is not a backup directory, a bundle file, or the name of a stored backup")


@contextlib.contextmanager
def unpacked_bundle(path: Path, *, label: str) -> Iterator[Source]:
    if not path.is_file():
        raise SourceError(f"{label} is neither a backup directory nor a bundle file")
    if path.stat().st_size == 0:
        raise SourceError(f"{label} is an empty file, not a backup bundle")
    with open(path, "rb") as fh, unpacking(fh, label=label) as source:
        yield source


@contextlib.contextmanager
def unpacking(stream, *, label: str) -> Iterator[Source]:
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
