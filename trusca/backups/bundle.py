"""The bundle: one .tar.gz holding a backup's three files, the unit of download and upload.

It is produced as a stream of chunks, so a download starts at once and never sits in memory or
on disk; the members are already compressed, so the outer gzip runs at its fastest level.
"""

import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from isal import igzip

from trusca.backups import gz
from trusca.backups.manifest import DUMP_FILES, MANIFEST, WORKSPACE_ARCHIVE

# The manifest first: a reader of the stream learns what to expect before the big members.
MEMBER_ORDER = (MANIFEST, *DUMP_FILES.values(), WORKSPACE_ARCHIVE)


class BundleError(Exception):
    pass


class _Sink:
    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def members(directory: Path) -> list[Path]:
    return [directory / name for name in MEMBER_ORDER if (directory / name).is_file()]


def stream(directory: Path) -> Iterator[bytes]:
    sink = _Sink()
    out = igzip.GzipFile(fileobj=sink, mode="wb", compresslevel=0)
    for path in members(directory):
        info = tarfile.TarInfo(path.name)
        st = path.stat()
        info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o640
        out.write(info.tobuf(format=tarfile.PAX_FORMAT))
        with open(path, "rb") as fh:
            while chunk := fh.read(gz.CHUNK):
                out.write(chunk)
                yield sink.drain()
        remainder = st.st_size % tarfile.BLOCKSIZE
        if remainder:
            out.write(b"\0" * (tarfile.BLOCKSIZE - remainder))
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    out.close()
    yield sink.drain()


def write(directory: Path, target: Path) -> int:
    partial = target.with_name(f".{target.name}.partial-{int(time.time())}")
    try:
        with open(partial, "xb") as fh:
            for chunk in stream(directory):
                fh.write(chunk)
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size


def unpack(source, target: Path) -> None:
    """Unpack a bundle (path or readable stream) into the empty directory target.

    Only the known member names, as regular files, once each: anything else is refused before a
    byte of it is written.
    """
    seen: set[str] = set()
    try:
        with (
            igzip.open(source, "rb") as unzipped,
            tarfile.open(fileobj=unzipped, mode="r|") as tar,
        ):
            for info in tar:
                if info.name not in MEMBER_ORDER:
                    raise BundleError(f"the bundle holds an unexpected member {info.name!r}")
                if not info.isreg():
                    raise BundleError(f"the bundle member {info.name!r} is not a regular file")
                if info.name in seen:
                    raise BundleError(f"the bundle holds {info.name!r} twice")
                seen.add(info.name)
                src = tar.extractfile(info)
                with open(target / info.name, "xb") as out:
                    while chunk := src.read(gz.CHUNK):
                        out.write(chunk)
    except (tarfile.TarError, EOFError, OSError, igzip.BadGzipFile) as exc:
        raise BundleError(f"the bundle does not read as a .tar.gz ({exc})") from None
    if MANIFEST not in seen:
        raise BundleError(f"the bundle has no {MANIFEST}")
