"""Large buffers into files: sliced writes, and the early flush that overlaps a file's writeback
with its writing."""

import os
import random
import time

import pytest

from trusca.backups import diskio

DATA = random.Random(3).randbytes(3 * diskio.SLICE + 123)


def test_every_byte_is_written_in_slices_whatever_a_write_takes():
    written, calls = bytearray(), []

    def short_write(view) -> int:  # takes at most 1000 bytes, as a pipe or a signal may leave it
        calls.append(len(view))
        written.extend(view[:1000])
        return min(1000, len(view))

    assert diskio.write_all(short_write, DATA) == len(DATA)
    assert bytes(written) == DATA
    assert max(calls) <= diskio.SLICE


def test_a_buffer_lands_at_its_offset(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"\0" * 10)
    fd = os.open(path, os.O_RDWR)
    try:
        diskio.pwrite_all(fd, DATA, 10)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 10 + DATA


def test_files_are_flushed_while_written_and_a_failed_flush_fails_the_next_write(tmp_path, monkeypatch):
    monkeypatch.setattr(diskio, "FLUSH_EVERY", 1000)
    flushed = []
    real = os.fdatasync

    def fdatasync(fd):
        flushed.append(fd)
        if len(flushed) == 2:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(diskio.os, "fdatasync", fdatasync)
    with open(tmp_path / "file", "wb") as fh:
        flush = diskio.EarlyFlush(fh.fileno())
        flush.wrote(999)
        flush.wait()
        assert flushed == []  # not yet a FLUSH_EVERY's worth
        flush.wrote(1)
        flush.wait()
        assert flushed == [fh.fileno()]
        flush.wrote(1000)  # the second flush fails on its thread...
        deadline = time.monotonic() + 10
        while len(flushed) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        with pytest.raises(OSError, match="No space left"):
            flush.wrote(1000)  # ...and the next write that would start another says so
        flush.wait()  # nothing under way: closing the file is safe
