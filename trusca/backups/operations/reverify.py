"""The weekly re-read of every stored backup: a disk that rots a file, or a hand that edits one,
is found before the day the backup is needed."""

from dataclasses import dataclass, field
from datetime import datetime

from django.core.cache import cache
from django.utils import timezone

from trusca.backups import store
from trusca.backups.errors import OperationFailed
from trusca.backups.models import Backup
from trusca.backups.operations.lifecycle import outcomes, reason
from trusca.backups.operations.sources import Source
from trusca.backups.operations.verify import VerifyFailed, backup_verify

REPORT_KEY = "trusca:backups:reverified"
DAMAGED_PREFIX = "damaged"


@dataclass
class ReverifyReport:
    checked_at: datetime
    intact: list[str] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # name, reason


def reverify_stored() -> ReverifyReport:
    """Verify every stored backup in full (manifest, sizes, checksums, archives). A damaged one
    is marked failed in the catalog with the reason, so it is neither offered nor counted as a
    good backup. Whether a manifest is signed by this installation is not the question here."""
    local = store.local()
    report = ReverifyReport(checked_at=timezone.now())
    for item in local.list():
        why = f"unreadable: {item.error}" if item.manifest is None else _verify(Source(local, item.name, item.name))
        if why is None:
            report.intact.append(item.name)
            continue
        if not local.path(item.name).exists():
            continue  # pruned or deleted while it was being read
        report.damaged.append((item.name, why))
        Backup.objects.filter(name=item.name).exclude(status__in=[Backup.Status.QUEUED, Backup.Status.RUNNING]).update(
            status=Backup.Status.FAILED,
            message=f"{DAMAGED_PREFIX} (found by the weekly check on {report.checked_at:%Y-%m-%d}): {why}",
        )
        outcomes.error("backup.damaged %s: %s", item.name, why)
    _reverify_bucket(report)
    cache.set(
        REPORT_KEY,
        {"checked_at": report.checked_at.isoformat(), "intact": len(report.intact), "damaged": report.damaged},
        timeout=None,
    )
    return report


def _reverify_bucket(report: ReverifyReport) -> None:
    """The off-host copies too: each read back whole from the bucket and checked against its
    manifest. A damaged copy is shown on its row (its copy failed), which the next copy run
    replaces from this host's disk when the backup is still here."""
    remote = store.remote()
    if remote is None:
        return
    try:
        stored = remote.list()
    except OperationFailed as exc:
        report.damaged.append(("the bucket", str(exc)))
        outcomes.error("backup.damaged the bucket: %s", exc)
        return
    for item in stored:
        name = f"{item.name} (S3)"
        why = f"unreadable: {item.error}" if item.manifest is None else _verify(Source(remote, item.name, name))
        if why is None:
            report.intact.append(name)
            continue
        report.damaged.append((name, why))
        found = f"found by the weekly check on {report.checked_at:%Y-%m-%d}"
        if store.local().path(item.name).is_dir():
            # The copy on this disk is the good one: the damaged copy goes, the next copy run
            # (after a backup, or offload --missing) puts it back.
            remote.delete(item.name)
            found += "; removed from the bucket, the next copy run replaces it from this host's disk"
        Backup.objects.filter(name=item.name).update(
            offsite=Backup.Offsite.FAILED, offsite_message=f"{DAMAGED_PREFIX} in the bucket ({found}): {why}"
        )
        outcomes.error("backup.damaged %s: %s", name, why)


def _verify(source: Source) -> str | None:
    try:
        backup_verify(source, trust_unsigned=True)
    except (VerifyFailed, OperationFailed) as exc:  # a copy that fails to read back from the bucket too
        return str(exc)
    except OSError as exc:  # the disk under it failing to read
        return reason(exc)
    return None


def last_report() -> dict | None:
    return cache.get(REPORT_KEY)
