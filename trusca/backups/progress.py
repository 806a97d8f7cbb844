"""Byte counting shared by the threads of one operation, and what is told about it."""

import threading
from collections.abc import Callable


class Reporter:
    """What an interface wants to hear. The CLI draws a live line; Celery writes the row."""

    def started(self, path) -> None:
        """The operation has chosen where it works and is about to begin."""

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
        self.error: BaseException | None = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._tick()
            except Exception as exc:  # a heartbeat that fails must not kill the work it reports on
                self.error = exc

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
