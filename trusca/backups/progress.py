"""Byte counting shared by the threads of one operation, and what is told about it."""

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("trusca.backups")


class Reporter:
    """What an interface wants to hear. The CLI draws a live line; Celery writes the row."""

    def started(self, where: str) -> None:
        """The operation has chosen where it works and is about to begin."""

    def phase(self, label: str) -> None:
        """A new stretch of work with its own progress from 0 (the bundle, the safety backup)."""

    def progress(self, done: int, total: int) -> None:
        pass

    def step(self, text: str, ok: bool = True) -> None:
        """A step finished (ok) or needs the operator's attention (not ok)."""


class Counter:
    def __init__(self, total: int):
        self.total = max(total, 1)
        self.done = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count

    @property
    def percent(self) -> int:
        # 100 is said only by the caller once everything is in place, never by an estimate.
        return min(99, self.done * 100 // self.total)


class Ticker:
    """Calls ``tick`` every ``interval`` seconds in its own thread until stopped."""

    def __init__(self, tick: Callable[[], None], interval: float):
        self._tick, self._interval = tick, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="trusca-ticker")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._tick()
            except Exception:  # a progress report that fails must not kill the work it reports on
                log.exception("progress report failed")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
