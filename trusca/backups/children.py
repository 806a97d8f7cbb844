"""Child processes (pg_dump, psql, gpg): they die with us, and a child that stops making progress
is killed.

Each child leads a process group of its own, so that a terminal's Ctrl-C reaches only us (we
decide how the child ends) and killing the group also ends whatever the child started. The
kernel sends it SIGKILL when the thread that started it dies (PR_SET_PDEATHSIG): a SIGKILLed
backup leaves no pg_dump behind. That thread must therefore wait for the child, as every caller
here does.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: only the prebound C call, nothing that could
    # need a lock another thread of ours held at fork time.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# Every live child, so that an interrupted operation can end them all at once, wherever a thread
# of it is blocked reading from one.
_live: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent, **popen_kwargs)
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trusca-watchdog", daemon=True)

    def progressed(self, *_ignored) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        interval = min(1.0, self.stall_seconds / 4)
        while not self._stop.wait(interval):
            if self.proc.poll() is not None:
                return
            if time.monotonic() - self._last < self.stall_seconds:
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
