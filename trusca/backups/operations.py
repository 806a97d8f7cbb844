"""The workflows. The admin, the views, the Celery tasks and the management commands all call
these functions and nothing else: no workflow is written twice."""

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

import trusca
from trusca.backups import bundle, database, gz, locks, manifest, storage, workspace
from trusca.backups.models import Backup
from trusca.backups.naming import format_name, parse_name
from trusca.backups.progress import Counter, Reporter, Ticker
from trusca.portal import audit

log = logging.getLogger("trusca.backups")


class OperationFailed(Exception):
    pass


class BackupFailed(OperationFailed):
    pass


class VerifyFailed(OperationFailed):
    pass


@dataclass
class BackupOutcome:
    backup: Backup
    path: Path
    files: dict[str, int]
    db_revision: str
    bundle_path: Path | None = None
    pruned: list[str] = field(default_factory=list)


# Backup --------------------------------------------------------------------------------------


def _free_name(kind: str, when: datetime) -> tuple[str, datetime]:
    # The names have one-second resolution; a second backup in the same second takes the next.
    while True:
        name = format_name(kind, when)
        if not storage.path_of(name).exists() and not Backup.objects.filter(name=name).exists():
            return name, when
        when += timedelta(seconds=1)


def backup_create(
    *, kind: str, actor: str, bundle_too: bool = False, prune: bool = True, reporter: Reporter | None = None
) -> BackupOutcome:
    """Take a backup now, in this process (the CLI's path)."""
    lock = locks.OperationLock(f"a {kind} backup").acquire()
    try:
        name, when = _free_name(kind, timezone.now().replace(microsecond=0))
        row = Backup.objects.create(
            name=name,
            kind=kind,
            status=Backup.Status.RUNNING,
            created_at=when,
            started_at=timezone.now(),
            heartbeat_at=timezone.now(),
            actor=actor,
        )
        return _run_backup(row, lock, bundle_too=bundle_too, prune=prune, reporter=reporter or Reporter())
    finally:
        lock.release()


def backup_enqueue(*, kind: str, actor: str) -> Backup:
    """Reserve the lock and a queued row for a backup a worker will run (the admin's path).

    Raises ``locks.Busy`` when a backup or restore is queued or running."""
    backup_sweep_stale()
    name, when = _free_name(kind, timezone.now().replace(microsecond=0))
    lock = locks.OperationLock(f"a {kind} backup", owner=f"backup:{name}").acquire()
    try:
        return Backup.objects.create(
            name=name, kind=kind, status=Backup.Status.QUEUED, created_at=when, heartbeat_at=timezone.now(), actor=actor
        )
    except BaseException:
        lock.release()
        raise


def backup_run_queued(*, backup_id: int, reporter: Reporter | None = None) -> BackupOutcome | None:
    """Run a queued backup; None when another worker claimed it or it is no longer queued."""
    claimed = Backup.objects.filter(id=backup_id, status=Backup.Status.QUEUED).update(
        status=Backup.Status.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now()
    )
    if claimed != 1:
        return None
    row = Backup.objects.get(id=backup_id)
    lock = locks.adopt(f"backup:{row.name}")
    if lock is None:
        try:
            lock = locks.OperationLock(f"a {row.kind} backup", owner=f"backup:{row.name}").acquire()
        except locks.Busy as exc:
            _fail(row, f"not started: {exc}")
            raise BackupFailed(str(exc)) from None
    try:
        return _run_backup(row, lock, bundle_too=False, prune=True, reporter=reporter or Reporter())
    finally:
        lock.release()


def _run_backup(
    row: Backup, lock: locks.OperationLock, *, bundle_too: bool, prune: bool, reporter: Reporter
) -> BackupOutcome:
    ws_root = settings.WORKSPACE_HOST_PATH
    staging = None
    try:
        reporter.started(storage.path_of(row.name))
        staging = storage.staging_dir(row.name)
        db_size = database.size()
        counter = Counter(db_size + (workspace.measure(ws_root) if ws_root.is_dir() else 0))
        applied = manifest.applied_migrations()
        dump_name = manifest.DUMP_FILES[database.engine()]

        def beat() -> None:
            lock.heartbeat()
            Backup.objects.filter(pk=row.pk).update(progress=counter.percent, heartbeat_at=timezone.now())
            reporter.progress(counter.done, counter.total)

        results: dict[str, dict] = {}
        errors: list[BaseException] = []

        def dump_database() -> None:
            try:
                results[dump_name] = database.dump(staging / dump_name, progress=counter.add)
            except BaseException as exc:
                errors.append(exc)
            finally:
                connection.close()

        with Ticker(_in_thread(beat), interval=0.5):
            # The database and the workspace are compressed at the same time, one per core.
            dumper = threading.Thread(target=dump_database, name="trusca-dump")
            dumper.start()
            try:
                results[manifest.WORKSPACE_ARCHIVE] = workspace.archive(
                    ws_root, staging / manifest.WORKSPACE_ARCHIVE, progress=counter.add
                )
            finally:
                dumper.join()
        if errors:
            raise errors[0]
        revision = manifest.db_revision(applied)
        document = {
            "format": manifest.FORMAT,
            "timestamp": row.created_at.isoformat(),
            "kind": row.kind,
            "engine": database.engine(),
            "db_revision": revision,
            "migrations": manifest.latest_per_app(applied),
            "db_size": db_size,
            "workspace_path": str(ws_root),
            "app_version": trusca.__version__,
            "files": {dump_name: results[dump_name], manifest.WORKSPACE_ARCHIVE: results[manifest.WORKSPACE_ARCHIVE]},
        }
        manifest.write(staging, document)
        final = storage.publish(staging, row.name)
        staging = None
    except Exception as exc:
        if staging is not None:
            storage.discard(staging)
        message = _describe(exc)
        _fail(row, message)
        raise BackupFailed(message) from exc
    files = {name: (final / name).stat().st_size for name in bundle.MEMBER_ORDER if (final / name).exists()}
    Backup.objects.filter(pk=row.pk).update(
        status=Backup.Status.SUCCEEDED,
        progress=100,
        finished_at=timezone.now(),
        heartbeat_at=timezone.now(),
        size_bytes=sum(files.values()),
        db_revision=revision,
        manifest=document,
        message="",
    )
    row.refresh_from_db()
    audit.record(
        actor=row.actor or "system",
        action="backup.created",
        target=row.name,
        detail={"kind": row.kind, "size": row.size_bytes},
    )
    outcome = BackupOutcome(backup=row, path=final, files=files, db_revision=revision)
    if bundle_too:
        outcome.bundle_path = final.with_name(f"{row.name}.tar.gz")
        bundle.write(final, outcome.bundle_path)
    if prune:
        outcome.pruned = backup_prune()
    return outcome


def _in_thread(fn):
    def call() -> None:
        try:
            fn()
        finally:
            connection.close()

    return call


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}; the partial backup was removed"
    return f"{exc}; the partial backup was removed"


def _fail(row: Backup, message: str) -> None:
    Backup.objects.filter(pk=row.pk).update(status=Backup.Status.FAILED, finished_at=timezone.now(), message=message)
    log.error("backup %s failed: %s", row.name, message)


def backup_sweep_stale() -> list[str]:
    """Mark failed the queued or running rows whose worker fell silent; remove their files."""
    cutoff = timezone.now() - timedelta(seconds=settings.BACKUP_STALE_SECONDS)
    holder = locks.current() or {}
    swept = []
    for row in Backup.objects.filter(status__in=[Backup.Status.QUEUED, Backup.Status.RUNNING], heartbeat_at__lt=cutoff):
        if holder.get("owner") == f"backup:{row.name}":
            continue
        if Backup.objects.filter(pk=row.pk, status=row.status).update(
            status=Backup.Status.FAILED,
            finished_at=timezone.now(),
            message=f"worker lost: no heartbeat for {settings.BACKUP_STALE_SECONDS} s; its partial files were removed",
        ):
            storage.discard(storage.root() / f"{storage.STAGING_PREFIX}{row.name}")
            swept.append(row.name)
    return swept


# Pruning -------------------------------------------------------------------------------------

PRUNABLE_KINDS = (Backup.Kind.AUTO, Backup.Kind.CLI)


def backup_prune(*, now: datetime | None = None) -> list[str]:
    """Remove auto and cli backups older than BACKUP_RETENTION_DAYS, oldest first. Manual ones are
    kept, and so is the newest complete backup whatever its age: retention never leaves none."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.BACKUP_RETENTION_DAYS)
    stored = storage.list_backups()
    complete = [b for b in stored if b.manifest is not None]
    newest = complete[-1].name if complete else None
    removed = []
    for item in stored:
        if item.kind in PRUNABLE_KINDS and item.timestamp < cutoff and item.name != newest:
            storage.delete(item.name)
            Backup.objects.filter(name=item.name).delete()
            removed.append(item.name)
    return removed


# Verify --------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    path: Path
    manifest: dict
    members: int


def backup_verify(*, path: Path) -> VerifyReport:
    """Every check short of restoring: manifest, sizes, checksums, gzip streams, tar listing."""
    if path.is_file():
        with unpacked_bundle(path) as directory:
            report = verify_directory(directory)
            report.path = path
            return report
    if not path.is_dir():
        raise VerifyFailed(f"{path} is neither a backup directory nor a bundle file")
    return verify_directory(path)


def verify_directory(directory: Path) -> VerifyReport:
    try:
        document = manifest.read(directory)
    except manifest.ManifestError as exc:
        raise VerifyFailed(str(exc)) from None
    for name, entry in document["files"].items():
        path = directory / name
        if not path.is_file():
            raise VerifyFailed(f"{name} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise VerifyFailed(f"{name} is {size} bytes; the manifest says {entry['size']} (truncated or altered)")
        if gz.sha256_file(path) != entry["sha256"]:
            raise VerifyFailed(f"{name} does not match its sha256 in the manifest (corrupted or altered)")
    members = 0
    for name in document["files"]:
        try:
            if name == manifest.WORKSPACE_ARCHIVE:
                members = workspace.check(directory / name)
            else:
                gz.test_stream(directory / name)
        except workspace.WorkspaceError as exc:
            raise VerifyFailed(str(exc)) from None
        except (OSError, EOFError, gz.gzip_ng.BadGzipFile) as exc:
            raise VerifyFailed(f"{name} is not an intact gzip stream ({exc})") from None
    return VerifyReport(path=directory, manifest=document, members=members)


class unpacked_bundle:
    """A bundle unpacked into a staging directory beside the backups, removed afterwards."""

    def __init__(self, source, *, label: str = "bundle"):
        self.source, self.label = source, label

    def __enter__(self) -> Path:
        self.directory = storage.staging_dir(f"{self.label}-{os.getpid()}-{timezone.now():%Y%m%d%H%M%S%f}")
        try:
            bundle.unpack(self.source, self.directory)
        except bundle.BundleError as exc:
            storage.discard(self.directory)
            raise VerifyFailed(str(exc)) from None
        except BaseException:
            storage.discard(self.directory)
            raise
        return self.directory

    def __exit__(self, *exc):
        storage.discard(self.directory)


def resolve_source(source: str) -> Path:
    """A backup directory, a bundle file, or a backup's name in the catalog or storage."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if parse_name(source) is not None:
        candidate = storage.path_of(source)
        if candidate.is_dir():
            return candidate
        if candidate.with_name(f"{source}.tar.gz").is_file():
            return candidate.with_name(f"{source}.tar.gz")
    raise OperationFailed(f"{source} is not a backup directory, a bundle file, or the name of a stored backup")


# Catalog -------------------------------------------------------------------------------------


def catalog_sync() -> None:
    """Make the Backup table agree with storage, which is the truth."""
    stored = {b.name: b for b in storage.list_backups()}
    Backup.objects.filter(status=Backup.Status.SUCCEEDED).exclude(name__in=list(stored)).delete()
    existing = set(Backup.objects.filter(name__in=list(stored)).values_list("name", flat=True))
    for name, item in stored.items():
        values = {
            "kind": item.kind if item.kind in Backup.Kind.values else Backup.Kind.CLI,
            "created_at": item.timestamp,
            "size_bytes": item.size,
            "db_revision": (item.manifest or {}).get("db_revision", "")[:12],
            "manifest": item.manifest or {},
            "status": Backup.Status.SUCCEEDED if item.manifest else Backup.Status.FAILED,
            "message": item.error,
            "progress": 100 if item.manifest else 0,
        }
        if name in existing:
            Backup.objects.filter(name=name).update(**values)
        else:
            Backup.objects.create(name=name, **values)
    close_old_connections()


# Delete and download -------------------------------------------------------------------------


def backup_delete(*, backup: Backup, actor, request=None) -> None:
    """Remove a backup's files and its row. A queued or running one cannot be deleted."""
    if backup.is_active:
        raise OperationFailed(f"{backup.name} is {backup.status}; wait for it to finish before deleting it")
    storage.delete(backup.name)
    backup.delete()
    audit.record(actor=actor, action="backup.deleted", target=backup.name, request=request)


def backup_download(*, backup: Backup, actor, request=None):
    """The bundle of a succeeded backup as a stream of chunks, and its approximate size."""
    path = storage.path_of(backup.name)
    if backup.status != Backup.Status.SUCCEEDED or not path.is_dir():
        raise OperationFailed(f"{backup.name} has no files to download")
    audit.record(actor=actor, action="backup.downloaded", target=backup.name, request=request)
    return bundle.stream(path), bundle.size_estimate(path)
