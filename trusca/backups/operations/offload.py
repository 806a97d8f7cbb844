"""Off-host copies: a published backup on this host's disk copied into the bucket
(BACKUP_S3_BUCKET) as ``<prefix><name>/<file>``, each file streamed with the sha256 its manifest
records (the store refuses to complete an upload whose bytes hash otherwise, so a file damaged on
this disk is never copied), the manifest last: a backup listed in the bucket is whole. It runs
after every backup that succeeds (in the CLI's process, or as a task on the ``backups`` queue),
then retries what else is missing and applies the bucket's retention. A failed copy never fails
the backup: its row says why, and it is retried from the list, by ``manage.py offload`` or by
the next backup.

No one-operation lock: a copy reads a published backup, which never changes, and writes only to
the bucket; holding the lock for an upload (minutes, or hours on a slow uplink) would keep every
backup and restore waiting, the 3 a.m. restore included. The copy claims its row instead: one
conditional UPDATE turns anything but a live ``copying`` into ``copying``, so one copier works
per backup, and its heartbeat on the row lets the sweep mark a dead copier's copy failed.
Retention and delete take a backup off this disk through the same row (``catalog.release_local``
skips a row being copied, and a copy claims only a row still marked local), and the copy opens
every file before it sends a byte: even a backup removed by hand mid-copy is copied whole from
the open files, or not at all.

Rows are found by name, never by id: a restore during a copy replaces the table and its ids.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from trusca.backups import gz, manifest, store
from trusca.backups.errors import Interrupted, NotFound, OperationFailed
from trusca.backups.models import Backup
from trusca.backups.operations.catalog import catalog_sync, offsite_expired, offsite_prune
from trusca.backups.operations.lifecycle import fault_point, outcomes, reason, ticking
from trusca.backups.progress import Counter, Reporter
from trusca.portal import audit

log = logging.getLogger("trusca.backups")


class OffloadFailed(OperationFailed):
    pass


class CopyInProgress(OffloadFailed):
    pass  # another process is copying this backup


class CopyNotQueued(OffloadFailed):
    pass  # the task queue refused the copy's job


@dataclass
class OffloadOutcome:
    name: str
    url: str  # where it is in the bucket
    size: int
    seconds: float
    already: bool = False  # the bucket held this very backup already


@dataclass
class OffloadReport:
    copied: list[OffloadOutcome] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why ("" when the bucket could not be listed)
    pruned: list[str] = field(default_factory=list)
    prune_error: str = ""


def bucket():
    remote = store.remote()
    if remote is None:
        raise OffloadFailed("no bucket is configured: set BACKUP_S3_BUCKET (README, Off-host copies)")
    return remote


def offload_run(
    *, name: str | None, actor: str = "system", reporter: Reporter | None = None, prune: bool = True
) -> OffloadReport:
    """Copy ``name``, then every other backup missing from the bucket, then apply the bucket's
    retention: what follows a backup (CLI and worker alike) and a retry from the list. Failures
    are collected, never raised: the copy of one backup does not stop another's."""
    remote = bucket()
    report = OffloadReport()
    if name is not None:
        try:
            report.copied.append(offload_backup(name=name, actor=actor, reporter=reporter, remote=remote))
        except CopyInProgress:
            pass
        except OperationFailed as exc:
            report.failed[name] = str(exc)
            if _unavailable(exc):
                return report  # the others would fail the same way, each after its timeouts
    try:
        offload_missing(actor=actor, reporter=reporter, report=report, remote=remote)
    except OperationFailed as exc:
        report.failed[""] = str(exc)
        return report
    if prune:
        try:
            report.pruned = offsite_prune()
        except OperationFailed as exc:
            report.prune_error = str(exc)
    return report


def offload_missing(
    *, actor: str = "system", reporter: Reporter | None = None, report: OffloadReport | None = None, remote=None
) -> OffloadReport:
    """Copy every complete backup on this host's disk that the bucket lacks, newest first,
    except those the bucket's retention would remove at once."""
    remote = remote or bucket()
    report = report if report is not None else OffloadReport()
    there = remote.names()
    now = timezone.now()
    on_disk = [b for b in store.local().list() if b.manifest is not None]
    newest = on_disk[-1].name if on_disk else None
    for item in reversed(on_disk):
        if item.name in there or item.name in report.failed or any(c.name == item.name for c in report.copied):
            continue
        if offsite_expired(item.kind, item.timestamp, now) and item.name != newest:
            continue
        try:
            report.copied.append(offload_backup(name=item.name, actor=actor, reporter=reporter, remote=remote))
        except CopyInProgress:
            continue
        except OperationFailed as exc:
            report.failed[item.name] = str(exc)
            if _unavailable(exc):
                break
    return report


def offload_backup(
    *, name: str, actor: str = "system", reporter: Reporter | None = None, remote=None
) -> OffloadOutcome:
    """Copy the backup ``name`` from this host's disk into the bucket. Raises ``OffloadFailed``
    (``CopyInProgress`` when another process is copying it), and the row says why."""
    remote = remote or bucket()
    reporter = reporter or Reporter()
    store.check_name(name)
    _refuse_expired(name)
    _claim(name)
    started = time.monotonic()
    try:
        outcome = _copy(remote, name, reporter)
    except BaseException as exc:
        interrupted = isinstance(exc, Interrupted)
        message = "interrupted" if interrupted else reason(exc)
        Backup.objects.filter(name=name, offsite=Backup.Offsite.COPYING).update(
            offsite=Backup.Offsite.FAILED, offsite_message=message, offsite_progress=0
        )
        outcomes.error("backup.offload_failed %s: %s", name, message)
        with contextlib.suppress(Exception):
            audit.record(actor=actor, action="backup.offload_failed", target=name, detail={"reason": message})
        if interrupted or not isinstance(exc, Exception):
            raise
        raise OffloadFailed(message) from exc
    outcome.seconds = time.monotonic() - started
    now = timezone.now()
    Backup.objects.filter(name=name).update(
        offsite=Backup.Offsite.COPIED,
        offsite_progress=100,
        offsite_message="",
        offsite_at=now,
        offsite_heartbeat_at=now,
    )
    if not outcome.already:
        audit.record(actor=actor, action="backup.offloaded", target=name, detail={"url": outcome.url})
    outcomes.info("backup.offloaded %s (%d bytes to %s)", name, outcome.size, outcome.url)
    return outcome


def offload_request(*, backup: Backup, actor, send: Callable[[str], None], request=None) -> Backup:
    """Queue a copy of ``backup`` (the list's Retry): the row shows it pending, ``send`` hands the
    name to the task queue. ``OffloadFailed`` when it cannot be copied or the queue refuses it."""
    bucket()
    name = store.check_name(backup.name)
    queued = (
        Backup.objects.filter(pk=backup.pk, status=Backup.Status.SUCCEEDED, local=True)
        .exclude(offsite=Backup.Offsite.COPYING)
        .update(offsite=Backup.Offsite.PENDING, offsite_progress=0, offsite_message="")
    )
    if not queued:
        _why_not_claimed(name)
    audit.record(actor=actor, action="backup.offload_requested", target=name, request=request)
    try:
        send(name)
    except Exception as exc:
        message = f"not queued: the task queue (CELERY_BROKER_URL) refused the job ({reason(exc)})"
        Backup.objects.filter(pk=backup.pk, offsite=Backup.Offsite.PENDING).update(
            offsite=Backup.Offsite.FAILED, offsite_message=message
        )
        raise CopyNotQueued(f"{message}. Check that the broker is running, then try again.") from None
    backup.refresh_from_db()
    return backup


def offload_sweep() -> list[str]:
    """Copies whose process died (no heartbeat for BACKUP_STALE_SECONDS) are marked failed; what
    they left in the bucket is removed by the next copy of the same backup, which starts with it."""
    cutoff = timezone.now() - timedelta(seconds=settings.BACKUP_STALE_SECONDS)
    stale = Backup.objects.filter(offsite=Backup.Offsite.COPYING).filter(
        Q(offsite_heartbeat_at__lt=cutoff) | Q(offsite_heartbeat_at__isnull=True)
    )
    names = list(stale.values_list("name", flat=True))
    message = f"the copy stopped: no heartbeat for {settings.BACKUP_STALE_SECONDS} s (its process died); retry it"
    swept = []
    for name in names:
        if (
            stale.filter(name=name).update(offsite=Backup.Offsite.FAILED, offsite_message=message, offsite_progress=0)
            == 1
        ):
            outcomes.error("backup.offload_failed %s: %s", name, message)
            swept.append(f"marked failed: the off-host copy of {name} (its process died)")
    return swept


# The copy --------------------------------------------------------------------------------------


def _refuse_expired(name: str) -> None:
    row = Backup.objects.filter(name=name).first()
    if row is None or not offsite_expired(row.kind, row.created_at, timezone.now()):
        return
    if Backup.objects.filter(status=Backup.Status.SUCCEEDED, created_at__gt=row.created_at).exists():
        raise OffloadFailed(
            f"{name} is older than BACKUP_S3_RETENTION_DAYS ({settings.BACKUP_S3_RETENTION_DAYS} days): the bucket's "
            "retention would remove it again at once, so it was not copied. Raise BACKUP_S3_RETENTION_DAYS to keep "
            "it there"
        )


def _claim(name: str) -> None:
    now = timezone.now()
    stale = now - timedelta(seconds=settings.BACKUP_STALE_SECONDS)
    claimable = Backup.objects.filter(name=name, status=Backup.Status.SUCCEEDED, local=True).filter(
        ~Q(offsite=Backup.Offsite.COPYING) | Q(offsite_heartbeat_at__lt=stale) | Q(offsite_heartbeat_at__isnull=True)
    )
    values = {"offsite": Backup.Offsite.COPYING, "offsite_progress": 0, "offsite_message": ""}
    if claimable.update(**values, offsite_heartbeat_at=now):
        return
    if not Backup.objects.filter(name=name).exists() and store.local().path(name).is_dir():
        catalog_sync()  # on the disk but not catalogued yet (copied in by hand, or a new catalog)
        if claimable.update(**values, offsite_heartbeat_at=now):
            return
    _why_not_claimed(name)


def _why_not_claimed(name: str) -> None:
    row = Backup.objects.filter(name=name).first()
    if row is None:
        raise NotFound(f"there is no backup named {name} on this host")
    if row.status != Backup.Status.SUCCEEDED:
        raise OffloadFailed(f"{name} is {row.status}: only a backup that succeeded can be copied")
    if not row.local:
        raise OffloadFailed(f"{name} is not on this host's disk (it is only in the bucket): there is nothing to copy")
    raise CopyInProgress(f"{name} is already being copied ({row.offsite_progress}%); wait for that copy to end")


def _copy(remote, name: str, reporter: Reporter) -> OffloadOutcome:
    local = store.local()
    try:
        data = local.read_manifest(name)
        document = manifest.parse(data)
    except NotFound:
        raise OffloadFailed(f"{name} is not on this host's disk any more") from None
    except manifest.ManifestError as exc:
        raise OffloadFailed(f"{name} cannot be copied: {exc}") from None
    size = sum(entry.size for entry in document.files.values()) + len(data)
    outcome = OffloadOutcome(name=name, url=remote.url(name), size=size, seconds=0.0)
    with contextlib.ExitStack() as files:
        opened = {member: files.enter_context(_open(local, name, member)) for member in document.files}
        if _already_there(remote, name, data):
            outcome.already = True
            return outcome
        remote.discard(name)  # what an earlier copy that was cut short left
        counter = Counter(size)
        lost = threading.Event()
        reporter.phase(f"copying {name} to S3")

        def beat() -> None:
            alive = Backup.objects.filter(name=name, offsite=Backup.Offsite.COPYING).update(
                offsite_progress=counter.percent, offsite_heartbeat_at=timezone.now()
            )
            if not alive:
                lost.set()
            reporter.progress(counter.done, counter.total)

        try:
            with ticking(beat):
                _send_all(remote, name, document.files, opened, counter, lost)
                remote.publish(name, data)
                counter.add(len(data))
        except Exception as exc:
            # Files sent before the failure, unpublished; an endpoint that is down keeps them until
            # the next copy, which starts by removing them. An interruption leaves them to it too.
            if not _unavailable(exc):
                _discard(remote, name)
            raise
    return outcome


def _open(local, name: str, member: str):
    try:
        return local.open_read(name, member)
    except NotFound:
        pass
    try:
        local.open_read(name, member + manifest.ENCRYPTED_SUFFIX).close()
    except NotFound:
        raise OffloadFailed(
            f"{name} has no {member} on this host's disk: it is incomplete and was not copied"
        ) from None
    raise OffloadFailed(
        f"{name}'s {member} was encrypted by hand ({member}{manifest.ENCRYPTED_SUFFIX}), which its manifest does "
        "not describe: it cannot be copied as it is; copy it by hand, or take a new backup with "
        "BACKUP_ENCRYPTION_PASSPHRASE or BACKUP_ENCRYPTION_RECIPIENTS set"
    )


class _Stopped(Exception):
    """Another file of the copy failed (or the copy was interrupted): this one stops too."""


def _send_all(remote, name: str, files: dict, opened: dict, counter: Counter, lost: threading.Event) -> None:
    """Every file at once, as ``aws s3 cp --recursive`` does: the last parts of one, and the bucket
    assembling it, overlap the other's parts instead of leaving the link idle between files
    (measured: benchmarks/offload_bench.py). Their uploads share the store's part buffers, so
    the memory is one upload's. The first failure stops the other files and is the one raised;
    an interruption (Ctrl-C, SIGTERM) stops them all within a chunk, each upload aborted."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def send(member: str, entry) -> None:
        try:
            _send(remote, name, member, entry, opened[member], counter, lost, stop)
        except BaseException as exc:
            if not isinstance(exc, _Stopped):
                failures.append(exc)
            stop.set()
            return
        fault_point("offload-after-a-file")

    pool = ThreadPoolExecutor(max_workers=len(files), thread_name_prefix="trusca-offload")
    try:
        for sending in [pool.submit(send, member, entry) for member, entry in files.items()]:
            sending.result()
    finally:
        stop.set()  # interrupted while waiting: the files stop at their next chunk
        pool.shutdown(wait=True)
    if failures:
        raise failures[0]


def _send(
    remote, name: str, member: str, entry, source, counter: Counter, lost: threading.Event, stop: threading.Event
) -> None:
    sent = 0
    # One buffer read into again and again: a fresh 1 MiB per read, in each file's thread, left
    # glibc's per-thread arenas holding ~5 MB more at the copy's peak.
    chunk = memoryview(bytearray(gz.CHUNK))
    try:
        with remote.open_write(name, member, sha256=entry.sha256) as upload:
            while count := source.readinto(chunk):
                if lost.is_set():
                    raise OffloadFailed("the copy lost its claim on the backup's row (deleted, or taken for dead)")
                if stop.is_set():
                    raise _Stopped
                sent += count
                if sent > entry.size:
                    break
                upload.write(chunk[:count])
                counter.add(count)
            if sent != entry.size:
                raise OffloadFailed(
                    f"{name}/{member} on this host's disk is {'larger' if sent > entry.size else 'smaller'} than "
                    f"the {entry.size} bytes its manifest records: it is damaged and was not copied "
                    f"(manage.py verify_backup {name} says more)"
                )
    except OperationFailed as exc:
        if _offsite(exc) or isinstance(exc, OffloadFailed):
            raise
        # The store refused bytes that do not hash to the manifest's sha256.
        raise OffloadFailed(
            f"{name}/{member} on this host's disk does not match its manifest's sha256: it is damaged and was not "
            f"copied (manage.py verify_backup {name} says more)"
        ) from exc


def _already_there(remote, name: str, data: bytes) -> bool:
    try:
        there = remote.read_manifest(name)
    except NotFound:
        return False
    if there == data:
        return True
    raise OffloadFailed(
        f"{remote.url(name)} holds another backup of the same name (its manifest differs from this host's); nothing "
        "was copied. Does another installation use the same bucket and BACKUP_S3_PREFIX?"
    )


def _discard(remote, name: str) -> None:
    try:
        remote.discard(name)
    except OperationFailed as exc:
        log.warning("could not remove what the failed copy of %s left in the bucket: %s", name, exc)


def _offsite(exc: BaseException) -> bool:
    from trusca.backups.store.s3 import OffsiteError

    return isinstance(exc, OffsiteError)


def _unavailable(exc: BaseException) -> bool:
    from trusca.backups.store.s3 import OffsiteUnavailable

    while exc is not None:
        if isinstance(exc, OffsiteUnavailable):
            return True
        exc = exc.__cause__
    return False
