"""The workflows. The admin, the views, the Celery tasks and the management commands all call
these functions and nothing else: no workflow is written twice."""

import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.db import close_old_connections, connection
from django.utils import timezone

import trusca
from trusca.backups import bundle, database, gz, locks, maintenance, manifest, storage, workspace
from trusca.backups.models import Backup
from trusca.backups.naming import format_name, parse_name
from trusca.backups.progress import Counter, Reporter, Ticker
from trusca.portal import audit
from trusca.portal.models import AuditEvent

log = logging.getLogger("trusca.backups")
# How often a running operation refreshes its progress and heartbeat: a quarter second keeps the
# admin's bar moving; one small UPDATE each time is nothing beside the work it reports on.
PROGRESS_INTERVAL = 0.25


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
        row = _new_running_row(kind=kind, actor=actor)
        return _run_backup(row, lock, bundle_too=bundle_too, prune=prune, reporter=reporter or Reporter())
    finally:
        lock.release()


def _new_running_row(*, kind: str, actor: str) -> Backup:
    name, when = _free_name(kind, timezone.now().replace(microsecond=0))
    now = timezone.now()
    return Backup.objects.create(
        name=name,
        kind=kind,
        status=Backup.Status.RUNNING,
        created_at=when,
        started_at=now,
        heartbeat_at=now,
        actor=actor,
    )


def backup_enqueue(*, kind: str, actor: str, request=None) -> Backup:
    """Reserve the lock and a queued row for a backup a worker will run (the admin's path).

    Raises ``locks.Busy`` when a backup or restore is queued or running."""
    backup_sweep_stale()
    name, when = _free_name(kind, timezone.now().replace(microsecond=0))
    lock = locks.OperationLock(f"a {kind} backup", owner=f"backup:{name}").acquire()
    try:
        row = Backup.objects.create(
            name=name, kind=kind, status=Backup.Status.QUEUED, created_at=when, heartbeat_at=timezone.now(), actor=actor
        )
    except BaseException:
        lock.release()
        raise
    audit.record(actor=actor, action="backup.requested", target=name, detail={"kind": kind}, request=request)
    return row


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

        with Ticker(_in_thread(beat), interval=PROGRESS_INTERVAL):
            # The database and the workspace are compressed at the same time, one per core.
            dumper = _Background(_dump_to, staging / dump_name, progress=counter.add)
            try:
                archived = workspace.archive(ws_root, staging / manifest.WORKSPACE_ARCHIVE, progress=counter.add)
            finally:
                dumper.join(reraise=False)
            dumper.join()
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
            "files": {dump_name: dumper.result, manifest.WORKSPACE_ARCHIVE: archived},
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


def _dump_to(path: Path, *, progress) -> dict:
    with gz.GzipFileWriter(path) as out:
        database.dump(out, progress=progress)
    return out.raw.entry()


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
            storage.discard(storage.staging_path(row.name))
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
        except (OSError, EOFError, gz.BadGzipFile) as exc:
            raise VerifyFailed(f"{name} is not an intact gzip stream ({exc})") from None
    return VerifyReport(path=directory, manifest=document, members=members)


@contextmanager
def unpacked_bundle(source, *, label: str = "bundle") -> Iterator[Path]:
    """A bundle unpacked into a staging directory beside the backups, removed afterwards."""
    directory = storage.staging_dir(f"{label}-{os.getpid()}-{timezone.now():%Y%m%d%H%M%S%f}")
    try:
        try:
            bundle.unpack(source, directory)
        except bundle.BundleError as exc:
            raise VerifyFailed(str(exc)) from None
        yield directory
    finally:
        storage.discard(directory)


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
    """The bundle of a succeeded backup as a stream of chunks."""
    path = storage.path_of(backup.name)
    if backup.status != Backup.Status.SUCCEEDED or not path.is_dir():
        raise OperationFailed(f"{backup.name} has no files to download")
    audit.record(actor=actor, action="backup.downloaded", target=backup.name, request=request)
    return bundle.stream(path)


# Restore -------------------------------------------------------------------------------------

RESTORE_STATUS_KEY = "trusca:restore:status"


class RestoreRefused(OperationFailed):
    """Preflight found a reason not to restore; nothing was changed."""


@dataclass
class RestorePlan:
    source: Path
    directory: Path
    manifest: dict
    taken_at: datetime
    live_revision: str
    behind: list[str]
    workspace_path: Path

    @property
    def has_workspace(self) -> bool:
        return manifest.WORKSPACE_ARCHIVE in self.manifest["files"]

    @property
    def dump(self) -> str:
        return manifest.DUMP_FILES[self.manifest["engine"]]


@dataclass
class RestoreOutcome:
    plan: RestorePlan
    safety_backup: Path | None
    revision_after: str
    audit_events_kept: int


@contextmanager
def restore_prepare(*, source: Path) -> Iterator[RestorePlan]:
    """Preflight, touching nothing live: unpack a bundle beside the backups if need be, verify
    every file and member, and compare migrations. Yields the plan to show the operator."""
    if source.is_file():
        with unpacked_bundle(source, label="restore") as directory:
            yield _preflight(source, directory)
    else:
        yield _preflight(source, source)


def _preflight(source: Path, directory: Path) -> RestorePlan:
    try:
        report = verify_directory(directory)
    except VerifyFailed as exc:
        raise RestoreRefused(f"{exc}. Nothing was changed.") from None
    document = report.manifest
    if document["engine"] != database.engine():
        raise RestoreRefused(
            f"this backup holds a {document['engine']} database but the portal runs on {database.engine()}. "
            "Nothing was changed."
        )
    unknown, behind = manifest.compare_migrations(document["migrations"])
    if unknown:
        raise RestoreRefused(
            f"this backup was taken by newer code: it has migrations this code does not know "
            f"({', '.join(unknown)}). Deploy TRUSCA {document['app_version']} or newer, then restore again. "
            "Nothing was changed."
        )
    try:
        taken_at = datetime.fromisoformat(document["timestamp"])
    except (TypeError, ValueError):
        raise RestoreRefused(f"manifest.json has an unreadable timestamp {document['timestamp']!r}") from None
    return RestorePlan(
        source=source,
        directory=directory,
        manifest=document,
        taken_at=taken_at,
        live_revision=manifest.live_revision(),
        behind=behind,
        workspace_path=settings.WORKSPACE_HOST_PATH,
    )


def restore_status() -> dict | None:
    """Live progress of a restore; it lives in the cache because the database is being replaced."""
    return cache.get(RESTORE_STATUS_KEY)


def restore_run(
    *, plan: RestorePlan, actor: str, safety_backup: bool = True, reporter: Reporter | None = None
) -> RestoreOutcome:
    """Replace the database and the workspace with the backup's, following DESIGN.md's protocol.
    Until the database transaction commits, a failure leaves both exactly as they were."""
    reporter = reporter or Reporter()
    lock = locks.OperationLock(f"a restore from {plan.source.name}").acquire()
    status = _RestoreStatus(plan)
    try:
        safety = None
        if safety_backup:
            status.set("safety backup", 0)
            row = _new_running_row(kind=Backup.Kind.PRE_RESTORE, actor=actor)
            safety = _run_backup(row, lock, bundle_too=False, prune=False, reporter=Reporter()).path
            reporter.step(f"safety backup → {safety} (restore it to undo this restore)")
        # Audit events are the one record that must outlive the restore: keep those the backup predates.
        later_events = list(
            AuditEvent.objects.filter(timestamp__gt=plan.taken_at)
            .order_by("timestamp", "id")
            .values("actor", "action", "target", "detail", "ip", "timestamp")
        )
        maintenance.enter(f"Restoring the backup {plan.source.name}")
        reporter.step("maintenance mode on (the web answers 503, workers hold other work)")
        try:
            _replace_state(plan, lock, status, reporter)
        finally:
            # The live state is either untouched or fully restored here; either way, reopen.
            maintenance.leave()
        kept = _after_restore(plan, actor, later_events)
        reporter.step(f"sessions flushed, backup catalog rebuilt, {kept} later audit events kept")
        reporter.step("portal back online")
        status.finish()
        return RestoreOutcome(
            plan=plan, safety_backup=safety, revision_after=manifest.live_revision(), audit_events_kept=kept
        )
    except Exception as exc:
        status.fail(str(exc))
        if isinstance(exc, OperationFailed):
            raise
        raise OperationFailed(str(exc)) from exc
    finally:
        lock.release()


def _replace_state(plan: RestorePlan, lock: locks.OperationLock, status, reporter: Reporter) -> None:
    live_ws = plan.workspace_path
    staging = live_ws.with_name(f".{live_ws.name}.restore-staging")
    total = sum(e["size"] for e in plan.manifest["files"].values())
    counter = Counter(total)

    def beat() -> None:
        lock.heartbeat()
        maintenance.renew(f"Restoring the backup {plan.source.name}")
        status.tick(counter.percent)
        reporter.progress(counter.done, counter.total)

    extraction = None
    with Ticker(_in_thread(beat), interval=PROGRESS_INTERVAL):
        if plan.has_workspace:
            storage.discard(staging)  # left by a restore that was killed
            # The workspace is staged while the database loads: one core each.
            extraction = _Background(
                workspace.extract,
                plan.directory / manifest.WORKSPACE_ARCHIVE,
                staging,
                expected=plan.manifest["files"][manifest.WORKSPACE_ARCHIVE],
                progress=counter.add,
            )
        status.set("restoring the database", counter.percent)

        def workspace_staged() -> None:
            # The database commits only once the workspace is staged whole: both change or neither.
            if extraction is not None:
                extraction.join()
                reporter.step("workspace extracted into staging")

        path, expected = plan.directory / plan.dump, plan.manifest["files"][plan.dump]
        reader = gz.HashingReader(path, progress=counter.add)

        def checked_and_staged() -> None:
            if reader.entry() != expected:
                raise database.DatabaseError(f"{path.name} changed while it was being restored (checksum mismatch)")
            workspace_staged()

        try:
            with gz.open_read(reader) as source:
                database.restore(source, marker=secrets.token_hex(16), before_commit=checked_and_staged)
            database.forget_markers()
        except database.TransactionEndedEarly as exc:
            if extraction is not None:
                extraction.join(reraise=False)
            storage.discard(staging)
            raise OperationFailed(f"restoring the database failed: {exc}. The workspace is unchanged.") from None
        except (workspace.WorkspaceError, OSError, database.DatabaseError) as exc:
            if extraction is not None:
                extraction.join(reraise=False)
            storage.discard(staging)
            what = "extracting the workspace" if isinstance(exc, workspace.WorkspaceError) else "restoring the database"
            raise OperationFailed(
                f"{what} failed: {_reason(exc)}. The database was rolled back: the database and the workspace "
                "are unchanged."
            ) from None
        reporter.step("database restored")
        if plan.has_workspace:
            status.set("swapping the workspace in", 99)
            _swap_in(staging, live_ws)
            reporter.step("workspace restored")
        else:
            reporter.step(f"workspace left as it is: the backup holds no {manifest.WORKSPACE_ARCHIVE}", ok=False)


class _Background:
    """Runs a function in a thread (closing the database connection it opened there); join()
    re-raises what it raised, in the caller."""

    def __init__(self, fn, *args, **kwargs):
        self.error: BaseException | None = None
        self.result = None

        def run() -> None:
            try:
                self.result = fn(*args, **kwargs)
            except BaseException as exc:
                self.error = exc
            finally:
                connection.close()

        self._thread = threading.Thread(target=run, name="trusca-background", daemon=True)
        self._thread.start()

    def join(self, *, reraise: bool = True) -> None:
        self._thread.join()
        if reraise and self.error is not None:
            raise self.error


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _swap_in(staging: Path, live: Path) -> None:
    old = live.with_name(f".{live.name}.restore-old")
    storage.discard(old)
    if live.exists():
        os.rename(live, old)
    os.rename(staging, live)
    storage.discard(old)


def _after_restore(plan: RestorePlan, actor: str, later_events: list[dict]) -> int:
    connection.close()
    tables = set(connection.introspection.table_names())
    if Session._meta.db_table in tables:
        # Sessions in the restored table belong to the backup's era: everyone signs in again.
        Session.objects.all().delete()
    if Backup._meta.db_table in tables:
        catalog_sync()
    if AuditEvent._meta.db_table not in tables:
        return 0
    AuditEvent.objects.bulk_create(AuditEvent(**event) for event in later_events)
    audit.record(
        actor=actor,
        action="backup.restored",
        target=plan.source.name,
        detail={"taken_at": plan.manifest["timestamp"], "db_revision": plan.manifest["db_revision"]},
    )
    return len(later_events)


class _RestoreStatus:
    def __init__(self, plan: RestorePlan):
        self.state = {"source": plan.source.name, "step": "starting", "percent": 0, "state": "running", "error": ""}

    def set(self, step: str, percent: int) -> None:
        self.state.update(step=step, percent=percent)
        cache.set(RESTORE_STATUS_KEY, self.state, timeout=24 * 3600)

    def tick(self, percent: int) -> None:
        self.set(self.state["step"], percent)

    def finish(self) -> None:
        self.state.update(step="done", percent=100, state="succeeded")
        cache.set(RESTORE_STATUS_KEY, self.state, timeout=24 * 3600)

    def fail(self, error: str) -> None:
        self.state.update(state="failed", error=error)
        cache.set(RESTORE_STATUS_KEY, self.state, timeout=24 * 3600)
