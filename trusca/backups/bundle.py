"""The bundle: one .tar.gz holding a backup's files, the unit of download and upload.

It is produced as a stream of chunks, so a download starts at once and never sits in memory or
on disk. The members are compressed already, so the outer gzip only frames them in stored
blocks (see ``gz.StoredGzipWriter``): the bundle is a few hundred bytes larger than the backup.
"""

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from isal import igzip

from trusca.backups import gz
from trusca.backups.manifest import ARCHIVES, ENCRYPTED_SUFFIX, MANIFEST, MAX_MANIFEST_BYTES, Manifest
from trusca.backups.store import Store

# The manifest first: a reader of the stream learns what to expect before the big members.
MEMBERS = (MANIFEST, *ARCHIVES, *(name + ENCRYPTED_SUFFIX for name in ARCHIVES))


class BundleError(Exception):
    pass


class _Sink:
    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def stream(store: Store, name: str, manifest: Manifest, manifest_bytes: bytes) -> Iterator[bytes]:
    """The bundle of a published backup, in chunks of about ``gz.CHUNK`` bytes."""
    sink = _Sink()
    out = gz.StoredGzipWriter(sink)
    _header(out, MANIFEST, len(manifest_bytes))
    out.write(manifest_bytes)
    _pad(out, len(manifest_bytes))
    for member in sorted(manifest.files, key=MEMBERS.index):
        size = manifest.files[member].size
        _header(out, member, size)
        written = 0
        with store.open_read(name, member) as fh:
            while chunk := fh.read(gz.CHUNK):
                written += len(chunk)
                if written > size:
                    break
                out.write(chunk)
                yield sink.drain()
        if written != size:
            raise BundleError(f"{member} is not the size its manifest records; the backup changed or is damaged")
        _pad(out, size)
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    out.close()
    yield sink.drain()


def _header(out, member: str, size: int) -> None:
    info = tarfile.TarInfo(member)
    info.size, info.mode = size, 0o640
    # GNU headers: ustar's size field stops at 8 GiB, a workspace archive may not.
    out.write(info.tobuf(format=tarfile.GNU_FORMAT))


def _pad(out, size: int) -> None:
    if remainder := size % tarfile.BLOCKSIZE:
        out.write(b"\0" * (tarfile.BLOCKSIZE - remainder))


def write(store: Store, name: str, manifest: Manifest, manifest_bytes: bytes, target: BinaryIO) -> None:
    for chunk in stream(store, name, manifest, manifest_bytes):
        target.write(chunk)


def unpack(source: BinaryIO, store: Store, name: str) -> bytes:
    """Unpack a bundle stream into the unpublished backup ``name`` of ``store``; returns the
    manifest's bytes for the caller to check before publishing. Only the known member names, as
    regular files, once each: anything else is refused before a byte of it is written.

    The tar framing is read by hand, header by header (``TarInfo.frombuf`` checks each), and the
    members copied through one buffer: tarfile's stream mode cost 2.3-2.8 s of CPU per GB here,
    most of an upload's, for three members whose names we know."""
    seen: set[str] = set()
    manifest = None
    buffer = memoryview(bytearray(gz.CHUNK))
    try:
        with igzip.open(source, "rb") as unzipped:
            while (header := _exactly(unzipped, tarfile.BLOCKSIZE)) != _END:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
                if info.type in _EXTENDED:
                    # Attributes of the next member (a bundle tarred by hand): its name in the
                    # plain header is the one that counts here.
                    if info.size > MAX_MANIFEST_BYTES:
                        raise BundleError("the bundle holds an extended header too large to be a bundle's")
                    _exactly(unzipped, info.size + -info.size % tarfile.BLOCKSIZE)
                    continue
                if info.name not in MEMBERS:
                    raise BundleError(f"the bundle holds an unexpected member {info.name!r}")
                if not info.isreg():
                    raise BundleError(f"the bundle member {info.name!r} is not a regular file")
                if info.name in seen:
                    raise BundleError(f"the bundle holds {info.name!r} twice")
                seen.add(info.name)
                if info.name == MANIFEST:
                    if info.size > MAX_MANIFEST_BYTES:
                        raise BundleError(f"the bundle's {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
                    manifest = _exactly(unzipped, info.size)
                else:
                    with store.open_write(name, info.name) as out:
                        _copy(unzipped, out, info.size, buffer)
                _exactly(unzipped, -info.size % tarfile.BLOCKSIZE)
            # Read on to the gzip trailer, whose CRC then covers every byte: tar's zero blocks
            # and record padding, a few KiB, and nothing more.
            if len(unzipped.read(_TAIL + 1)) > _TAIL or unzipped.read(1):
                raise BundleError("the bundle holds data after its end")
    except (tarfile.TarError, EOFError, igzip.BadGzipFile, gz.InflateError, UnicodeDecodeError) as exc:
        raise BundleError(f"the bundle does not read as a .tar.gz ({_reason(exc)})") from None
    if manifest is None:
        raise BundleError(f"the bundle has no {MANIFEST}")
    return manifest


_END = bytes(tarfile.BLOCKSIZE)
_TAIL = 1024 * 1024  # what follows the end-of-archive block: GNU tar pads to 10 KiB records
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


def _exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the stream ends in the middle of the bundle (truncated)")
    return data


def _copy(stream, out, size: int, buffer: memoryview) -> None:
    while size:
        count = stream.readinto(buffer[: min(len(buffer), size)])
        if not count:
            raise EOFError("the stream ends in the middle of a member (truncated)")
        out.write(buffer[:count])
        size -= count


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n")[0]
    return text if text and len(text) < 100 and "\\x" not in text and "b'" not in text else type(exc).__name__
