"""Restoring a backup, following DESIGN.md's protocol, all-or-nothing at every instant.

Preflight touches nothing live. Then, under maintenance mode, a journal beside the workspace
records what the restore needs to finish: the staged and old workspace, the audit events to
carry over, and its state. The database's COMMIT carries the restore's marker in the same
transaction. Killed anywhere, the next start (``restore_recover``: any command, the worker, the
web) reads the journal and rolls back to both-old or forward to both-new; until then the
journal keeps the portal in maintenance mode.

    started -> prepared -> committing -> committed -> (journal removed)
      |           |             |
      +-----------+-------------+-> rolled back (the marker says whether COMMIT happened)
"""

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from django.conf import settings
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.db import connection, transaction
from django.utils import timezone

from trusca.backups import crypto, database, locks, maintenance, manifest, schedule, store, workspace
from trusca.backups.errors import Interrupted, NotFound, OperationFailed
from trusca.backups.models import Backup
from trusca.backups.operations import safety
from trusca.backups.operations.backup import safety_backup
from trusca.backups.operations.catalog import catalog_sync
from trusca.backups.operations.lifecycle import (
    Background,
    Cancelled,
    Run,
    fault_point,
    interruptible,
    outcomes,
    reason,
    shielded,
    ticking,
)
from trusca.backups.operations.sources import Source, SourceError, decryption_keys, open_source
from trusca.backups.operations.verify import VerifyFailed, backup_verify, check_trust, read_manifest
from trusca.backups.progress import Counter, Reporter
from trusca.backups.streams import IntegrityError, MemberReader, check_stored
from trusca.portal import audit
from trusca.portal.models import AuditEvent

log = logging.getLogger("trusca.backups")
RESTORE_STATUS_KEY = "trusca:restore:status"
# Staging a workspace costs more disk than its tar stream: each file takes whole blocks.
BLOCK_OVERHEAD = 4096


class RestoreRefused(OperationFailed):
    """Preflight found a reason not to restore; nothing was changed."""


class RestoreFailed(OperationFailed):
    pass


@dataclass
class RestorePlan:
    source: Source
    manifest: manifest.Manifest
    signature: str
    live_revision: str
    behind: list[str]
    workspace_path: Path
    members: int | None  # counted in preflight only when the backup was verified whole first
    keys: crypto.DecryptionKeys | None = field(default=None, repr=False)

    @property
    def taken_at(self) -> datetime:
        return self.manifest.timestamp

    @property
    def has_workspace(self) -> bool:
        return self.manifest.workspace is not None


@dataclass
class RestoreOutcome:
    plan: RestorePlan
    safety_backup: str | None
    revision_after: str
    audit_events_kept: int
    safety_pending: bool = False


# Preflight -------------------------------------------------------------------------------------


@contextlib.contextmanager
def restore_prepare(
    *,
    source: str,
    keys: crypto.DecryptionKeys | None = None,
    trust_unsigned: bool = False,
    safety_backup: bool = True,
    thorough: bool = False,
    reporter: Reporter | None = None,
) -> Iterator[RestorePlan]:
    """Preflight, touching nothing live. Yields the plan to show the operator. ``keys`` open an
    encrypted backup (by default the installation's BACKUP_ENCRYPTION_PASSPHRASE); ``reporter``
    hears the download of a backup from the bucket. A bundle (a file or an upload, from
    elsewhere) is verified whole even when signed, as is any backup with ``thorough``."""
    keys = keys or decryption_keys()
    with contextlib.ExitStack() as stack:
        try:
            src = stack.enter_context(open_source(source, keys=keys, reporter=reporter))
            plan = _preflight(
                src, keys=keys, trust_unsigned=trust_unsigned, safety_backup=safety_backup, thorough=thorough
            )
        except (VerifyFailed, SourceError, crypto.EncryptionError) as exc:
            raise RestoreRefused(f"{exc}. Nothing was changed.") from None
        yield plan


def _preflight(
    src: Source, *, keys: crypto.DecryptionKeys | None, trust_unsigned: bool, safety_backup: bool, thorough: bool
) -> RestorePlan:
    """What must hold before anything starts. A backup signed with this installation's key has
    every file's size and sha256 vouched for: preflight checks the signature, the stored bytes'
    hashes (one cheap read, which catches a damaged copy before the portal goes down), the keys,
    the migrations and the free space; decompressing and checking every member happens once,
    while the load and the staging read them, and the database commits only if it all held. A
    backup trusted with --trust-unsigned has sizes no key vouches for: it is verified whole first."""
    document = read_manifest(src)
    state = check_trust(document, trust_unsigned=trust_unsigned)
    sizes_known = all(entry.uncompressed_size is not None for entry in document.files.values())
    if thorough or src.unpacked or not manifest.trusted(state) or not sizes_known:
        report = backup_verify(src, keys=keys, trust_unsigned=trust_unsigned)
        if report.unchecked:
            _refuse_encrypted(report.unchecked)
        uncompressed, members = report.uncompressed, report.members
    else:
        _check_stored(src, document, keys=keys)
        uncompressed = {name: entry.uncompressed_size for name, entry in document.files.items()}
        members = None
    if document.engine != database.engine():
        raise RestoreRefused(
            f"this backup holds a {document.engine} database but the portal runs on {database.engine()}. "
            "Nothing was changed."
        )
    unknown, behind = manifest.compare_migrations(document.migrations)
    if unknown:
        raise RestoreRefused(
            f"this backup was taken by newer code: it has migrations this code does not know "
            f"({', '.join(unknown)}). Deploy TRUSCA {document.app_version} or newer, then restore again. "
            "Nothing was changed."
        )
    _check_free_space(document, uncompressed, members, safety_backup=safety_backup)
    return RestorePlan(
        source=src,
        manifest=document,
        signature=state,
        live_revision=manifest.live_revision(),
        behind=behind,
        workspace_path=settings.WORKSPACE_HOST_PATH,
        members=members,
        keys=keys,
    )


def _check_stored(src: Source, document: manifest.Manifest, *, keys: crypto.DecryptionKeys | None) -> None:
    for name, entry in document.files.items():
        try:
            if src.encrypted(name):
                if keys is None:
                    _refuse_encrypted([name])
                with src.reader(name, entry, keys=keys) as reader:
                    reader.read(1)  # the keys open it: a wrong one is refused now, not after the safety backup
            if not name.endswith(manifest.ENCRYPTED_SUFFIX) and src.encrypted(name):
                continue  # encrypted by hand: the manifest's hashes are of the plaintext, checked as it loads
            check_stored(src.store.open_read(src.name, name), name, entry)
        except NotFound:
            raise RestoreRefused(f"{name} is missing. Nothing was changed.") from None
        except (IntegrityError, crypto.EncryptionError) as exc:
            raise RestoreRefused(f"{exc}. Nothing was changed.") from None


def _refuse_encrypted(names: list[str]) -> None:
    raise RestoreRefused(
        f"this backup is encrypted ({', '.join(names)}) and no key given opens it: set "
        "BACKUP_ENCRYPTION_PASSPHRASE to the passphrase it was made with, or give the private key "
        "(--decryption-key). Nothing was changed."
    )


def _check_free_space(
    document: manifest.Manifest, uncompressed: dict[str, int], members: int | None, *, safety_backup: bool
) -> None:
    """Staging must fit beside the live state, which stays whole until the swap."""
    needs: dict[Path, int] = {}

    def need(directory: Path, size: int) -> None:
        while not directory.exists():
            directory = directory.parent
        needs[directory] = needs.get(directory, 0) + size

    if document.workspace:
        size = uncompressed[document.workspace]
        # Each file takes whole blocks: counted when the members are known, estimated otherwise.
        size += members * BLOCK_OVERHEAD if members is not None else size // 4
        need(settings.WORKSPACE_HOST_PATH.parent, size)
    if document.engine == "sqlite":
        need(Path(settings.DATABASES["default"]["NAME"]).parent, uncompressed[document.dump])
    if safety_backup:
        latest = Backup.objects.filter(status=Backup.Status.SUCCEEDED).order_by("-created_at").first()
        need(settings.BACKUP_ROOT, latest.size_bytes if latest else sum(e.size for e in document.files.values()))
    by_device: dict[int, list[tuple[Path, int]]] = {}
    for directory, size in needs.items():
        by_device.setdefault(os.stat(directory).st_dev, []).append((directory, size))
    for entries in by_device.values():
        wanted = sum(size for _, size in entries)
        free = shutil.disk_usage(entries[0][0]).free
        if wanted > free:
            where = ", ".join(str(d) for d, _ in entries)
            raise RestoreRefused(
                f"not enough free disk space: the restore needs about {_mb(wanted)} on the filesystem of {where} "
                f"(staging{' and the safety backup' if safety_backup else ''}), and {_mb(free)} are free. "
                "Free some space, then restore again. Nothing was changed."
            )


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 1e6 else f"{size:,} bytes"


# The journal -----------------------------------------------------------------------------------


class Journal:
    """The restore's record of what it needs to finish, written atomically at each step."""

    def __init__(self, data: dict):
        self.data = data

    @staticmethod
    def path() -> Path:
        return maintenance.journal_path()

    @classmethod
    def load(cls) -> "Journal | None":
        try:
            return cls(json.loads(cls.path().read_text()))
        except FileNotFoundError:
            return None

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def state(self) -> str:
        return self.data["state"]

    @property
    def staging(self) -> Path:
        return Path(self.data["staging"])

    @property
    def old(self) -> Path:
        return Path(self.data["old"])

    @property
    def live(self) -> Path:
        return Path(self.data["live"])

    def write(self, **changes) -> None:
        self.data.update(changes)
        path = self.path()
        partial = path.with_name(f"{path.name}.writing")
        with open(partial, "w") as fh:
            json.dump(self.data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
        _fsync_dir(path.parent)

    def remove(self) -> None:
        self.path().unlink(missing_ok=True)
        _fsync_dir(self.path().parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The restore -----------------------------------------------------------------------------------


def restore_status() -> dict | None:
    """Live progress of a restore; it lives in the cache because the database is being replaced."""
    return cache.get(RESTORE_STATUS_KEY)


def restore_run(
    *,
    plan: RestorePlan,
    actor: str,
    safety_backup: bool = True,
    reporter: Reporter | None = None,
    lock: locks.OperationLock | None = None,
) -> RestoreOutcome:
    """Replace the database and the workspace with the backup's. Until the database commits, a
    failure or an interruption leaves both exactly as they were. ``lock``: the operation lock a
    queued restore already holds (handed over from the request that queued it, so nothing can
    start in between); taken here otherwise. Released either way."""
    from trusca.backups.operations.sweep import sweep

    reporter = reporter or Reporter()
    sweep()
    restore_id = uuid.uuid4().hex
    lock = lock or locks.OperationLock(f"a restore from {plan.source.label}", owner=f"restore:{restore_id}").acquire()
    run = Run(lock)
    status = _Status(plan.source.label)
    live = plan.workspace_path
    journal = Journal(
        {
            "id": restore_id,
            "state": "started",
            "source": plan.source.title,
            "actor": actor,
            "started": timezone.now().isoformat(),
            "taken_at": plan.taken_at.isoformat(),
            "db_revision": plan.manifest.db_revision,
            "live": str(live),
            "staging": str(live.with_name(f".{live.name}.restore-staging")),
            "old": str(live.with_name(f".{live.name}.restore-old")),
            "has_workspace": plan.has_workspace,
            "safety_backup": None,
            "safety": None,
            "holds_maintenance": True,
            "events": [],
        }
    )
    try:
        with interruptible(run):
            if (left := Journal.load()) is not None and left.state != "damaged":
                raise RestoreFailed("an earlier restore was interrupted and is not finished; run it to its end first")
            fault_point("before-maintenance")
            journal.write()
            maintenance.enter(f"Restoring the backup {plan.source.label}")
            reporter.step("maintenance mode on (the web answers 503, workers hold other work)")
            try:
                copy = None
                if safety_backup and plan.has_workspace:
                    # Taken while the new workspace stages: the database now, the workspace it
                    # replaces once the portal is back online (see operations/safety.py).
                    copy = safety.begin(actor=actor)
                    journal.write(safety=copy.journal())
                elif safety_backup:
                    journal.write(safety_backup=_take_safety_backup(run, actor, status, reporter))
                # Audit events are the one record that must outlive the restore: keep those the
                # backup predates. Nothing else writes now.
                events = [_event_record(e) for e in AuditEvent.objects.filter(timestamp__gt=plan.taken_at)]
                journal.write(state="prepared", events=events)
                _load(plan, run, journal, status, reporter, copy)
            except BaseException as exc:
                _roll_back(journal, status, exc)
                run.raise_if_interrupted()
                if isinstance(exc, database.TransactionEndedEarly):
                    if copy is not None and copy.dump:
                        # The workspace was not replaced: the safety backup is finished from it.
                        safety.finish(copy, journal.live, run=run, reporter=reporter)
                    undo = journal.data["safety_backup"] or "an earlier backup"
                    raise RestoreFailed(
                        f"{exc}. The portal stays in maintenance mode: restore {undo} to bring back a whole state"
                    ) from None
                if isinstance(exc, Interrupted | OperationFailed):
                    raise
                raise RestoreFailed(f"{reason(exc)}. The database and the workspace are unchanged.") from exc
        with shielded():
            kept = _roll_forward(journal, reporter)
        status.finish()
        safety_pending = False
        try:
            with interruptible(run):
                _finish(journal, run, reporter)
        except (Interrupted, Cancelled):
            # The restore is complete; only its safety backup waits, for the next start.
            safety_pending = True
            reporter.step(
                "safety backup interrupted: the next command, worker or web start finishes it "
                "(or manage.py restore --resume)",
                ok=False,
            )
        return RestoreOutcome(
            plan=plan,
            safety_backup=journal.data["safety_backup"],
            revision_after=manifest.live_revision(),
            audit_events_kept=kept,
            safety_pending=safety_pending,
        )
    finally:
        lock.release()


def _take_safety_backup(run: Run, actor: str, status: "_Status", reporter: Reporter) -> str:
    status.set("safety backup", 0)
    reporter.phase("safety backup")
    row = safety_backup(run=run, actor=actor, reporter=_StatusReporter(status, reporter))
    reporter.step(f"safety backup → {store.local().path(row.name)} (restore it to undo this restore)")
    return row.name


def _event_record(event: AuditEvent) -> dict:
    return {
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "detail": event.detail,
        "ip": event.ip,
        "timestamp": event.timestamp.isoformat(),
    }


def _load(
    plan: RestorePlan,
    run: Run,
    journal: Journal,
    status: "_Status",
    reporter: Reporter,
    copy: safety.SafetyCopy | None,
) -> None:
    """Stage the workspace while the safety copy dumps the live database and then while the
    database loads; the database commits only once the workspace is staged whole and every byte
    read matched the manifest."""
    src, document = plan.source, plan.manifest
    counter = Counter(sum(entry.size for entry in document.files.values()) + (database.size() if copy else 0))
    reporter.phase("restoring")

    def beat() -> None:
        run.heartbeat()
        maintenance.renew(f"Restoring the backup {src.label}")
        status.tick(counter.percent)
        reporter.progress(counter.done, counter.total)

    # A manifest older than the uncompressed sizes bounds nothing: the free space does.
    free = shutil.disk_usage(journal.live.parent).free

    def reader(member: str) -> MemberReader:
        entry = document.files[member]
        return src.reader(member, entry, keys=plan.keys, progress=counter.add, limit=free, checkpoint=run.checkpoint)

    def stage() -> None:
        with reader(document.workspace) as archive:
            workspace.extract(archive, journal.staging)
            archive.finish()

    staging = None
    with ticking(beat):
        if plan.has_workspace:
            shutil.rmtree(journal.staging, ignore_errors=True)  # left by an undone restore
            staging = Background(run, stage)
        if copy is not None:
            status.set("safety backup of the database", counter.percent)
            try:
                safety.dump_database(copy, run=run, progress=counter.add)
            except BaseException as exc:
                _stop(run, staging, exc, "the safety backup of the database")
            journal.write(safety=copy.journal(), safety_backup=copy.name)
            reporter.step(f"safety backup of the database → {copy.name} (its workspace follows once online)")
        status.set("restoring the database", counter.percent)

        def before_commit() -> None:
            dump.finish()
            if staging is not None:
                staging.join()
                reporter.step("workspace extracted into staging")
            fault_point("after-staging")
            journal.write(state="committing")

        try:
            with reader(document.dump) as dump:
                database.restore(dump, marker=journal.id, before_commit=before_commit)
        except BaseException as exc:
            _stop(run, staging, exc, "restoring the database")
    journal.write(state="committed")
    fault_point("after-commit")
    reporter.step("database restored")


def _stop(run: Run, staging: Background | None, exc: BaseException, doing: str) -> NoReturn:
    """A failure before the commit: stop the staging too, and say which part failed and that
    nothing changed (the database is rolled back or was never touched)."""
    if staging is not None:
        run.cancel(f"{doing} stopped", cause=exc)
        staging.join(reraise=False)
    recoverable = Cancelled | IntegrityError | workspace.WorkspaceError | OSError | crypto.EncryptionError
    if not isinstance(exc, recoverable) and not (
        isinstance(exc, database.DatabaseError) and not isinstance(exc, database.TransactionEndedEarly)
    ):
        raise exc
    if isinstance(exc, Cancelled) and run.cause is not None:
        exc = run.cause
    if (staging is not None and exc is staging.error) or isinstance(exc, workspace.WorkspaceError):
        doing = "staging the workspace"
    raise RestoreFailed(
        f"{doing} failed: {reason(exc)}. The database was rolled back: the database and the workspace are unchanged"
    ) from None


def _roll_back(journal: Journal, status: "_Status", exc: BaseException) -> None:
    """Before the commit: the live database and workspace were never touched."""
    if isinstance(exc, database.TransactionEndedEarly):
        # Part of the dump was committed by the dump itself: the database is not as it was.
        # Maintenance stays on (the journal holds it) until a restore brings back a whole state.
        shutil.rmtree(journal.staging, ignore_errors=True)
        journal.write(state="damaged", error=str(exc))
        status.fail(str(exc))
        outcomes.error("backup.restore_failed %s: %s", journal.data["source"], exc)
        return
    shutil.rmtree(journal.staging, ignore_errors=True)
    if journal.data.get("safety"):
        safety.drop(safety.SafetyCopy(**journal.data["safety"]))
    maintenance.leave()
    journal.remove()
    message = reason(exc)
    status.fail(message)
    outcomes.error("backup.restore_failed %s: %s (nothing was changed)", journal.data["source"], message)
    with contextlib.suppress(Exception):
        audit.record(
            actor=journal.data["actor"],
            action="backup.restore_failed",
            target=journal.data["source"],
            detail={"reason": message},
        )


def _roll_forward(journal: Journal, reporter: Reporter | None = None) -> int:
    """After the commit: finish whatever was not done yet, up to the portal back online. Every
    step is idempotent, so a restore killed in the middle of this is finished by running it again."""
    reporter = reporter or Reporter()
    if journal.state == "online":
        return len(journal.data["events"])
    if journal.data["has_workspace"]:
        _swap_in(journal)
        reporter.step("workspace restored")
    else:
        reporter.step(f"workspace left as it is: the backup holds no {manifest.WORKSPACE_ARCHIVE}", ok=False)
    fault_point("after-swap")
    kept = _after_restore(journal)
    reporter.step(f"sessions flushed, backup catalog rebuilt, {kept} later audit events kept")
    journal.write(state="online", holds_maintenance=False)
    maintenance.leave()
    reporter.step("portal back online")
    outcomes.info("backup.restored %s (taken %s)", journal.data["source"], journal.data["taken_at"])
    return kept


def _finish(journal: Journal, run: Run, reporter: Reporter | None = None) -> None:
    """With the portal online: the replaced workspace goes into the safety backup (or away)."""
    reporter = reporter or Reporter()
    if journal.data.get("safety") and journal.data["has_workspace"]:
        copy = safety.SafetyCopy(**journal.data["safety"])
        if journal.old.exists() or store.local().path(copy.name).exists():
            safety.finish(copy, journal.old, run=run, reporter=reporter)
            reporter.step(f"safety backup → {store.local().path(copy.name)} (restore it to undo this restore)")
    fault_point("before-cleanup")
    shutil.rmtree(journal.old, ignore_errors=True)
    journal.remove()


def _swap_in(journal: Journal) -> None:
    staging, live, old = journal.staging, journal.live, journal.old
    if not staging.exists():
        return  # swapped already
    if live.exists():
        shutil.rmtree(old, ignore_errors=True)  # an earlier restore's, finished long ago
        os.rename(live, old)
        fault_point("mid-swap")
    os.rename(staging, live)
    _fsync_dir(live.parent)


def _after_restore(journal: Journal) -> int:
    connection.close()
    database.forget_markers()
    tables = set(connection.introspection.table_names())
    if Session._meta.db_table in tables:
        # Sessions in the restored table belong to the backup's era: everyone signs in again.
        Session.objects.all().delete()
    if Backup._meta.db_table in tables:
        # Runs in progress when the backup was taken (its own row among them) are ghosts now.
        Backup.objects.filter(status__in=[Backup.Status.QUEUED, Backup.Status.RUNNING]).delete()
        catalog_sync()
    schedule.after_restore()
    fault_point("before-audit")
    if AuditEvent._meta.db_table not in tables:
        return 0
    events = journal.data["events"]
    with transaction.atomic():
        # Once, even when a killed restore is finished a second time.
        if AuditEvent.objects.filter(action="backup.restored", detail__restore_id=journal.id).exists():
            return len(events)
        AuditEvent.objects.bulk_create(
            AuditEvent(**{**event, "timestamp": datetime.fromisoformat(event["timestamp"])}) for event in events
        )
        audit.record(
            actor=journal.data["actor"],
            action="backup.restored",
            target=journal.data["source"],
            detail={
                "restore_id": journal.id,
                "taken_at": journal.data["taken_at"],
                "db_revision": journal.data["db_revision"],
                "safety_backup": journal.data["safety_backup"],
            },
        )
    return len(events)


# After a crash ---------------------------------------------------------------------------------


def restore_recover(*, reporter: Reporter | None = None) -> str | None:
    """Finish or undo a restore whose process died. Returns what was done, or None when there
    was nothing to do (no journal, or its restore is still running)."""
    journal = Journal.load()
    if journal is None:
        return None
    try:
        lock = locks.OperationLock("finishing an interrupted restore").acquire()
    except locks.Busy:
        return None  # the restore (or another recovery) is alive
    try:
        if journal.state == "damaged":
            return f"the restore from {journal.data['source']} left the database damaged: {journal.data.get('error')}"
        committed = journal.state in ("committed", "online") or (
            journal.state == "committing" and database.committed(journal.id)
        )
        if committed:
            _roll_forward(journal, reporter)
            _finish(journal, Run(lock), reporter)
            return f"finished the interrupted restore from {journal.data['source']}"
        _roll_back(journal, _Status(journal.data["source"]), RestoreFailed("the restore's process died"))
        return f"undid the interrupted restore from {journal.data['source']}: nothing was changed"
    finally:
        lock.release()


# Progress ---------------------------------------------------------------------------------------


class _Status:
    def __init__(self, source: str):
        self.state = {"source": source, "step": "starting", "percent": 0, "state": "running", "error": ""}

    def _save(self) -> None:
        cache.set(RESTORE_STATUS_KEY, self.state, timeout=24 * 3600)

    def set(self, step: str, percent: int) -> None:
        self.state.update(step=step, percent=percent)
        self._save()

    def tick(self, percent: int) -> None:
        self.set(self.state["step"], percent)

    def finish(self) -> None:
        self.state.update(step="done", percent=100, state="succeeded")
        self._save()

    def fail(self, error: str) -> None:
        self.state.update(state="failed", error=error)
        self._save()


class _StatusReporter(Reporter):
    """The safety backup's progress, into the restore's status as well as the operator's line."""

    def __init__(self, status: _Status, inner: Reporter):
        self.status, self.inner = status, inner

    def progress(self, done: int, total: int) -> None:
        self.status.tick(min(99, done * 100 // max(total, 1)))
        self.inner.progress(done, total)
