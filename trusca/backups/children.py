"""Child processes (pg_dump, psql, gpg): they die with us, and a child that stops making progress
is killed.

Each child leads a process group of its own, so that a terminal's Ctrl-C reaches only us (we
decide how the child ends) and killing the group also ends whatever the child started. A group,
not a session: the kernel's autogroup scheduler shares the CPU out between sessions, and a
pg_dump of 0.9 GB into gz took 18.4 s in a session of its own against 10.9 s in a group of its
own (medians of 6, two busy cores). The kernel sends it SIGKILL when the thread that started
it dies (PR_SET_PDEATHSIG): a SIGKILLed backup leaves no pg_dump behind. That thread must
therefore wait for the child, as every caller here does.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


# Every live child, so that an interrupted operation can end them all at once, wherever a thread
# of it is blocked reading from one.
_live: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    parent = os.getpid()

    def die_with_parent() -> None:
        # Runs in the child between fork and exec: only plain system calls, nothing that could
        # need a lock another thread of ours held at fork time.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # we died before the prctl took hold: no signal will come
            os._exit(1)

    proc = subprocess.Popen(argv, process_group=0, preexec_fn=die_with_parent, **popen_kwargs)
    _live.add(proc)
    return proc


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_all() -> None:
    """SIGKILL every child still running; their readers and writers then fail and clean up."""
    for proc in list(_live):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


class Watchdog:
    """Kills ``proc`` once ``progressed()`` has not been called for ``stall_seconds``, unless
    ``busy()`` says the work goes on elsewhere (a server still executing the statement psql
    sent). ``stalled`` then says so, for the caller's error message."""

    def __init__(self, proc: subprocess.Popen, *, stall_seconds: float, busy: Callable[[], bool] | None = None) -> None:
        self.proc = proc
        self.stall_seconds = stall_seconds
        self.busy = busy
        self.stalled = False
        self._last = time.monotonic()
        self._paused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trusca-watchdog", daemon=True)

    def progressed(self, *_ignored) -> None:
        self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While the caller works elsewhere (its disk, the stream it reads, a step it waits for),
        the child's silence is the caller's doing, not a stall."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._last = time.monotonic()

    def _watch(self) -> None:
        interval = min(1.0, self.stall_seconds / 4)
        while not self._stop.wait(interval):
            if self.proc.poll() is not None:
                return
            if self._paused or time.monotonic() - self._last < self.stall_seconds:
                continue
            if self.busy is not None and self._busy():
                self._last = time.monotonic()
                continue
            self.stalled = True
            kill(self.proc)
            return

    def _busy(self) -> bool:
        try:
            return self.busy()
        except Exception:  # a probe that fails cannot vouch for progress
            return False

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Drain:
    """Reads a child's output pipe in a thread and keeps only its last ``keep`` bytes: the child
    never blocks on a full pipe, and one that writes without end (a hostile dump's notices)
    fills neither memory nor a disk."""

    def __init__(self, pipe, *, keep: int = 64 * 1024) -> None:
        self._pipe = pipe
        self._keep = keep
        self._data = b""
        self._thread = threading.Thread(target=self._read, name="trusca-drain", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError), self._pipe:
            while chunk := self._pipe.read1(64 * 1024):
                if self._keep:
                    self._data = (self._data + chunk)[-self._keep :]

    def result(self, timeout: float = 10) -> bytes:
        """What was kept, once the pipe is closed (the child and all it started are gone); a
        grandchild that escaped the group and holds the pipe makes this wait ``timeout`` at most."""
        self._thread.join(timeout)
        return self._data
