"""Taking a backup: in this process (the CLI, a restore's safety backup) or queued for a worker
(the admin, the schedule). Both run ``_run_backup``. With a bucket configured, a backup that
succeeded is then copied off the host (operations/offload.py): by the CLI in its process, or by a
task of its own on the worker; a copy that fails never fails the backup."""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

import trusca
from trusca.backups import bundle, crypto, database, locks, manifest, store, workspace
from trusca.backups.errors import Interrupted, OperationFailed
from trusca.backups.models import Backup
from trusca.backups.naming import format_name
from trusca.backups.operations.lifecycle import Background, Cancelled, Run, interruptible, outcomes, reason, ticking
from trusca.backups.progress import Counter, Reporter
from trusca.backups.streams import MemberWriter
from trusca.portal import audit

log = logging.getLogger("trusca.backups")


class BackupFailed(OperationFailed):
    pass


@dataclass
class BackupOutcome:
    backup: Backup
    files: dict[str, int]  # stored name -> bytes, the manifest last
    db_revision: str
    bundle_path: Path | None = None
    bundle_error: str = ""
    pruned: list[str] = field(default_factory=list)


def backup_create(
    *,
    kind: str,
    actor: str,
    bundle_too: bool = False,
    prune: bool = True,
    reporter: Reporter | None = None,
) -> BackupOutcome:
    """Take a backup now, in this process (the CLI's path; its copy to the bucket follows, with
    ``offload_run``, in this process too)."""
    from trusca.backups.operations.catalog import backup_prune
    from trusca.backups.operations.sweep import sweep

    sweep()
    name, when = _free_name(kind, timezone.now().replace(microsecond=0))
    lock = locks.OperationLock(f"a {kind} backup", owner=f"backup:{name}").acquire()
    run = Run(lock)
    reporter = reporter or Reporter()
    try:
        with interruptible(run):
            row = _new_running_row(name=name, when=when, kind=kind, actor=actor)
            outcome = _run_backup(row, run, reporter=reporter)
            if bundle_too:
                outcome.bundle_path, outcome.bundle_error = _write_bundle(outcome.backup, run, reporter)
    finally:
        lock.release()
    if prune:
        outcome.pruned = backup_prune()
    return outcome


def _free_name(kind: str, when: datetime) -> tuple[str, datetime]:
    # The names have one-second resolution; a second backup in the same second takes the next.
    local = store.local()
    while True:
        name = format_name(kind, when)
        if not local.exists(name) and not Backup.objects.filter(name=name).exists():
            return name, when
        when += timedelta(seconds=1)


def _new_running_row(*, name: str, when: datetime, kind: str, actor: str) -> Backup:
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


def safety_backup(*, run: Run, actor: str, reporter: Reporter) -> Backup:
    """The restore's backup of the live state, under the restore's own lock and run."""
    return _run_backup(safety_row(actor=actor), run, reporter=reporter).backup


def safety_row(*, actor: str) -> Backup:
    name, when = _free_name(Backup.Kind.PRE_RESTORE, timezone.now().replace(microsecond=0))
    return _new_running_row(name=name, when=when, kind=Backup.Kind.PRE_RESTORE, actor=actor)


def backup_enqueue(*, kind: str, actor: str, send: Callable[[int], None], request=None) -> Backup:
    """Reserve the lock and a queued row, and hand the row's id to ``send`` (the Celery task's
    ``delay``). Raises ``locks.Busy`` when a backup or restore is queued or running, and
    ``OperationFailed`` when the task queue refuses the job (nothing is then left held)."""
    from trusca.backups.operations.sweep import sweep

    sweep()
    name, when = _free_name(kind, timezone.now().replace(microsecond=0))
    lock = locks.OperationLock(f"a {kind} backup", owner=f"backup:{name}", this_process=False).acquire()
    try:
        row = Backup.objects.create(
            name=name, kind=kind, status=Backup.Status.QUEUED, created_at=when, heartbeat_at=timezone.now(), actor=actor
        )
    except BaseException:
        lock.release()
        raise
    audit.record(actor=actor, action="backup.requested", target=name, detail={"kind": kind}, request=request)
    try:
        send(row.pk)
    except Exception as exc:
        lock.release()
        message = f"not started: the task queue (CELERY_BROKER_URL) refused the job ({reason(exc)})"
        _fail(row, message)
        raise BackupFailed(f"{message}. Nothing was started; check that the broker is running, then try again.")
    return row


def backup_run_queued(
    *, backup_id: int, reporter: Reporter | None = None, offload: Callable[[str], None] | None = None
) -> BackupOutcome | None:
    """Run a queued backup; None when another worker claimed it or it is no longer queued.
    ``offload`` (the copy task's ``delay``) is handed the name of a backup that succeeded, when a
    bucket is configured: the copy is a task of its own, so the lock is free meanwhile."""
    from trusca.backups.operations.catalog import backup_prune

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
    run = Run(lock)
    try:
        with interruptible(run):
            outcome = _run_backup(row, run, reporter=reporter or Reporter())
    finally:
        lock.release()
    outcome.pruned = backup_prune()
    if offload is not None and store.remote() is not None:
        _queue_offload(row.name, offload)
    return outcome


def _queue_offload(name: str, send: Callable[[str], None]) -> None:
    Backup.objects.filter(name=name).update(offsite=Backup.Offsite.PENDING, offsite_progress=0, offsite_message="")
    try:
        send(name)
    except Exception as exc:
        message = f"not queued: the task queue (CELERY_BROKER_URL) refused the job ({reason(exc)}); retry it"
        Backup.objects.filter(name=name, offsite=Backup.Offsite.PENDING).update(
            offsite=Backup.Offsite.FAILED, offsite_message=message
        )
        outcomes.error("backup.offload_failed %s: %s", name, message)


def _run_backup(row: Backup, run: Run, *, reporter: Reporter) -> BackupOutcome:
    local = store.local()
    name = row.name
    ws_root = settings.WORKSPACE_HOST_PATH
    reporter.started(str(local.path(name)))
    try:
        db_size = database.size()
        counter = Counter(db_size + (workspace.measure(ws_root) if ws_root.is_dir() else 0))
        applied = manifest.applied_migrations()
        keys = crypto.EncryptionKeys.from_settings()
        suffix = manifest.ENCRYPTED_SUFFIX if keys else ""
        dump_name = manifest.DUMP_FILES[database.engine()] + suffix

        def beat() -> None:
            run.heartbeat()
            Backup.objects.filter(pk=row.pk).update(progress=counter.percent, heartbeat_at=timezone.now())
            reporter.progress(counter.done, counter.total)

        def write(member: str, produce) -> manifest.FileEntry:
            return write_member(name, member, produce, keys=keys, run=run, progress=counter.add)

        with ticking(beat):
            # The database and the workspace are compressed at the same time, one per core.
            dumper = Background(run, write, dump_name, database.dump)
            try:
                archived = write(
                    manifest.WORKSPACE_ARCHIVE + suffix,
                    lambda out, progress: workspace.archive(ws_root, out, progress=progress),
                )
            except Cancelled:
                dumper.join(reraise=False)
                run.raise_cause()
                raise
            finally:
                dumper.join(reraise=False)
            dumper.join()
        document = describe(
            kind=row.kind,
            created_at=row.created_at,
            applied=applied,
            db_size=db_size,
            files={dump_name: dumper.result, manifest.WORKSPACE_ARCHIVE + suffix: archived},
            keys=keys,
        )
        data = document.to_json()
        local.publish(name, data)
    except BaseException as exc:
        local.discard(name)
        interrupted = isinstance(exc, Interrupted) or run.signal is not None
        message = "interrupted" if interrupted else reason(exc)
        _fail(row, message)
        run.raise_if_interrupted()
        if interrupted:
            raise
        raise BackupFailed(f"{message}; the partial backup was removed") from exc
    return _succeeded(row, document, data)


def write_member(name: str, member: str, produce, *, keys, run: Run, progress) -> manifest.FileEntry:
    """One archive of the unpublished backup ``name``: ``produce(out, progress=…)`` writes it
    uncompressed; it is compressed, encrypted when keys are set, and hashed on its way."""
    upload = store.local().open_write(name, member)
    with MemberWriter(upload, name=member, encrypt=keys, checkpoint=run.checkpoint) as out:
        produce(out, progress=progress)
    return out.entry


def describe(*, kind: str, created_at, applied, db_size: int, files: dict, keys) -> manifest.Manifest:
    """The signed manifest of a backup holding ``files``."""
    return manifest.Manifest(
        timestamp=created_at,
        kind=kind,
        engine=database.engine(),
        db_revision=manifest.db_revision(applied),
        migrations=manifest.latest_per_app(applied),
        db_size=db_size,
        workspace_path=str(settings.WORKSPACE_HOST_PATH),
        app_version=trusca.__version__,
        files=files,
        encryption=keys.describe() if keys else None,
    ).signed()


def _succeeded(row: Backup, document: manifest.Manifest, data: bytes) -> BackupOutcome:
    name = row.name
    files = {member: entry.size for member, entry in document.files.items()} | {manifest.MANIFEST: len(data)}
    Backup.objects.filter(pk=row.pk).update(
        status=Backup.Status.SUCCEEDED,
        progress=100,
        finished_at=timezone.now(),
        heartbeat_at=timezone.now(),
        size_bytes=sum(files.values()),
        db_revision=document.db_revision,
        manifest=document.unsigned_document(),
        message="",
    )
    row.refresh_from_db()
    audit.record(actor=row.actor or "system", action="backup.created", target=name, detail={"kind": row.kind})
    outcomes.info("backup.completed %s (%s, %d bytes)", name, row.kind, row.size_bytes)
    return BackupOutcome(backup=row, files=files, db_revision=document.db_revision)


def _fail(row: Backup, message: str) -> None:
    Backup.objects.filter(pk=row.pk).update(status=Backup.Status.FAILED, finished_at=timezone.now(), message=message)
    record_failure(row, message)


def record_failure(row: Backup, message: str) -> None:
    audit.record(actor=row.actor or "system", action="backup.failed", target=row.name, detail={"reason": message})
    outcomes.error("backup.failed %s: %s", row.name, message)


def _write_bundle(row: Backup, run: Run, reporter: Reporter) -> tuple[Path | None, str]:
    """BACKUP_ROOT/<name>.tar.gz beside the backup. A failure (a full disk) removes the partial
    file and is reported; the backup itself stays good."""
    local = store.local()
    target = local.bundle_path(row.name)
    partial = local.partial_path(f"{row.name}.tar.gz")
    data = local.read_manifest(row.name)
    document = manifest.parse(data)
    counter = Counter(sum(entry.size for entry in document.files.values()) + len(data))
    reporter.phase("writing the bundle")
    try:
        with ticking(lambda: (run.heartbeat(), reporter.progress(counter.done, counter.total))):
            with open(partial, "xb") as out:
                for chunk in bundle.stream(local, row.name, document, data):
                    run.checkpoint()
                    out.write(chunk)
                    counter.add(len(chunk))
            partial.rename(target)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        run.raise_if_interrupted()
        if isinstance(exc, Interrupted):
            raise
        return None, f"{reason(exc)}; the partial bundle was removed"
    return target, ""
