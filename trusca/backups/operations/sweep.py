"""Noticing what dead processes left behind: run at the start of every command, of the worker
and of the web server, and by the admin's page."""

import os
import socket
import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from trusca.backups import locks, store
from trusca.backups.models import Backup
from trusca.backups.operations.backup import record_failure
from trusca.backups.operations.offload import offload_sweep
from trusca.backups.operations.restore import restore_recover
from trusca.backups.operations.sources import unpack_owner


def sweep() -> list[str]:
    """Finish or undo a killed restore; mark failed the runs and off-host copies whose process
    died and remove their partial files. Returns one line per thing done."""
    done = []
    if recovered := restore_recover():
        done.append(recovered)
    done += [f"marked failed: {name} (worker lost)" for name in _sweep_rows()]
    done += offload_sweep()
    _sweep_partials()
    return done


def _sweep_rows() -> list[str]:
    holder = locks.current()
    cutoff = timezone.now() - timedelta(seconds=settings.BACKUP_STALE_SECONDS)
    swept = []
    for row in Backup.objects.filter(status__in=[Backup.Status.QUEUED, Backup.Status.RUNNING]):
        # Alive: its heartbeat is fresh and some live process holds the lock (a queued job's lock
        # is held for it by the process that queued it). A holder that died frees the lock at once.
        if holder is not None and row.heartbeat_at and row.heartbeat_at >= cutoff:
            continue
        message = (
            f"worker lost: no heartbeat for {settings.BACKUP_STALE_SECONDS} s; its partial files were removed"
            if holder is not None
            else "worker lost: the process running it is gone; its partial files were removed"
        )
        if Backup.objects.filter(pk=row.pk, status=row.status).update(
            status=Backup.Status.FAILED, finished_at=timezone.now(), message=message
        ):
            store.local().discard(row.name)
            record_failure(row, message)
            swept.append(row.name)
    return swept


def _sweep_partials() -> None:
    local = store.local()
    active = set(
        Backup.objects.filter(status__in=[Backup.Status.QUEUED, Backup.Status.RUNNING]).values_list("name", flat=True)
    )
    for suffix in local.partial_names():
        owner = unpack_owner(suffix)
        if owner is not None:
            host, pid = owner
            # Another host (a container with pids of its own) is judged by whether the upload
            # or unpack is still writing, this one by whether its process lives.
            if (host == socket.gethostname() and not _alive(pid)) or (
                host != socket.gethostname() and _idle(local.partial_path(suffix))
            ):
                local.remove_partial(suffix)
            continue
        name = suffix.removesuffix(".tar.gz").removeprefix("deleting-")
        if name in active:
            continue
        if suffix != name and _age(local.partial_path(suffix)) < settings.BACKUP_STALE_SECONDS:
            continue  # a bundle being written or a delete under way, by a process we cannot see
        local.remove_partial(suffix)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _idle(directory) -> bool:
    newest = max((p.stat().st_mtime for p in directory.rglob("*")), default=directory.stat().st_mtime)
    return time.time() - newest > settings.BACKUP_STALE_SECONDS


def _age(path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
