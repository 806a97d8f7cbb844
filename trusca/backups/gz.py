"""Gzip streams that run several times faster than ``gzip -6`` and stay gzip-compatible.

Input is cut into 2 MiB blocks that worker threads compress at once (libdeflate releases the
GIL), each block a gzip member of its own: concatenated members are one valid gzip file (RFC 1952
§2.2), so ``gunzip -t``, ``tar -tzf`` and ``gunzip -c | psql`` work by hand. Seven blocks in eight
go to libdeflate's level 1 (about 9.3% larger than gzip -6, at eleven times its speed) and one to
its level 4 (5%): together about 8.8% over gzip -6 for a tenth of its CPU, which on two cores is
what keeps a backup several times faster than the shell pipeline without missing the 10% size
budget. Measured per codec and level on the ~1 GB dataset's dump and workspace tar in 2 MiB
blocks: every mix reaching that size through ISA-L (its level 3: 11% larger, for 85% of
libdeflate 1's CPU) or libdeflate's higher levels cost more CPU (two blocks in three at ISA-L 3
and one at libdeflate 5: 8.5%, for 26% more CPU). Backups in benchmarks/backup_bench.py.

Everything here moves file objects: where the bytes come from or go (a file, S3, an OpenPGP
stream) is the caller's business.
"""

import hashlib
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import deflate
from isal import igzip, igzip_threaded, isal_zlib

CHUNK = 1024 * 1024
BLOCK = 2 * 1024 * 1024
WORKERS = os.cpu_count() or 2
# Blocks queued per stream before the writer waits: enough to keep every core busy, few enough
# that memory stays flat whatever the size of the stream.
IN_FLIGHT = 2 * WORKERS
BadGzipFile = igzip.BadGzipFile
# What inflating damaged data raises besides BadGzipFile (an OSError) and EOFError: ISA-L's own
# error ("Invalid lookback distance", ...), which derives from Exception alone.
InflateError = isal_zlib.error

_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="trusca-gzip")


def _compress_block(index: int, data: bytes) -> bytes:
    return deflate.gzip_compress(data, 4 if index % 8 == 7 else 1)


class HashingWriter:
    """Passes writes on to ``sink``, counting and hashing them on the way."""

    def __init__(self, sink: BinaryIO):
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._sink.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class GzipWriter:
    """Compresses what is written into ``sink``. ``close()`` writes the last block (it does not
    close ``sink``); ``uncompressed`` counts the bytes that went in."""

    def __init__(self, sink):
        self._sink = sink
        self._buffer = bytearray()
        self._pending: deque[Future] = deque()
        self._blocks = 0
        self.uncompressed = 0

    def write(self, data) -> int:
        self._buffer += data
        self.uncompressed += len(data)
        while len(self._buffer) >= BLOCK:
            self._submit(bytes(self._buffer[:BLOCK]))
            del self._buffer[:BLOCK]
        return len(data)

    def flush(self) -> None:
        pass  # blocks are written whole; close() writes the last one

    def _submit(self, block: bytes) -> None:
        self._pending.append(_pool.submit(_compress_block, self._blocks, block))
        self._blocks += 1
        while len(self._pending) > IN_FLIGHT:
            self._sink.write(self._pending.popleft().result())

    def close(self) -> None:
        if self._buffer or self._blocks == 0:  # an empty stream is still one gzip member
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        while self._pending:
            self._sink.write(self._pending.popleft().result())

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()


class StoredGzipWriter:
    """A gzip stream of stored (uncompressed) deflate blocks, for data that is compressed
    already: ISA-L's level 0 still Huffman-codes, which makes gzip data 23% larger, and zlib's
    level 0 copies at ~480 MB/s here; framing by hand costs 5 bytes per 64 KiB and a CRC at
    ~13 GB/s, so the bundle is written at the speed of the disk."""

    _HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, unknown OS
    _MAX = 0xFFFF

    def __init__(self, sink):
        self._sink = sink
        self._crc = 0
        self._size = 0
        sink.write(self._HEADER)

    def write(self, data) -> int:
        view = memoryview(data)
        self._crc = isal_zlib.crc32(view, self._crc)
        self._size += len(view)
        for start in range(0, len(view), self._MAX):
            part = view[start : start + self._MAX]
            self._sink.write(struct.pack("<BHH", 0, len(part), len(part) ^ 0xFFFF))
            self._sink.write(part)
        return len(view)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        # An empty final stored block ends the deflate stream; then CRC32 and ISIZE (RFC 1952).
        self._sink.write(struct.pack("<BHH", 1, 0, 0xFFFF))
        self._sink.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))


class HashingReader:
    """Reads ``source`` for a consumer, hashing and counting the bytes, reporting them to
    ``progress`` as they pass."""

    def __init__(self, source, progress=None):
        self._source = source
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._progress = progress

    def _seen(self, data) -> None:
        self.sha256.update(data)
        self.size += len(data)
        if self._progress:
            self._progress(len(data))

    def read(self, n=-1) -> bytes:
        data = self._source.read(n)
        self._seen(data)
        return data

    def readinto(self, buffer) -> int:
        count = self._source.readinto(buffer)
        self._seen(memoryview(buffer)[:count])
        return count

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._source.close()


def decompressing_reader(source):
    """Decompress a gzip stream; inflate runs in its own thread, beside the caller's work, and
    multi-member files read as one stream."""
    return igzip_threaded.open(source, "rb", threads=1)
