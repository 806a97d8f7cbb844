"""A restore asked for from the admin: of a listed backup, or of a bundle uploaded in the same
request. Queued for a worker on the ``backups`` queue with a backup's lifecycle: the operation
lock is reserved before anything is read and handed to the worker that claims the job
(``locks.adopt``: only one wins), the job beats while it runs, and a job silent for
BACKUP_STALE_SECONDS whose lock is gone is taken for lost.

Unlike a backup's row, the job's record lives in the cache, beside the restore's own progress
(``restore_status()``): the database being replaced is dropped and locked by the load, and
anything written into it would be rolled back or overwritten. The outcome reaches the database
afterwards, as the restore's audit events.

Both doors run ``manage.py restore``'s preflight before anything is queued, and the worker runs
it again on what it actually restores.
"""

import contextlib
import errno
import io
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import BinaryIO

from django.conf import settings
from django.core.cache import cache
from django.template.defaultfilters import filesizeformat as _size
from django.utils import timezone

from trusca.backups import locks, maintenance, manifest, store
from trusca.backups.errors import Interrupted, NotFound, OperationFailed
from trusca.backups.operations.backup import _free_name
from trusca.backups.operations.catalog import catalog_sync
from trusca.backups.operations.lifecycle import PROGRESS_INTERVAL, Run, outcomes, reason, ticking
from trusca.backups.operations.restore import (
    RESTORE_STATUS_KEY,
    RestoreOutcome,
    RestorePlan,
    RestoreRefused,
    restore_prepare,
    restore_run,
    restore_status,
)
from trusca.backups.operations.sources import SourceError, unpacking
from trusca.backups.operations.sweep import sweep
from trusca.backups.progress import Reporter
from trusca.portal import audit
from trusca.portal.models import AuditEvent

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# Long enough for the operator to come back to the outcome after a night's restore.
JOB_TTL_SECONDS = 24 * 3600
CHECKING = "checking the backup"
RESTORING = "restoring"


class UploadTooLarge(OperationFailed):
    pass


class UploadIncomplete(OperationFailed):
    """The body ended, or the connection broke, before the length the client announced."""


class NotEnoughSpace(OperationFailed):
    pass


class RestoreUntrusted(RestoreRefused):
    """Whole and checked, but no key of this installation vouches for it, and the second
    confirmation (the CLI's ``--trust-unsigned``) was not given."""


class QueueUnavailable(OperationFailed):
    pass


# The job -----------------------------------------------------------------------------------------


@dataclass
class RestoreJob:
    id: str
    backup: str  # the name in the local store
    actor: str
    trust_unsigned: bool
    taken_at: str  # the backup's time (ISO 8601): what the restored state dates from
    queued_at: str
    keys_token: str = ""  # the decryption keys held for this restore (hold_keys), never the keys
    state: str = QUEUED
    step: str = "queued"
    steps: list[str] = field(default_factory=list)  # the CLI's ✓ lines
    error: str = ""
    safety_backup: str = ""
    notes: list[str] = field(default_factory=list)  # what to do afterwards (run migrate)
    finished_at: str = ""
    # Live, never saved: from restore_status() and the maintenance flag.
    percent: int | None = None
    maintenance: bool = False

    @property
    def owner(self) -> str:
        return f"restore:{self.id}"

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, RUNNING)

    @property
    def taken(self) -> datetime:
        return datetime.fromisoformat(self.taken_at)

    @classmethod
    def load(cls, job_id: str) -> "RestoreJob | None":
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            return None
        data = cache.get(_key("job", job_id))
        return cls(**data) if isinstance(data, dict) else None

    def save(self, **changes) -> None:
        for name, value in changes.items():
            setattr(self, name, value)
        data = asdict(self)
        del data["percent"], data["maintenance"]
        cache.set(_key("job", self.id), data, timeout=JOB_TTL_SECONDS)

    def beat(self) -> None:
        cache.set(_key("beat", self.id), time.time(), timeout=JOB_TTL_SECONDS)

    def silent_for(self) -> float:
        return time.time() - (cache.get(_key("beat", self.id)) or 0)

    def finish(self, state: str, **changes) -> None:
        self.save(state=state, finished_at=timezone.now().isoformat(), **changes)


def _key(kind: str, job_id: str) -> str:
    return f"trusca:restore:{kind}:{job_id}"


def restore_job(job_id: str) -> RestoreJob | None:
    """A job as the admin shows it: a lost one settled, a running one with the restore's step
    and percent. Touches the database only when no restore holds it (maintenance is off)."""
    job = RestoreJob.load(job_id)
    if job is None:
        return None
    job.maintenance = maintenance.active() is not None
    if job.active and _lost(job):
        _settle_lost(job)
    if job.state == RUNNING and job.step == RESTORING:
        status = restore_status() or {}
        if status.get("source") == job.backup and status.get("state") == RUNNING:
            job.step, job.percent = status["step"], status["percent"]
    return job


def _lost(job: RestoreJob) -> bool:
    holder = locks.current() or {}
    return holder.get("owner") != job.owner and job.silent_for() > settings.BACKUP_STALE_SECONDS


def _settle_lost(job: RestoreJob) -> None:
    if job.maintenance:
        # Its journal keeps the portal in maintenance mode until a start finishes or undoes it.
        job.step = (
            "its worker was lost; the next worker or manage.py command to start finishes the restore or undoes it"
        )
        return
    if job.state == QUEUED:
        _fail(
            job,
            f"not started: no worker took it within {settings.BACKUP_STALE_SECONDS} s (is a Celery worker consuming "
            "the backups queue?). Nothing was changed",
        )
    elif _recorded("backup.restored", job):
        job.finish(SUCCEEDED, step="done", notes=[*job.notes, "finished after its worker was lost"])
    else:
        _fail(job, "its worker was lost before the restore committed: the database and the workspace are unchanged")


def _recorded(action: str, job: RestoreJob) -> bool:
    since = datetime.fromisoformat(job.queued_at)
    return AuditEvent.objects.filter(action=action, target=job.backup, timestamp__gte=since).exists()


def _fail(job: RestoreJob, message: str) -> None:
    job.finish(FAILED, error=message)
    outcomes.error("backup.restore_failed %s: %s", job.backup, message)
    if maintenance.active() is not None:
        return  # the database may be the one a restore left damaged; the journal says so
    # Once per job (several status readers may settle it at once), and not when the restore
    # itself recorded it already.
    if cache.add(_key("audited", job.id), 1, timeout=JOB_TTL_SECONDS) and not _recorded("backup.restore_failed", job):
        with contextlib.suppress(Exception):
            audit.record(actor=job.actor, action="backup.restore_failed", target=job.backup, detail={"reason": message})


def signature_of(backup: str) -> str | None:
    """How far this installation vouches for a stored backup (a ``manifest.SignatureState``),
    from its manifest alone: whether the page asks for the second confirmation up front. None
    when the manifest cannot be read; the preflight then says why."""
    try:
        return manifest.parse(store.local().read_manifest(backup)).signature_state()
    except (NotFound, manifest.ManifestError):
        return None


# Queueing ----------------------------------------------------------------------------------------


@dataclass
class _Reservation:
    id: str
    lock: locks.OperationLock
    run: Run
    queued: bool = False


@contextlib.contextmanager
def _reserved(what: str) -> Iterator[_Reservation]:
    """The operation lock, taken before anything is read (``locks.Busy`` at once when a backup
    or restore is queued or running), on behalf of the worker that will run the job; released
    unless the block queued it."""
    sweep()
    job_id = secrets.token_hex(16)
    lock = locks.OperationLock(what, owner=f"restore:{job_id}", this_process=False).acquire()
    reservation = _Reservation(job_id, lock, Run(lock))
    try:
        yield reservation
    finally:
        if not reservation.queued:
            lock.release()


@contextlib.contextmanager
def prepared(
    source: str, *, trust_unsigned: bool, thorough: bool = False, keys_token: str = ""
) -> Iterator[RestorePlan]:
    """``manage.py restore``'s preflight (``RestoreRefused`` in its words), and the second
    confirmation for a backup no key of this installation vouches for."""
    keys = held_keys(keys_token) if keys_token else None
    with restore_prepare(source=source, keys=keys, trust_unsigned=True, thorough=thorough) as plan:
        if not manifest.trusted(plan.signature) and not trust_unsigned:
            raise RestoreUntrusted(
                f"its manifest is {plan.signature}: this installation's BACKUP_SIGNING_KEY does not vouch for it, and "
                "a backup's SQL runs with the portal's database rights. If you know where it comes from, confirm "
                "that separately (“Restore it anyway”, or trust_unsigned=yes) and restore again. Nothing was changed."
            )
        yield plan


def _enqueue(
    reservation: _Reservation,
    *,
    backup: str,
    taken_at: datetime,
    actor: str,
    trust_unsigned: bool,
    send: Callable[[str], None],
    keys_token: str = "",
    request=None,
) -> RestoreJob:
    job = RestoreJob(
        id=reservation.id,
        backup=backup,
        actor=actor,
        trust_unsigned=trust_unsigned,
        keys_token=keys_token,
        taken_at=taken_at.isoformat(),
        queued_at=timezone.now().isoformat(),
    )
    job.save()
    job.beat()
    reservation.run.heartbeat()
    reservation.run.checkpoint()  # the lock lapsed during a long upload or preflight: another run may be on
    audit.record(
        actor=actor,
        action="backup.restore_requested",
        target=backup,
        detail={"job": job.id, "trust_unsigned": trust_unsigned},
        request=request,
    )
    try:
        send(job.id)
    except Exception as exc:
        message = f"not started: the task queue (CELERY_BROKER_URL) refused the job ({reason(exc)})"
        _fail(job, message)
        raise QueueUnavailable(f"{message}. Nothing was changed; check that the broker is running, then try again.")
    reservation.queued = True
    return job


def restore_enqueue(
    *,
    backup: str,
    actor: str,
    trust_unsigned: bool,
    send: Callable[[str], None],
    keys_token: str = "",
    request=None,
) -> RestoreJob:
    """Queue the restore of a stored backup, after its preflight."""
    with _reserved(f"a restore of {backup}") as reservation:
        with (
            ticking(reservation.run.heartbeat),
            prepared(backup, trust_unsigned=trust_unsigned, keys_token=keys_token) as plan,
        ):
            taken_at = plan.taken_at
        return _enqueue(
            reservation,
            backup=backup,
            taken_at=taken_at,
            actor=actor,
            trust_unsigned=trust_unsigned,
            send=send,
            keys_token=keys_token,
            request=request,
        )


# Keys for one restore ---------------------------------------------------------------------------
#
# A backup encrypted to a public key opens only with the private key, which the portal does not
# keep: the operator gives it (and its passphrase, or the backup's passphrase) on the restore
# page, for that restore only. The restore runs on a worker, so the keys wait for it in the cache
# under a random token, for at most KEYS_TTL_SECONDS, and are removed as soon as the restore ends;
# they are never written to the database, a backup, a log or the job's record (which holds the
# token only).

KEYS_TTL_SECONDS = 15 * 60
KEYS_TOKEN = re.compile(r"^[0-9a-f]{32}$")
MAX_KEY_BYTES = 64 * 1024


class KeysExpired(OperationFailed):
    pass


def hold_keys(*, secret_key: str = "", key_passphrase: str = "", passphrase: str = "") -> str:
    if not (secret_key or passphrase):
        raise OperationFailed("give a private key or a passphrase. Nothing was changed.")
    if len(secret_key.encode()) > MAX_KEY_BYTES or len(key_passphrase) > 255 or len(passphrase) > 255:
        raise OperationFailed("the key or the passphrase is too long to be one. Nothing was changed.")
    token = secrets.token_hex(16)
    held = {
        "secret_key": secret_key or None,
        "key_passphrase": key_passphrase or None,
        "passphrase": passphrase or None,
    }
    cache.set(_key("keys", token), held, timeout=KEYS_TTL_SECONDS)
    return token


def held_keys(token: str):
    from trusca.backups.operations.sources import decryption_keys

    held = cache.get(_key("keys", token)) if KEYS_TOKEN.match(token or "") else None
    if held is None:
        raise KeysExpired(
            "the key or passphrase given for this restore is no longer held (they are kept for "
            f"{KEYS_TTL_SECONDS // 60} minutes, for one restore): give them again. Nothing was changed."
        )
    return decryption_keys(**held)


def forget_keys(token: str) -> None:
    if token and KEYS_TOKEN.match(token):
        cache.delete(_key("keys", token))


# Uploads -----------------------------------------------------------------------------------------


def upload_check(*, length: int | None) -> None:
    """What can be refused from the announced length alone, before a byte is read."""
    limit = settings.BACKUP_UPLOAD_MAX_BYTES
    if length is not None and length > limit:
        raise UploadTooLarge(
            f"the bundle is {_size(length)}, more than the {_size(limit)} the admin accepts "
            "(BACKUP_UPLOAD_MAX_BYTES); restore it with manage.py restore on the server. Nothing was changed."
        )
    if length is not None and length > (free := store.local().free_bytes()):
        raise NotEnoughSpace(
            f"the bundle is {_size(length)} and {settings.BACKUP_ROOT} has {_size(free)} free; free some space, "
            "then try again. Nothing was changed."
        )


def restore_upload(
    *,
    stream: BinaryIO,
    length: int | None,
    label: str,
    actor: str,
    trust_unsigned: bool,
    send: Callable[[str], None],
    keys_token: str = "",
    request=None,
) -> RestoreJob:
    """Receive a bundle from ``stream`` (``length`` bytes, or up to its end when None), check it
    as ``manage.py restore`` would, keep it as an ``uploaded`` backup and queue its restore. A
    refused or broken upload leaves nothing behind."""
    upload_check(length=length)
    keys = held_keys(keys_token) if keys_token else None
    with _reserved(f"an upload and restore of {label}") as reservation:
        body = _Body(stream, length=length, run=reservation.run)
        try:
            with unpacking(body, label=label, keys=keys) as src:
                with (
                    ticking(reservation.run.heartbeat),
                    prepared(
                        str(src.store.path(src.name)),
                        trust_unsigned=trust_unsigned,
                        thorough=True,
                        keys_token=keys_token,
                    ) as plan,
                ):
                    taken_at, signature = plan.taken_at, plan.signature
                name = _publish(src.store.path(src.name))
        except SourceError as exc:
            raise RestoreRefused(f"{exc}. Nothing was changed.") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise NotEnoughSpace(
                    f"the disk of {settings.BACKUP_ROOT} filled up while the bundle was received; the partial upload "
                    "was removed. Free some space, then try again. Nothing was changed."
                ) from None
            raise OperationFailed(f"receiving the bundle failed: {reason(exc)}. Nothing was changed.") from None
        audit.record(
            actor=actor,
            action="backup.uploaded",
            target=name,
            detail={"file": label, "bytes": body.received, "signature": signature},
            request=request,
        )
        return _enqueue(
            reservation,
            backup=name,
            taken_at=taken_at,
            actor=actor,
            trust_unsigned=trust_unsigned,
            send=send,
            keys_token=keys_token,
            request=request,
        )


def _publish(directory) -> str:
    """The checked bundle becomes the backup ``uploaded-<now>``: renamed into place within the
    backup root, so it is listed whole or not at all."""
    local = store.local()
    name, _ = _free_name("uploaded", timezone.now().replace(microsecond=0))
    os.rename(directory, local.path(name))
    fd = os.open(local.root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    catalog_sync()
    return name


class _Body(io.RawIOBase):
    """The request body as a file for the bundle reader: never more than the limit, an early
    end told apart from a bad bundle, and the lock's heartbeat kept by the reading itself, so a
    client that stalls loses the lock instead of holding it."""

    def __init__(self, raw: BinaryIO, *, length: int | None, run: Run):
        self._raw, self._length, self._run = raw, length, run
        self.received = 0
        self._last_beat = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wanted = len(buffer)
        if self._length is not None:
            wanted = min(wanted, self._length - self.received)
            if wanted <= 0:
                return 0
        try:
            count = self._read(memoryview(buffer).cast("B")[:wanted])
        except OSError:  # the connection broke (Django's UnreadablePostError, gunicorn's NoMoreData)
            raise UploadIncomplete(self._stopped()) from None
        if not count:
            if self._length is not None:
                raise UploadIncomplete(self._stopped())
            return 0
        self.received += count
        if self.received > settings.BACKUP_UPLOAD_MAX_BYTES:
            raise UploadTooLarge(
                f"the upload went past the {_size(settings.BACKUP_UPLOAD_MAX_BYTES)} the admin accepts "
                "(BACKUP_UPLOAD_MAX_BYTES) and was stopped; restore it with manage.py restore on the server. "
                "The partial upload was removed; nothing was changed."
            )
        if time.monotonic() - self._last_beat >= PROGRESS_INTERVAL:
            self._last_beat = time.monotonic()
            self._run.heartbeat()
            self._run.checkpoint()
        return count

    def _read(self, view: memoryview) -> int:
        if hasattr(self._raw, "readinto"):  # straight into the reader's buffer
            return self._raw.readinto(view)
        data = self._raw.read(len(view))  # Django's request
        view[: len(data)] = data
        return len(data)

    def _stopped(self) -> str:
        got = _size(self.received) + (f" of {_size(self._length)}" if self._length is not None else "")
        return (
            f"the upload stopped after {got}: the client went away or cancelled. The partial upload was removed; "
            "nothing was changed."
        )


# The worker ------------------------------------------------------------------------------------


class _Steps(Reporter):
    def __init__(self, job: RestoreJob):
        self.job = job

    def step(self, text: str, ok: bool = True) -> None:
        self.job.save(steps=[*self.job.steps, f"{'✓' if ok else '!'} {text}"])


def restore_run_queued(*, restore_id: str) -> RestoreOutcome | None:
    """Run a queued restore; None when it is unknown, or no longer queued (claimed by another
    worker, a redelivered message, or given up as lost)."""
    job = RestoreJob.load(restore_id)
    if job is None or job.state != QUEUED:
        return None
    lock = locks.adopt(job.owner)
    if lock is None:
        _fail(
            job,
            f"not started: it waited in the queue for more than {settings.BACKUP_STALE_SECONDS} s and its turn lapsed. "
            "Nothing was changed; restore again",
        )
        return None
    job.save(state=RUNNING, step=CHECKING)
    job.beat()
    run = Run(lock)
    # Whatever an earlier restore left there is not this one's progress.
    cache.delete(RESTORE_STATUS_KEY)
    try:
        with ticking(job.beat), contextlib.ExitStack() as stack:
            with ticking(run.heartbeat):  # restore_run keeps the lock from here on
                plan = stack.enter_context(
                    prepared(job.backup, trust_unsigned=job.trust_unsigned, keys_token=job.keys_token)
                )
            run.checkpoint()
            job.save(step=RESTORING)
            outcome = restore_run(plan=plan, actor=job.actor, reporter=_Steps(job), lock=lock)
    except OperationFailed as exc:
        _fail(job, str(exc))
        raise
    except Interrupted:
        # The worker was stopped: the restore finished (a signal waits for its last steps) or
        # was undone, and its audit event says which.
        if maintenance.active() is None and _recorded("backup.restored", job):
            job.finish(SUCCEEDED, step="done")
        else:
            _fail(job, "interrupted: the worker was stopped; the database and the workspace are unchanged")
        raise
    finally:
        lock.release()
        forget_keys(job.keys_token)
    notes = []
    if plan.behind or outcome.revision_after != plan.manifest.db_revision:
        notes.append(
            f"The backup predates migrations of this code ({', '.join(plan.behind) or 'db revision mismatch'}): "
            "run python manage.py migrate."
        )
    job.finish(SUCCEEDED, step="done", safety_backup=outcome.safety_backup or "", notes=notes)
    return outcome
