"""Large buffers into files.

On this project's reference machine (Linux 6.18, ext4), one ``write()`` of 1 MiB or more costs the
kernel 3 to 6 times the system CPU of the same bytes written 256 KiB at a time: copying a 3.2 GB
file took 4.0 to 7.9 s of system time in 1 or 2 MiB writes, and 1.2 to 1.6 s in 64 to 512 KiB
ones (``cat``: 1.0 s). An upload spent most of its time there. Every write of a buffer that can
be large goes through here.
"""

import os
from concurrent.futures import Future, ThreadPoolExecutor

SLICE = 256 * 1024


def write_all(write, data) -> int:
    """All of ``data`` through ``write`` (a file's write, or os.write bound to a descriptor),
    SLICE bytes at a time."""
    view = memoryview(data).cast("B")
    size = len(view)
    while view:
        view = view[write(view[:SLICE]) :]
    return size


def pwrite_all(fd: int, data, offset: int) -> None:
    """All of ``data`` at ``offset`` of the file, SLICE bytes at a time."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view[:SLICE], offset)
        offset, view = offset + written, view[written:]


# Left alone, the kernel starts writing a file's pages to disk only once a tenth of the memory is
# dirty (vm.dirty_background_ratio): a multi-GB file then waits for most of itself in the fsync
# that ends it. Flushing every FLUSH_EVERY bytes on a thread overlaps that with the writing.
FLUSH_EVERY = 64 * 1024 * 1024
_flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trusca-flush")


class EarlyFlush:
    """Starts writing a file's dirty pages to disk every FLUSH_EVERY bytes written, on a thread,
    while the writer goes on; the fsync that ends the file then waits for the last few MiB. One
    flush at a time per file: a disk slower than the writer is flushed as often as it can be."""

    def __init__(self, fd: int):
        self._fd = fd
        self._since = 0
        self._pending: Future | None = None

    def wrote(self, count: int) -> None:
        self._since += count
        if self._since >= FLUSH_EVERY and (self._pending is None or self._pending.done()):
            self.wait()  # a flush that failed (EIO, ENOSPC) fails the write now
            self._since = 0
            self._pending = _flusher.submit(os.fdatasync, self._fd)

    def wait(self) -> None:
        """The flush under way finished; its error raised. Call it before closing the file: the
        thread must never flush a descriptor number that was closed and given to another file."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
