"""The weekly re-read of every stored backup: a disk that rots a file, or a hand that edits one,
is found before the day the backup is needed."""

from dataclasses import dataclass, field
from datetime import datetime

from django.core.cache import cache
from django.utils import timezone

from trusca.backups import store
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
    cache.set(
        REPORT_KEY,
        {"checked_at": report.checked_at.isoformat(), "intact": len(report.intact), "damaged": report.damaged},
        timeout=None,
    )
    return report


def _verify(source: Source) -> str | None:
    try:
        backup_verify(source, trust_unsigned=True)
    except VerifyFailed as exc:
        return str(exc)
    except OSError as exc:  # the disk under it failing to read
        return reason(exc)
    return None


def last_report() -> dict | None:
    return cache.get(REPORT_KEY)
