"""The restore's safety backup, taken so that it costs the portal almost no downtime.

Its database half must be dumped in maintenance mode before the load replaces the database, and
it is, while the new workspace is being staged. Its workspace half needs no copy before the
restore: the live workspace is renamed aside when the new one is swapped in (an instant undo
point), and archived into the safety backup after the portal is back online. The restore's
journal carries what is needed to finish it (or to drop it, if the restore is undone), so a
crash in between loses nothing.
"""

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from django.utils import timezone

from trusca.backups import crypto, database, manifest, store, workspace
from trusca.backups.models import Backup
from trusca.backups.operations.backup import describe, safety_row, write_member
from trusca.backups.operations.lifecycle import Run, fault_point, outcomes
from trusca.backups.progress import Counter, Reporter
from trusca.portal import audit


@dataclass
class SafetyCopy:
    name: str
    created_at: str  # ISO 8601, for the journal
    actor: str
    applied: list = field(default_factory=list)
    db_size: int = 0
    dump: dict | None = None  # the FileEntry of the dump once written

    @property
    def suffix(self) -> str:
        return manifest.ENCRYPTED_SUFFIX if crypto.EncryptionKeys.from_settings() else ""

    def journal(self) -> dict:
        return asdict(self)


def begin(*, actor: str) -> SafetyCopy:
    row = safety_row(actor=actor)
    return SafetyCopy(name=row.name, created_at=row.created_at.isoformat(), actor=actor)


def dump_database(copy: SafetyCopy, *, run: Run, progress) -> None:
    """The live database into the safety backup: in maintenance mode, before the load."""
    copy.applied = [list(pair) for pair in manifest.applied_migrations()]
    copy.db_size = database.size()
    member = manifest.DUMP_FILES[database.engine()] + copy.suffix
    keys = crypto.EncryptionKeys.from_settings()
    entry = write_member(copy.name, member, database.dump, keys=keys, run=run, progress=progress)
    copy.dump = {"member": member, **entry.as_dict()}


def finish(copy: SafetyCopy, old_workspace: Path, *, run: Run, reporter: Reporter) -> None:
    """Archive the workspace the restore replaced and publish the safety backup. Again from the
    start if a crash interrupted it; nothing to do if it is published already."""
    local = store.local()
    if local.path(copy.name).exists():
        return
    member = manifest.WORKSPACE_ARCHIVE + copy.suffix
    (local.staging_path(copy.name) / member).unlink(missing_ok=True)  # what a crash left half written
    keys = crypto.EncryptionKeys.from_settings()
    counter = Counter(workspace.measure(old_workspace))
    reporter.phase("archiving the safety backup")

    def progress(count: int) -> None:
        counter.add(count)
        reporter.progress(counter.done, counter.total)

    archived = write_member(
        copy.name,
        member,
        lambda out, progress: workspace.archive(old_workspace, out, progress=progress),
        keys=keys,
        run=run,
        progress=progress,
    )
    dump = manifest.FileEntry(**{k: v for k, v in copy.dump.items() if k != "member"})
    document = describe(
        kind=Backup.Kind.PRE_RESTORE,
        created_at=datetime.fromisoformat(copy.created_at),
        applied=[tuple(pair) for pair in copy.applied],
        db_size=copy.db_size,
        files={copy.dump["member"]: dump, member: archived},
        keys=keys,
    )
    data = document.to_json()
    fault_point("safety-archived")
    local.publish(copy.name, data)
    size = sum(entry.size for entry in document.files.values()) + len(data)
    Backup.objects.update_or_create(
        name=copy.name,
        defaults={
            "kind": Backup.Kind.PRE_RESTORE,
            "status": Backup.Status.SUCCEEDED,
            "created_at": document.timestamp,
            "finished_at": timezone.now(),
            "size_bytes": size,
            "db_revision": document.db_revision,
            "manifest": document.unsigned_document(),
            "progress": 100,
            "actor": copy.actor,
            "message": "",
        },
    )
    audit.record(actor=copy.actor, action="backup.created", target=copy.name, detail={"kind": "pre_restore"})
    outcomes.info("backup.completed %s (pre_restore, %d bytes)", copy.name, size)


def drop(copy: SafetyCopy) -> None:
    """The restore was undone before it changed anything: its safety copy is not needed."""
    store.local().discard(copy.name)
    Backup.objects.filter(name=copy.name, status__in=[Backup.Status.QUEUED, Backup.Status.RUNNING]).update(
        status=Backup.Status.FAILED,
        finished_at=timezone.now(),
        message="not needed: the restore it was taken for was undone before it changed anything",
    )
