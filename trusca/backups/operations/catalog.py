"""The catalog (the Backup table) and what acts on stored backups as a whole: rebuilding the
catalog from the store, retention, delete and download."""

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from trusca.backups import bundle, manifest, store
from trusca.backups.errors import NotFound, OperationFailed
from trusca.backups.models import Backup
from trusca.backups.operations.lifecycle import outcomes
from trusca.portal import audit

log = logging.getLogger("trusca.backups")

# Who made a backup decides whether retention may remove it: what an operator asked for by name
# (manual, uploaded) stays until they delete it.
PRUNABLE_KINDS = (Backup.Kind.AUTO, Backup.Kind.CLI, Backup.Kind.PRE_RESTORE)


def get_backup(pk: int) -> Backup:
    """A catalog row whose name is safe to build paths from; ``NotFound`` otherwise."""
    backup = Backup.objects.defer("manifest").filter(pk=pk).first()
    if backup is None:
        raise NotFound(f"There is no backup with id {pk}; it may have been deleted.")
    try:
        store.check_name(backup.name)
    except NotFound:
        log.error("catalog row %s has an unsafe name %r; ignored", pk, backup.name)
        raise NotFound(f"The backup with id {pk} has an unusable name; it was not touched.") from None
    return backup


def catalog_sync() -> list[str]:
    """Make the Backup table agree with the store, which is the truth. Returns one line per
    stored backup that could not be read, which stays listed as failed with the reason."""
    stored = {b.name: b for b in store.local().list()}
    Backup.objects.filter(status=Backup.Status.SUCCEEDED).exclude(name__in=list(stored)).delete()
    existing = set(Backup.objects.filter(name__in=list(stored)).values_list("name", flat=True))
    damaged = []
    for name, item in stored.items():
        document = item.manifest
        values = {
            "kind": item.kind,
            "created_at": item.timestamp,
            "size_bytes": item.size,
            "db_revision": document.db_revision if document else "",
            "manifest": document.unsigned_document() if document else {},
            "status": Backup.Status.SUCCEEDED if document else Backup.Status.FAILED,
            "message": "" if document else f"unreadable: {item.error}",
            "progress": 100 if document else 0,
        }
        if document is None:
            damaged.append(f"{name}: {item.error}")
        if name in existing:
            Backup.objects.filter(name=name).update(**values)
        else:
            Backup.objects.create(name=name, **values)
    close_old_connections()
    for line in damaged:
        log.warning("damaged backup skipped: %s", line)
    return damaged


def backup_prune(*, now: datetime | None = None) -> list[str]:
    """Remove auto, cli and pre-restore backups older than BACKUP_RETENTION_DAYS, oldest first.
    Manual and uploaded ones are kept, and so is the newest complete backup whatever its age:
    retention never leaves none. One whose manifest cannot be read goes by its name's kind and
    time; one that cannot be removed is logged and skipped: retention never fails the backup
    that ran it."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.BACKUP_RETENTION_DAYS)
    local = store.local()
    stored = local.list()
    # A copy the weekly re-verification found damaged is no backup to keep instead of the others.
    damaged = set(Backup.objects.filter(status=Backup.Status.FAILED).values_list("name", flat=True))
    complete = [b for b in stored if b.manifest is not None and b.name not in damaged]
    newest = complete[-1].name if complete else None
    removed = []
    for item in stored:
        if item.kind in PRUNABLE_KINDS and item.timestamp < cutoff and item.name != newest:
            try:
                local.delete(item.name)
            except OSError as exc:
                outcomes.error("backup.prune_failed %s: %s", item.name, exc)
                continue
            Backup.objects.filter(name=item.name).delete()
            outcomes.info("backup.pruned %s (older than %d days)", item.name, settings.BACKUP_RETENTION_DAYS)
            removed.append(item.name)
    return removed


def backup_delete(*, backup: Backup, actor, request=None) -> None:
    """Remove a backup's files and its row. A queued or running one cannot be deleted."""
    if backup.is_active:
        raise OperationFailed(f"{backup.name} is {backup.status}; wait for it to finish before deleting it")
    store.local().delete(store.check_name(backup.name))
    backup.delete()
    audit.record(actor=actor, action="backup.deleted", target=backup.name, request=request)


def backup_download(*, backup: Backup, actor, request=None) -> Iterator[bytes]:
    """The bundle of a succeeded backup as a stream of chunks."""
    local = store.local()
    if backup.status != Backup.Status.SUCCEEDED:
        raise OperationFailed(f"{backup.name} has no files to download")
    try:
        data = local.read_manifest(store.check_name(backup.name))
        document = manifest.parse(data)
    except (NotFound, manifest.ManifestError) as exc:
        raise OperationFailed(f"{backup.name} cannot be downloaded: {exc}") from None
    audit.record(actor=actor, action="backup.downloaded", target=backup.name, request=request)
    return bundle.stream(local, backup.name, document, data)
