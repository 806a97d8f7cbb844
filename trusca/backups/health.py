"""Whether the portal is safe: the checks behind /admin/health, each one line, green or red,
with what is wrong and what to do.

The checks run side by side (those that read the database one after the other on one
connection), and the page waits for them until a deadline: a broker or a database that does not
answer makes its lines red ("no answer within …") instead of making the page hang. A thread that
outlives the deadline ends on its own bounded timeout.
"""

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import connection
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from trusca.backups import alerts, schedule
from trusca.backups.models import Backup
from trusca.backups.operations import reverify
from trusca.backups.operations.lifecycle import reason
from trusca.celery import app as celery_app

OK, WARNING, FAILING = "ok", "warning", "failing"
_RANK = {OK: 0, WARNING: 1, FAILING: 2}
# The page answers within a second: the checks get this long together.
DEADLINE_SECONDS = 0.85
# The broker probes' bounds: connecting, each read, and the wait for workers to answer. A
# broadcast with no worker to answer takes about the wait plus two reads (measured on Redis:
# 0.25 s + 2 x 0.15 s = 0.5 s), leaving room under the deadline on a busy host.
CONNECT_TIMEOUT = 0.3
READ_TIMEOUT = 0.15
REPLY_WAIT = 0.25
BACKUPS_QUEUE = "backups"
# The next backup is estimated as the last one plus this much growth.
GROWTH = 1.1


@dataclass
class Check:
    id: str
    title: str
    state: str
    detail: str
    action: str = ""


@dataclass
class Report:
    status: str
    checked_at: datetime
    duration_ms: int
    checks: list[Check]

    def as_json(self) -> dict:
        return {
            "status": self.status,
            "checked_at": self.checked_at.isoformat(),
            "duration_ms": self.duration_ms,
            "checks": {c.id: {k: v for k, v in asdict(c).items() if k != "id"} for c in self.checks},
        }


@dataclass(frozen=True)
class _Probe:
    id: str
    title: str
    run: Callable[[], tuple]  # (state, detail) or (state, detail, action)
    when_silent: str  # the action when it fails or does not answer in time
    # Probes in one lane run one after the other in one thread, on one database connection.
    lane: str = ""


def run_checks() -> Report:
    """Every lane in its own thread, all waited for until the deadline together."""
    started = time.monotonic()
    results: dict[str, Check] = {}

    def work(lane: list[_Probe]) -> None:
        try:
            for probe in lane:
                try:
                    state, detail, *action = probe.run()
                    results[probe.id] = Check(probe.id, probe.title, state, detail, action[0] if action else "")
                except Exception as exc:
                    results[probe.id] = Check(probe.id, probe.title, FAILING, reason(exc), probe.when_silent)
        finally:
            connection.close()

    lanes: dict[str, list[_Probe]] = {}
    for probe in PROBES:
        lanes.setdefault(probe.lane or probe.id, []).append(probe)
    threads = [
        threading.Thread(target=work, args=(lane,), name=f"health-{name}", daemon=True) for name, lane in lanes.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started + DEADLINE_SECONDS - time.monotonic()))
    checks = [
        results.get(p.id) or Check(p.id, p.title, FAILING, f"no answer within {DEADLINE_SECONDS:g} s", p.when_silent)
        for p in PROBES
    ]
    status = max((c.state for c in checks), key=_RANK.__getitem__)
    return Report(status, timezone.now(), int((time.monotonic() - started) * 1000), checks)


def _ms(since: float) -> str:
    return f"{(time.monotonic() - since) * 1000:.0f} ms"


def _ago(when: datetime) -> str:
    seconds = int((timezone.now() - when).total_seconds())
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _utc(when: datetime) -> str:
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


# The checks ------------------------------------------------------------------------------------


def _database():
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return OK, f"{connection.display_name} answered in {_ms(started)}"


def _broker_connection():
    options = {
        **getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}),
        "socket_timeout": READ_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
    }
    return celery_app.connection_for_write(
        url=settings.CELERY_BROKER_URL, connect_timeout=CONNECT_TIMEOUT, transport_options=options
    )


def _broker():
    started = time.monotonic()
    with _broker_connection() as conn:
        conn.ensure_connection(max_retries=0)  # no retry: the next page load is the retry
        where = conn.as_uri()
    return OK, f"{where} answered in {_ms(started)}"


def _worker():
    with _broker_connection() as conn:
        # Connected first, without retries: a broadcast to a broker that is down retries for seconds.
        conn.ensure_connection(max_retries=0)
        # The first worker to answer usually consumes it (ms); only otherwise wait for the rest,
        # which takes the whole timeout.
        replies = _active_queues(conn, limit=1)
        if replies and not _consuming(replies):
            replies = _active_queues(conn, limit=None)
    consuming = _consuming(replies)
    if consuming:
        return OK, f"consuming the {BACKUPS_QUEUE} queue: {', '.join(consuming)}"
    # A worker running a backup in its only process does not answer; the backup's heartbeat does.
    fresh = timezone.now() - timedelta(seconds=settings.BACKUP_STALE_SECONDS)
    running = Backup.objects.filter(status=Backup.Status.RUNNING, heartbeat_at__gte=fresh).defer("manifest").first()
    if running is not None:
        return OK, f"busy with {running.name} (its heartbeat {_ago(running.heartbeat_at)})"
    # The embedded filesystem broker's workers poll once a second, often too late for the ping:
    # a worker that took beat's heartbeat task lately is alive too.
    seen_at, seen_by = schedule.worker_seen() or (None, "")
    if seen_at and timezone.now() - seen_at <= timedelta(seconds=3 * schedule.HEARTBEAT_SECONDS):
        return OK, f"{seen_by} took a task from the {BACKUPS_QUEUE} queue {_ago(seen_at)}"
    last = f"; a worker last took a task from it {_ago(seen_at)}" if seen_at else ""
    others = f" (workers on other queues answered: {', '.join(sorted(replies))})" if replies else ""
    return (
        FAILING,
        f"no worker consuming the {BACKUPS_QUEUE} queue answered within {REPLY_WAIT:g} s{others}{last}",
        f"Start one: celery -A trusca worker -Q {BACKUPS_QUEUE},default (scripts/run.sh and the compose file run it), "
        "then look at its log. Queued backups wait until then.",
    )


def _active_queues(conn, *, limit: int | None) -> dict[str, list[dict]]:
    answers = celery_app.control.broadcast(
        "active_queues", reply=True, timeout=REPLY_WAIT, limit=limit, connection=conn
    )
    return {name: queues for answer in answers or [] for name, queues in answer.items()}


def _consuming(replies: dict[str, list[dict]]) -> list[str]:
    return sorted(name for name, queues in replies.items() if any(q.get("name") == BACKUPS_QUEUE for q in queues))


def _beat():
    beat = schedule.beat_heartbeat()
    limit = timedelta(seconds=3 * schedule.HEARTBEAT_SECONDS)
    if beat is not None and timezone.now() - beat <= limit:
        return OK, f"running: last heard from {_ago(beat)}"
    return (
        FAILING,
        f"beat has not been heard from since {_utc(beat)}" if beat else "beat has never been heard from",
        "Start beat: celery -A trusca beat (scripts/run.sh and the compose file run it); without it no "
        "nightly backup is taken. Its log says why it stopped.",
    )


def _storage():
    root: Path = settings.BACKUP_ROOT
    # A directory that does not exist yet is made by the first backup: its parent must be writable.
    existing = next(p for p in (root, *root.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"x")
            probe.flush()
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        return (
            FAILING,
            f"BACKUP_ROOT {root} cannot be written: {exc.strerror or exc}",
            "Point BACKUP_ROOT at a writable directory with room for several backups; nothing can be backed up "
            "until then.",
        )
    last = alerts.last_succeeded()
    if last is None or not last.size_bytes:
        return OK, f"{root} is writable, {filesizeformat(free)} free"
    need = int(last.size_bytes * GROWTH)
    if need > free:
        return (
            FAILING,
            f"{root} has {filesizeformat(free)} free; the next backup needs about {filesizeformat(need)} "
            f"(the last, {last.name}, was {filesizeformat(last.size_bytes)})",
            "Free space on that disk (delete old manual backups on the Backup page) or move BACKUP_ROOT to a "
            "larger one before the next backup.",
        )
    room = free // need
    count = f"{room} more backup{'s' if room != 1 else ''}" if room < 100 else "100+ more backups"
    return (
        OK,
        f"{root} is writable, {filesizeformat(free)} free: "
        f"room for {count} like the last ({filesizeformat(last.size_bytes)})",
    )


def _last_backup():
    last = alerts.last_succeeded()
    limit = alerts.STALE_AFTER
    hours = int(limit.total_seconds() // 3600)
    if last is not None and timezone.now() - last.created_at <= limit:
        return OK, f"{last.name}, {_ago(last.created_at)}"
    if last is None:
        installed = alerts.installed_at()
        if installed is not None and timezone.now() - installed <= limit:
            return WARNING, "no backup has succeeded yet", "The first nightly backup runs at the time shown below."
    what = f"the last, {last.name}, was taken {_ago(last.created_at)}" if last else "none ever has"
    return (
        FAILING,
        f"no backup has succeeded for more than {hours} hours: {what}",
        "Check the lines above (worker, beat, storage) and the last auto backup's reason, then take one with "
        "'Run manual backup now' on the Backup page.",
    )


def _last_auto():
    latest = Backup.objects.filter(kind=Backup.Kind.AUTO).defer("manifest").first()
    if latest is None:
        return OK, "none yet"
    if latest.status == Backup.Status.SUCCEEDED:
        return OK, f"{latest.name} succeeded"
    if latest.is_active:
        return OK, f"{latest.name} is {latest.status}"
    newer = Backup.objects.filter(status=Backup.Status.SUCCEEDED, created_at__gt=latest.created_at).exists()
    return (
        WARNING if newer else FAILING,
        f"{latest.name} failed: {latest.message}" + (" (a later backup succeeded)" if newer else ""),
        "The worker's log has its 'backup.failed' line. Fix the cause; the next night tries again, or take one now "
        "with 'Run manual backup now'.",
    )


def _schedule():
    daily = schedule.describe()
    if daily is None:
        return (
            FAILING,
            f"the periodic task {schedule.DAILY} does not exist",
            "Run manage.py migrate: it creates the missing task (00:00 UTC); then set its time in Periodic Tasks.",
        )
    if daily.enabled:
        when = "due now: beat sends it as soon as it runs" if daily.overdue else f"next run {_utc(daily.next_run)}"
        return OK, f"on, {daily.description}; {when}"
    if daily.off_by_setting:
        return OK, "off: BACKUP_DAILY_ENABLED=false; backups come only from elsewhere (the button, cron)"
    return (
        WARNING,
        f"off: {schedule.DAILY} is disabled in Periodic Tasks",
        "Enable it in the admin (Periodic Tasks), unless backups are taken another way.",
    )


def _stored_copies():
    damaged = list(
        Backup.objects.filter(status=Backup.Status.FAILED, message__startswith=reverify.DAMAGED_PREFIX)
        .defer("manifest")
        .values_list("name", flat=True)[:5]
    )
    if damaged:
        return (
            WARNING,
            f"damaged: {', '.join(damaged)} (found by the weekly check; the reason is on the Backup page)",
            "Delete them on the Backup page and check the disk under BACKUP_ROOT; take a fresh backup.",
        )
    report = reverify.last_report()
    if report is None:
        return OK, "not checked yet: every stored backup is re-read weekly (backup-verify, Sundays 03:00 UTC)"
    when = datetime.fromisoformat(report["checked_at"])
    return OK, f"{report['intact']} intact at the weekly check {_ago(when)}"


def _offsite():
    if not settings.BACKUP_S3_BUCKET:
        return OK, "no off-host copy: BACKUP_S3_BUCKET is not set (README, Off-host copies in S3)"
    latest = Backup.objects.filter(status=Backup.Status.SUCCEEDED, local=True).defer("manifest").first()
    if latest is None:
        return OK, f"no backup to copy to s3://{settings.BACKUP_S3_BUCKET}/{settings.BACKUP_S3_PREFIX} yet"
    where = f"s3://{settings.BACKUP_S3_BUCKET}/{settings.BACKUP_S3_PREFIX}{latest.name}"
    if latest.offsite == Backup.Offsite.COPIED:
        return OK, f"the latest backup is copied: {where}"
    if latest.offsite == Backup.Offsite.FAILED:
        return (
            FAILING,
            f"the copy of the latest backup failed: {latest.offsite_message}",
            "Fix what the reason names (credentials, bucket, network), then Retry copy on the Backup page "
            "or run manage.py offload --missing.",
        )
    return OK, f"the latest backup's copy is {latest.get_offsite_display() or 'not started yet'}"


PROBES = (
    _Probe("database", "Database", _database, "Check that the database server is up and DATABASE_URL reaches it."),
    _Probe(
        "broker",
        "Task queue (broker)",
        _broker,
        "Check that the broker (Redis) is up and CELERY_BROKER_URL reaches it; backups cannot be queued until then.",
    ),
    _Probe(
        "worker",
        "Worker on the backups queue",
        _worker,
        "Check the broker first; then that a worker runs: celery -A trusca worker -Q backups,default.",
    ),
    _Probe("beat", "Beat (the scheduler)", _beat, "Check the cache (CACHE_URL) and that beat runs."),
    _Probe("storage", "Backup storage", _storage, "Check the disk under BACKUP_ROOT."),
    _Probe("last_backup", "Last succeeded backup", _last_backup, "Check that the database answers.", "database"),
    _Probe("last_auto", "Last nightly backup", _last_auto, "Check that the database answers.", "database"),
    _Probe("schedule", "Nightly schedule", _schedule, "Check that the database answers.", "database"),
    _Probe("stored_copies", "Stored copies", _stored_copies, "Check that the database answers.", "database"),
    _Probe("offsite", "Off-host copy (S3)", _offsite, "Check that the database answers.", "database"),
)
