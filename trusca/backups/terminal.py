"""What the management commands show on a terminal: the ✓ lines, sizes, and a live progress
line on stderr that appears only when stderr is a TTY (cron gets the plain lines alone)."""

import sys
import time
from pathlib import Path

from django.conf import settings

from trusca.backups.progress import Reporter


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size}B"
    value, unit = size / 1024, "K"
    for larger in ("M", "G", "T"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}"


def display_path(path) -> str:
    """Relative to the installation when inside it, as the manual prints them; else absolute."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(settings.BASE_DIR))
    except ValueError:
        return str(path)


class LiveLine(Reporter):
    def __init__(self, stream=None, label: str = "", announce=None):
        self.stream = stream or sys.stderr
        self.announce = announce
        self.enabled = self.stream.isatty()
        self.label = label
        self._t0 = time.monotonic()
        self._shown = False

    def started(self, where: str) -> None:
        if self.announce:
            self.announce(where)

    def phase(self, label: str) -> None:
        self.clear()
        self.label = label
        self._t0 = time.monotonic()

    def progress(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        percent = min(99, done * 100 // max(total, 1))
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 else 0
        bar = "#" * (percent // 4)
        self.stream.write(f"\r{self.label} [{bar:<25}] {percent:3d}%  {human_size(done)} at {human_size(int(rate))}/s ")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
