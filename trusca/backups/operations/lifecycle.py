"""The run lifecycle every operation reuses: the lock, a heartbeat that keeps it and reports
progress, cancellation (Ctrl-C, SIGTERM, a lost lock, a failed sibling thread), work in
background threads, and the sweep that notices runs whose process died."""

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from django.conf import settings
from django.db import connection

from trusca.backups import children, locks
from trusca.backups.errors import Interrupted, OperationFailed
from trusca.backups.progress import Ticker

log = logging.getLogger("trusca.backups")
# One grep-able line per outcome (backup.completed, backup.failed, backup.pruned, backup.restored)
# for the worker's log, as the manual's troubleshooting greps it; the commands print their own.
outcomes = logging.getLogger("trusca.backups.outcome")
# How often a running operation refreshes its progress and heartbeat: a quarter second keeps the
# admin's bar moving; one small UPDATE each time is nothing beside the work it reports on.
PROGRESS_INTERVAL = 0.25
PAUSE_SECONDS = 4


class Cancelled(OperationFailed):
    pass


class Run:
    """One operation holding the lock. Its threads call ``checkpoint()`` between pieces of work
    (every write and read of a stream), which raises once the run was cancelled."""

    def __init__(self, lock: locks.OperationLock):
        self.lock = lock
        self.reason: str | None = None
        self.cause: BaseException | None = None
        self.signal: int | None = None
        self._cancelled = threading.Event()
        self._lock_failing_since: float | None = None

    def cancel(self, reason: str, cause: BaseException | None = None) -> None:
        if not self._cancelled.is_set():
            self.reason, self.cause = reason, cause
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def checkpoint(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled(self.reason or "cancelled")

    def heartbeat(self) -> None:
        """Keep the lock; a run that lost it stops, since another may have started meanwhile."""
        try:
            held = self.lock.heartbeat()
        except Exception as exc:
            # Redis away for a moment: the lock lives on for BACKUP_STALE_SECONDS; past half of
            # that, another process could soon take it, so the run stops.
            now = time.monotonic()
            self._lock_failing_since = self._lock_failing_since or now
            log.warning("heartbeat of %s failed: %s", self.lock.what, exc)
            if now - self._lock_failing_since > settings.BACKUP_STALE_SECONDS / 2:
                self.cancel(f"lost the operation lock: its heartbeat failed for too long ({exc})")
            return
        self._lock_failing_since = None
        if not held:
            log.error("%s lost the operation lock; stopping", self.lock.what)
            self.cancel("lost the operation lock (it expired or another process took it)")

    def interrupt(self, signum: int) -> None:
        self.signal = signum
        self.cancel("interrupted")

    def raise_if_interrupted(self) -> None:
        """A signal arrived: whatever failed while the work was being torn down (a stream
        closed on its way out hits the cancelled run), the outcome is the interruption."""
        if self.signal is not None:
            raise Interrupted(self.signal)

    def raise_cause(self) -> None:
        """After a Cancelled: the failure that caused it, if a thread of this run failed."""
        if self.cause is not None:
            raise self.cause


@contextlib.contextmanager
def ticking(tick: Callable[[], None]) -> Iterator[None]:
    with Ticker(_closing_connection(tick), interval=PROGRESS_INTERVAL):
        yield


def _closing_connection(fn):
    def call() -> None:
        try:
            fn()
        finally:
            connection.close()

    return call


class Background:
    """Runs a function in a thread (closing the database connection it opened there). A failure
    cancels ``run``, so the other half of the work stops early; ``join()`` re-raises it here."""

    def __init__(self, run: Run, fn, *args, **kwargs):
        self.error: BaseException | None = None
        self.result = None

        def work() -> None:
            try:
                self.result = fn(*args, **kwargs)
            except BaseException as exc:
                self.error = exc
                run.cancel(str(exc), cause=exc)
            finally:
                connection.close()

        self._thread = threading.Thread(target=work, name="trusca-background", daemon=True)
        self._thread.start()

    def join(self, *, reraise: bool = True) -> None:
        self._thread.join()
        if reraise and self.error is not None:
            raise self.error


# Signals ---------------------------------------------------------------------------------------

_runs: set[Run] = set()
_shield = {"depth": 0, "pending": None}


@contextlib.contextmanager
def interruptible(run: Run | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM become ``Interrupted`` in the main thread: the run is cancelled and
    every child killed, so threads blocked on a child wake up and clean up, then the command
    exits 130 or 143. Only the main thread can take signals; elsewhere (a Celery task) this
    only registers the run."""
    if run is not None:
        _runs.add(run)
    if threading.current_thread() is not threading.main_thread():
        try:
            yield
        finally:
            _runs.discard(run)
        return

    def handler(signum, frame):
        if _shield["depth"]:
            _shield["pending"] = signum  # the shielded step finishes first
            return
        children.kill_all()
        if _runs:
            # Cooperatively: every read and write of a run checks it, and its error paths turn
            # the cancellation into Interrupted. Raised from here it could land inside a
            # finalizer (a logging weakref callback, say), where Python drops it.
            for each in list(_runs):
                each.interrupt(signum)
            return
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _runs.discard(run)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Steps that must not be cut short (a restore's roll forward after its commit): a signal
    arriving meanwhile is honoured when they are done."""
    _shield["depth"] += 1
    try:
        yield
    finally:
        _shield["depth"] -= 1
    if not _shield["depth"] and _shield["pending"] is not None:
        signum, _shield["pending"] = _shield["pending"], None
        raise Interrupted(signum)


def fault_point(name: str) -> None:
    """Where the crash-consistency tests kill the process (TRUSCA_TEST_KILL_AT=name), or hold it
    a few seconds so a browser test can watch that moment (TRUSCA_TEST_PAUSE_AT=name[,name...]);
    nothing otherwise. SIGKILL, as the kernel's OOM killer or a power cut would: no cleanup runs."""
    if os.environ.get("TRUSCA_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if name in os.environ.get("TRUSCA_TEST_PAUSE_AT", "").split(","):
        time.sleep(PAUSE_SECONDS)


def reason(exc: BaseException) -> str:
    """An exception as one line for an operator: the OS's words for OS errors, with the file."""
    if isinstance(exc, Interrupted):
        return "interrupted"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc).split("\n")[0] or type(exc).__name__
