"""One backup-or-restore at a time, across every process (and, with Redis, every host).

The lock carries a heartbeat: its holder refreshes it while it works, and a holder silent for
BACKUP_STALE_SECONDS (a worker killed mid-run) no longer blocks anyone.
"""

import json
import os
import time
import uuid
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.core.cache.backends.redis import RedisCache

KEY = "trusca:backups:operation-lock"


class Busy(Exception):
    def __init__(self, holder: dict | None):
        self.holder = holder or {}
        what = self.holder.get("what", "another backup or restore")
        super().__init__(f"{what} is already running (since {self.holder.get('since', 'an unknown time')})")


class OperationLock:
    def __init__(self, what: str, owner: str | None = None):
        self.what = what
        self.owner = owner or uuid.uuid4().hex
        self._payload = json.dumps(
            {"owner": self.owner, "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        )

    def acquire(self) -> "OperationLock":
        if not _backend().add(self._payload):
            raise Busy(current())
        return self

    def heartbeat(self) -> None:
        _backend().refresh(self.owner, self._payload)

    def release(self) -> None:
        _backend().release(self.owner)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def adopt(owner: str) -> "OperationLock | None":
    """The lock taken for a queued job, for the worker that runs the job; None if it lapsed."""
    holder = current()
    if not holder or holder.get("owner") != owner:
        return None
    lock = OperationLock(holder.get("what", ""), owner)
    lock._payload = json.dumps(holder)
    lock.heartbeat()
    return lock


def current() -> dict | None:
    raw = _backend().get()
    return json.loads(raw) if raw else None


class _RedisBackend:
    def add(self, payload: str) -> bool:
        return cache.add(KEY, payload, timeout=settings.BACKUP_STALE_SECONDS)

    def get(self) -> str | None:
        return cache.get(KEY)

    def refresh(self, owner: str, payload: str) -> None:
        if self._owner() == owner:
            cache.set(KEY, payload, timeout=settings.BACKUP_STALE_SECONDS)

    def release(self, owner: str) -> None:
        if self._owner() == owner:
            cache.delete(KEY)

    def _owner(self):
        raw = cache.get(KEY)
        return json.loads(raw)["owner"] if raw else None


class _FileBackend:
    # Django's file cache has no atomic add; O_EXCL on a file in the shared var directory does.
    @property
    def path(self) -> Path:
        return settings.VAR_DIR / "operation.lock"

    def add(self, payload: str) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._break_if_stale()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(payload)
        return True

    def get(self) -> str | None:
        self._break_if_stale()
        try:
            return self.path.read_text() or None
        except FileNotFoundError:
            return None

    def refresh(self, owner: str, payload: str) -> None:
        if self._owner() == owner:
            os.utime(self.path)

    def release(self, owner: str) -> None:
        if self._owner() == owner:
            self.path.unlink(missing_ok=True)

    def _owner(self):
        try:
            return json.loads(self.path.read_text())["owner"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _break_if_stale(self) -> None:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if age > settings.BACKUP_STALE_SECONDS:
            # Rename first: of several processes breaking the same stale lock, one wins.
            grave = self.path.with_name(f"operation.lock.stale-{uuid.uuid4().hex}")
            try:
                os.rename(self.path, grave)
            except FileNotFoundError:
                return
            grave.unlink(missing_ok=True)


def _backend():
    backend = settings.CACHES["default"]["BACKEND"]
    return _RedisBackend() if backend == f"{RedisCache.__module__}.RedisCache" else _FileBackend()
