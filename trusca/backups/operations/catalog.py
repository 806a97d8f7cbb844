"""The catalog (the Backup table) and what acts on stored backups as a whole: rebuilding the
catalog from the stores (this host's disk and the bucket), retention on each, delete and download.

Taking a backup off this host's disk (retention, delete) goes through its row first: ``local`` is
turned off by a conditional UPDATE that skips a backup whose off-host copy is running, and a copy
claims only a row that is still local (operations/offload.py), so the two never overlap.
"""

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from trusca.backups import bundle, manifest, store
from trusca.backups.errors import NotFound, OperationFailed
from trusca.backups.models import Backup
from trusca.backups.naming import parse_name
from trusca.backups.operations.lifecycle import outcomes
from trusca.portal import audit

log = logging.getLogger("trusca.backups")

# Who made a backup decides whether retention may remove it: what an operator asked for by name
# (manual, uploaded) stays until they delete it.
PRUNABLE_KINDS = (Backup.Kind.AUTO, Backup.Kind.CLI, Backup.Kind.PRE_RESTORE)
BUCKET_UNREAD = "the bucket could not be listed"


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
    """Make the Backup table agree with the stores, which are the truth: this host's disk and,
    when BACKUP_S3_BUCKET is set, the bucket (a new host finds its backups there). Returns one line
    per stored backup that could not be read, which stays listed as failed with the reason, and
    one for a bucket that could not be listed: its rows are then left as they were."""
    problems = []
    stored = {b.name: b for b in store.local().list()}
    remote = store.remote()
    in_bucket: dict[str, int] | None = None
    if remote is not None:
        try:
            in_bucket = remote.names()
        except OperationFailed as exc:
            problems.append(f"{BUCKET_UNREAD}, its backups are listed as they were: {exc}")
    for row in Backup.objects.filter(status=Backup.Status.SUCCEEDED).exclude(name__in=list(stored)):
        if in_bucket is not None:
            still_there = row.name in in_bucket
        else:  # no bucket configured: nothing there counts; a bucket unread: as the row last said
            still_there = remote is not None and row.offsite == Backup.Offsite.COPIED
        if not still_there:
            row.delete()
        elif row.local:
            Backup.objects.filter(pk=row.pk).update(local=False)
    existing = {r.name: r for r in Backup.objects.filter(name__in=[*stored, *(in_bucket or ())]).defer("manifest")}
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
            "local": True,
        }
        if in_bucket is not None:
            values |= _offsite_state(existing.get(name), name in in_bucket)
        if document is None:
            problems.append(f"{name}: {item.error}")
        if name in existing:
            Backup.objects.filter(name=name).update(**values)
        else:
            Backup.objects.create(name=name, **values)
    for name, size in (in_bucket or {}).items():
        if name not in stored:
            problems += _sync_bucket_only(remote, name, size, existing.get(name))
    close_old_connections()
    for line in problems:
        log.warning("catalog: %s", line)
    return problems


def _offsite_state(row: Backup | None, in_bucket: bool) -> dict:
    if in_bucket:
        return {"offsite": Backup.Offsite.COPIED, "offsite_message": ""}
    if row is not None and row.offsite == Backup.Offsite.COPIED:
        return {"offsite": Backup.Offsite.NONE, "offsite_message": "no longer in the bucket"}
    return {}  # pending, copying or failed: the copy's own state


def _sync_bucket_only(remote, name: str, size: int, row: Backup | None) -> list[str]:
    """A backup only in the bucket. Its manifest is read once, when the catalog does not hold it
    yet: a rebuild costs one listing, not one request per backup."""
    values = {"local": False, "offsite": Backup.Offsite.COPIED, "offsite_message": "", "size_bytes": size}
    if row is not None and row.status == Backup.Status.SUCCEEDED and row.db_revision:
        Backup.objects.filter(pk=row.pk).update(**values)
        return []
    parsed = parse_name(name)
    try:
        document = manifest.parse(remote.read_manifest(name))
    except (manifest.ManifestError, OperationFailed) as exc:
        values |= {"kind": parsed.kind, "created_at": parsed.timestamp, "status": Backup.Status.FAILED}
        values |= {"message": f"unreadable in the bucket: {exc}", "progress": 0, "manifest": {}}
        problems = [f"{name} (in the bucket): {exc}"]
    else:
        values |= {"kind": parsed.kind, "created_at": document.timestamp, "status": Backup.Status.SUCCEEDED}
        values |= {"db_revision": document.db_revision, "manifest": document.unsigned_document()}
        values |= {"message": "", "progress": 100}
        problems = []
    Backup.objects.update_or_create(name=name, defaults=values)
    return problems


def backup_prune(*, now: datetime | None = None) -> list[str]:
    """Remove auto, cli and pre-restore backups older than BACKUP_RETENTION_DAYS from this host's
    disk, oldest first. Manual and uploaded ones are kept, and so is the newest complete backup
    whatever its age: retention never leaves none. One whose manifest cannot be read goes by its
    name's kind and time; one that cannot be removed is logged and skipped, and so is one whose
    off-host copy is running (the next run takes it): retention never fails the backup that ran
    it. A backup copied to the bucket stays listed there."""
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
            if not release_local(item.name):
                outcomes.info("backup.prune_deferred %s (its off-host copy is running)", item.name)
                continue
            try:
                local.delete(item.name)
            except OSError as exc:
                Backup.objects.filter(name=item.name).update(local=True)
                outcomes.error("backup.prune_failed %s: %s", item.name, exc)
                continue
            Backup.objects.filter(name=item.name).exclude(offsite=Backup.Offsite.COPIED).delete()
            outcomes.info("backup.pruned %s (older than %d days)", item.name, settings.BACKUP_RETENTION_DAYS)
            removed.append(item.name)
    return removed


def release_local(name: str) -> bool:
    """Mark the backup as no longer on this host's disk, unless its off-host copy is running;
    from then on no copy can claim it. True when it may be removed (also when it has no row)."""
    if Backup.objects.filter(name=name).exclude(offsite=Backup.Offsite.COPYING).update(local=False):
        return True
    return not Backup.objects.filter(name=name).exists()


def offsite_expired(kind: str, timestamp: datetime, now: datetime) -> bool:
    """Whether the bucket's retention removes a backup of this kind and time (unless it is the
    newest complete one there): auto, cli and pre-restore past BACKUP_S3_RETENTION_DAYS."""
    return kind in PRUNABLE_KINDS and timestamp < now - timedelta(days=settings.BACKUP_S3_RETENTION_DAYS)


def offsite_prune(*, now: datetime | None = None) -> list[str]:
    """Retention in the bucket, on its own clock (BACKUP_S3_RETENTION_DAYS; keeping fewer days on
    the host than in the bucket is the usual set-up): auto, cli and pre-restore backups past it
    are removed from the bucket, oldest first; manual and uploaded ones never, nor the newest
    complete backup there. Kinds come from the names, as on the disk. Runs after every copy and
    from the daily sweep; a backup that cannot be removed is logged and skipped. Also removes
    what copies and deletes cut short left (objects without a manifest, which nothing lists), but
    never under a live copy. Raises ``OperationFailed`` when the bucket cannot be listed; returns
    [] when none is configured."""
    remote = store.remote()
    if remote is None:
        return []
    now = now or timezone.now()
    copying = set(Backup.objects.filter(offsite=Backup.Offsite.COPYING).values_list("name", flat=True))
    for name in remote.unpublished():
        if name not in copying:
            try:
                remote.discard(name)
            except OperationFailed as exc:
                outcomes.error("backup.offsite_prune_failed %s: %s", name, exc)
    stored = remote.list()
    complete = [b for b in stored if b.manifest is not None]
    newest = complete[-1].name if complete else None
    removed = []
    for item in stored:
        if not offsite_expired(item.kind, item.timestamp, now) or item.name == newest:
            continue
        try:
            remote.delete(item.name)
        except OperationFailed as exc:
            outcomes.error("backup.offsite_prune_failed %s: %s", item.name, exc)
            continue
        Backup.objects.filter(name=item.name, local=False).delete()
        Backup.objects.filter(name=item.name, offsite=Backup.Offsite.COPIED).update(
            offsite=Backup.Offsite.NONE,
            offsite_message=f"removed from the bucket after {settings.BACKUP_S3_RETENTION_DAYS} days "
            "(BACKUP_S3_RETENTION_DAYS)",
        )
        outcomes.info(
            "backup.offsite_pruned %s (older than %d days)", remote.url(item.name), settings.BACKUP_S3_RETENTION_DAYS
        )
        removed.append(item.name)
    return removed


def backup_delete(*, backup: Backup, actor, request=None) -> None:
    """Remove a backup from everywhere it lives, this host's disk and the bucket, and its row. A
    queued or running one cannot be deleted, nor one whose off-host copy is running."""
    name = store.check_name(backup.name)
    if backup.is_active:
        raise OperationFailed(f"{name} is {backup.status}; wait for it to finish before deleting it")
    if not release_local(name):
        raise OperationFailed(
            f"{name} is being copied to the bucket; wait for the copy to end (its state shows in the list), "
            "then delete it. Nothing was deleted."
        )
    try:
        store.local().delete(name)
    except OSError as exc:
        Backup.objects.filter(pk=backup.pk).update(local=backup.local)
        raise OperationFailed(f"{name} could not be removed from this host's disk ({exc}); nothing was deleted")
    remote = store.remote() if backup.offsite == Backup.Offsite.COPIED else None
    if remote is not None:
        try:
            remote.delete(name)
        except OperationFailed as exc:
            raise OperationFailed(
                f"{name} was removed from this host's disk, but its copy in {remote.url(name)} was not: {exc}. "
                "It is listed as in the bucket only; delete it again once the bucket can be reached."
            ) from None
    backup.delete()
    audit.record(actor=actor, action="backup.deleted", target=name, request=request)


def backup_download(*, backup: Backup, actor, request=None) -> Iterator[bytes]:
    """The bundle of a succeeded backup as a stream of chunks, from this host's disk or, for a
    backup only in the bucket, streamed from there."""
    if backup.status != Backup.Status.SUCCEEDED:
        raise OperationFailed(f"{backup.name} has no files to download")
    source = store.local() if backup.local else store.remote()
    if source is None:
        raise OperationFailed(f"{backup.name} is only in a bucket, and BACKUP_S3_BUCKET is not set")
    try:
        data = source.read_manifest(store.check_name(backup.name))
        document = manifest.parse(data)
    except (OperationFailed, manifest.ManifestError) as exc:
        raise OperationFailed(f"{backup.name} cannot be downloaded: {exc}") from None
    audit.record(actor=actor, action="backup.downloaded", target=backup.name, request=request)
    return bundle.stream(source, backup.name, document, data)
