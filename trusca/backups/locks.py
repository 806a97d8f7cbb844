"""One backup-or-restore at a time, across every process (and, with Redis, every host).

The lock carries a heartbeat: its holder refreshes it while it works, and a holder silent for
BACKUP_STALE_SECONDS (a worker killed mid-run) no longer blocks anyone. A holder on this host
whose process is gone is taken for dead at once: a killed restore's next command need not wait.

With a Redis cache (any backend: Django's or django-redis) the lock is a Redis key, taken with
SET NX and refreshed, handed over and released only by compare-and-set scripts, so a holder that
lost the key can never refresh or delete its successor's. Otherwise it is a file made with
O_EXCL in the var directory, which every process of one host shares.
"""

import json
import os
import socket
import time
import uuid
from functools import cache as memoize
from pathlib import Path

import redis
from django.conf import settings

from trusca.backups.errors import OperationFailed

KEY = "trusca:backups:operation-lock"


class Busy(OperationFailed):
    def __init__(self, holder: dict | None):
        self.holder = holder or {}
        what = self.holder.get("what", "another backup or restore")
        super().__init__(f"{what} is already running (since {self.holder.get('since', 'an unknown time')})")


class OperationLock:
    def __init__(self, what: str, owner: str | None = None, *, this_process: bool = True):
        """``this_process=False`` for a lock taken on behalf of a queued job: the process that
        queues it is not the one that runs it, so its death says nothing about the job."""
        self.what = what
        self.owner = owner or uuid.uuid4().hex
        holder = {"owner": self.owner, "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        if this_process:
            holder.update(host=socket.gethostname(), pid=os.getpid(), started=_process_start(os.getpid()))
        self._payload = json.dumps(holder)

    def acquire(self) -> "OperationLock":
        backend = _backend()
        # current() breaks a lock whose holder died on this host; then the lock is free to take.
        if not backend.add(self._payload) and (current() is not None or not backend.add(self._payload)):
            raise Busy(current())
        return self

    def heartbeat(self) -> bool:
        """Refresh the lock; False when it is no longer ours (broken as stale, or released)."""
        return _backend().refresh(self._payload)

    def release(self) -> None:
        _backend().release(self._payload)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def adopt(owner: str) -> OperationLock | None:
    """The lock taken for a queued job, handed to the worker that runs the job (who then holds it
    as its own process); None if it lapsed or someone else holds it."""
    holder = current()
    if not holder or holder.get("owner") != owner:
        return None
    lock = OperationLock(holder.get("what", ""), owner)
    if not _backend().swap(json.dumps(holder), lock._payload):
        return None
    return lock


def current() -> dict | None:
    raw = _backend().get()
    if not raw:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return {"what": "an unreadable lock"}
    if _holder_is_dead(holder):
        _backend().break_dead(raw)
        return None
    return holder


def _holder_is_dead(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    return _process_start(holder["pid"]) != holder.get("started")


def _process_start(pid: int) -> str | None:
    # The start time tells a live holder from another process that reused its pid.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


# Redis -------------------------------------------------------------------------------------------

_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_SWAP = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end "
    "return 0"
)


class _RedisBackend:
    def __init__(self, url: str, prefix: str):
        self.client = _client(url)
        self.key = f"{prefix}:{KEY}" if prefix else KEY

    @property
    def _ttl_ms(self) -> int:
        return settings.BACKUP_STALE_SECONDS * 1000

    def add(self, payload: str) -> bool:
        return bool(self.client.set(self.key, payload, nx=True, px=self._ttl_ms))

    def get(self) -> str | None:
        raw = self.client.get(self.key)
        return raw.decode() if raw else None

    def refresh(self, payload: str) -> bool:
        return bool(self.client.eval(_REFRESH, 1, self.key, payload, self._ttl_ms))

    def release(self, payload: str) -> None:
        self.client.eval(_RELEASE, 1, self.key, payload)

    def swap(self, old: str, new: str) -> bool:
        return bool(self.client.eval(_SWAP, 1, self.key, old, new, self._ttl_ms))

    def break_dead(self, payload: str) -> None:
        self.release(payload)


@memoize
def _client(url: str) -> redis.Redis:
    # Bounded timeouts: a Redis that is down refuses a backup in seconds, not minutes.
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)


# File ----------------------------------------------------------------------------------------


class _FileBackend:
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

    def refresh(self, payload: str) -> bool:
        if self._read() != payload:
            return False
        os.utime(self.path)
        return True

    def release(self, payload: str) -> None:
        if self._read() == payload:
            self.path.unlink(missing_ok=True)

    def swap(self, old: str, new: str) -> bool:
        if self._read() != old:
            return False
        partial = self.path.with_name(f"operation.lock.new-{uuid.uuid4().hex}")
        partial.write_text(new)
        os.replace(partial, self.path)
        return True

    def break_dead(self, payload: str) -> None:
        if self._read() == payload:
            self._bury()

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _break_if_stale(self) -> None:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if age > settings.BACKUP_STALE_SECONDS:
            self._bury()

    def _bury(self) -> None:
        # Rename first: of several processes breaking the same stale lock, one wins.
        grave = self.path.with_name(f"operation.lock.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        grave.unlink(missing_ok=True)


def redis_url() -> tuple[str, str] | None:
    """(URL, key prefix) of the Redis behind the default cache, whichever backend serves it."""
    cache = settings.CACHES["default"]
    if "redis" not in cache["BACKEND"].lower():
        return None
    location = cache["LOCATION"]
    url = location[0] if isinstance(location, list | tuple) else location.split(",")[0]
    return url, cache.get("KEY_PREFIX", "")


def _backend():
    found = redis_url()
    return _RedisBackend(*found) if found else _FileBackend()
