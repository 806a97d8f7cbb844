"""The backups' periodic tasks in django-celery-beat's tables, where operators edit them in the
admin (Periodic Tasks), and what beat needs to run them right.

- ``ensure()`` (on every migrate) creates a missing task by name and never touches one that
  exists: an operator's edit (another hour) survives migrates, restarts and upgrades.
- ``apply()`` (on migrate, when beat starts, after a restore) applies BACKUP_DAILY_ENABLED to
  the nightly task: false switches it off every time; a change back to true switches it on
  once, keeping its time; otherwise the admin's switch stands.
- ``at_beat_start(scheduler)`` makes the scheduler read the applied switch, and puts back a
  missed run that django-celery-beat would leave out (see ``_put_back_missed_runs``).
- ``before_publish(...)`` runs in beat for every task it sends: beat's heartbeat, and the
  nightly task's send time written at once (the worker compares it to tell a duplicate).
- ``DatabaseScheduler`` is django-celery-beat's, with a due task sent once when its schedule is
  edited while beat rebuilds its heap (settings.CELERY_BEAT_SCHEDULER names it).
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.utils import timezone
from django_celery_beat import schedulers
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask, PeriodicTasks

from trusca.backups.models import ScheduleSwitch

log = logging.getLogger("trusca.backups")

DAILY = "daily-auto-backup"
BEAT_HEARTBEAT_KEY = "trusca:beat:heartbeat"
WORKER_SEEN_KEY = "trusca:worker:seen"
# Beat sends the heartbeat task this often, so the beat's heartbeat is at most this old.
HEARTBEAT_SECONDS = 30


@dataclass(frozen=True)
class Periodic:
    name: str
    task: str
    description: str
    crontab: dict = field(default_factory=dict)  # CrontabSchedule fields, in UTC
    every_seconds: int = 0
    # A message not taken within this many seconds is dropped: a worker back after a day away
    # does not run a day's worth of heartbeats.
    expire_seconds: int | None = None


PERIODIC = (
    Periodic(
        DAILY,
        "trusca.backups.tasks.auto_backup",
        "The nightly backup of the database and the workspace (kind auto, named auto-YYYYMMDDTHHMMSSZ). "
        "Edit the time here; BACKUP_DAILY_ENABLED=false in the environment switches it off.",
        crontab={"minute": "0", "hour": "0"},
    ),
    Periodic(
        "backup-retention",
        "trusca.backups.tasks.retention_sweep",
        "Removes auto, cli and pre-restore backups older than BACKUP_RETENTION_DAYS (never the newest one).",
        crontab={"minute": "30", "hour": "12"},
    ),
    Periodic(
        "backup-verify",
        "trusca.backups.tasks.verify_sweep",
        "Re-reads every stored backup and checks its checksums; a damaged one is marked failed, shown on "
        "/admin/health and mailed to BACKUP_ALERT_EMAILS.",
        crontab={"minute": "0", "hour": "3", "day_of_week": "0"},
    ),
    Periodic(
        "backup-watch",
        "trusca.backups.tasks.watch",
        "Marks failed the backups whose worker died, finishes or undoes a restore whose process was killed, and "
        "sends the alerts for a failed nightly backup and for no backup in 26 hours.",
        every_seconds=60,
        expire_seconds=60,
    ),
    Periodic(
        "beat-heartbeat",
        "trusca.backups.tasks.beat_heartbeat",
        "Shows on /admin/health that beat is sending tasks and that a worker takes them from the backups queue.",
        every_seconds=HEARTBEAT_SECONDS,
        expire_seconds=HEARTBEAT_SECONDS,
    ),
)


def _tables_exist(using: str) -> bool:
    """False before migrate has made them, or after a restore of a backup from older code."""
    tables = set(connections[using].introspection.table_names())
    return {PeriodicTask._meta.db_table, ScheduleSwitch._meta.db_table} <= tables


def ensure(using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Create the periodic tasks that are missing, then apply BACKUP_DAILY_ENABLED. Returns the
    names created."""
    if not _tables_exist(using):
        return []
    created = []
    for periodic in PERIODIC:
        if PeriodicTask.objects.using(using).filter(name=periodic.name).exists():
            continue
        try:
            with transaction.atomic(using=using):
                # A schedule row of its own: editing it in the admin changes this task only.
                if periodic.crontab:
                    schedule = {
                        "crontab": CrontabSchedule.objects.using(using).create(**periodic.crontab, timezone="UTC")
                    }
                else:
                    schedule = {
                        "interval": IntervalSchedule.objects.using(using).create(
                            every=periodic.every_seconds, period=IntervalSchedule.SECONDS
                        )
                    }
                PeriodicTask.objects.using(using).create(
                    name=periodic.name,
                    task=periodic.task,
                    description=periodic.description,
                    expire_seconds=periodic.expire_seconds,
                    **schedule,
                )
        except IntegrityError:
            continue  # another migrate created it at the same moment
        created.append(periodic.name)
    apply(using)
    return created


def apply(using: str = DEFAULT_DB_ALIAS) -> bool:
    """BACKUP_DAILY_ENABLED onto the nightly task. Returns whether the task was changed (and beat
    told to re-read its schedule)."""
    if not _tables_exist(using):
        return False
    wanted = settings.BACKUP_DAILY_ENABLED
    with transaction.atomic(using=using):
        task = PeriodicTask.objects.using(using).select_for_update().filter(name=DAILY).first()
        if task is None:
            return False
        switch = ScheduleSwitch.objects.using(using).select_for_update().filter(task_name=DAILY).first()
        previous = switch.enabled if switch else None
        # Off is enforced every time; on only when the setting has just changed to it.
        turn = False if not wanted else (True if previous is False else None)
        changed = turn is not None and task.enabled != turn
        if changed:
            task.enabled = turn
            task.save(using=using, update_fields=["enabled", "last_run_at", "date_changed"])
        if previous != wanted:
            ScheduleSwitch.objects.using(using).update_or_create(task_name=DAILY, defaults={"enabled": wanted})
    if changed:
        log.info("%s %s (BACKUP_DAILY_ENABLED=%s)", DAILY, "enabled" if turn else "disabled", str(wanted).lower())
    return changed


def after_restore() -> None:
    """The restored tables hold the backup's schedule. Apply the setting to it, and start its
    clock from now: the fire times between the backup and now were the live portal's to run, not
    missed runs to catch up. Then beat re-reads the table."""
    if not _tables_exist(DEFAULT_DB_ALIAS):
        return
    apply()
    PeriodicTask.objects.filter(name__in=[p.name for p in PERIODIC], enabled=True).update(last_run_at=timezone.now())
    PeriodicTasks.update_changed()


# Beat ------------------------------------------------------------------------------------------


class DatabaseScheduler(schedulers.DatabaseScheduler):
    """django-celery-beat's scheduler, without its double send (django-celery-beat#558).

    Its reserve() gives the sent entry's successor, last run now, to the heap only; the schedule
    keeps the entry as read, last run before the send. An edit that beat notices inside a tick,
    after the tick compared schedules and before it rebuilt its heap, leaves the heap marked
    invalid, so the next tick rebuilds it from the schedule, where the task just sent is still
    due: beat sent the nightly backup twice 30 ms apart when an edit landed there. The schedule
    here takes the successor too."""

    def reserve(self, entry):
        successor = super().reserve(entry)
        # Only the entry the schedule still holds: one disabled or re-read meanwhile stays out.
        if self._schedule is not None and self._schedule.get(entry.name) is entry:
            self._schedule[entry.name] = successor
        return successor


def at_beat_start(scheduler) -> None:
    """Called from beat_init with beat's scheduler, which has already read the table once."""
    _heartbeat()

    if not isinstance(scheduler, schedulers.DatabaseScheduler):
        ensure()
        log.error(
            "beat runs %s, not django_celery_beat's DatabaseScheduler: %s and the other backup tasks will not "
            "run. Start beat with --scheduler trusca.backups.schedule:DatabaseScheduler",
            type(scheduler).__name__,
            DAILY,
        )
        return
    # The scheduler notices a change by comparing PeriodicTasks' timestamp with the one it saw
    # last, and its first look only records that timestamp: look, change, look again, so what
    # ensure() applied is what beat runs with from its first tick.
    scheduler.schedule  # noqa: B018
    ensure()
    PeriodicTasks.update_changed()
    _put_back_missed_runs(scheduler, scheduler.schedule)
    # What beat will run, the first thing to look at when nightly backups stop; the line also
    # marks the end of beat's own changes to the schedule at start-up.
    task = PeriodicTask.objects.select_related("crontab").filter(name=DAILY).first()
    state = f"{'on' if task.enabled else 'off'} (crontab {task.crontab})" if task else "missing"
    log.info("beat: %s is %s", DAILY, state)


def _put_back_missed_runs(scheduler, schedule: dict) -> None:
    """A crontab task whose fire time passed while beat was down is due once beat is back (its
    last_run_at is before that time), and beat sends it once: the next fire time is counted from
    the send, so three missed nights make one run, not three. But django-celery-beat (2.8 on)
    reads only crontab tasks whose hour is within two hours of now, so a nightly run missed at
    00:00 would wait for 22:00 and then run again at 00:00. A missed run of ours that was left
    out is put back into the schedule, where beat sends it on its first tick."""
    ours = [p.name for p in PERIODIC if p.name not in schedule]
    for model in PeriodicTask.objects.filter(name__in=ours, enabled=True, crontab__isnull=False):
        entry = scheduler.Entry(model, app=scheduler.app)
        if entry.is_due().is_due:
            missed = _next_fire(model, model.last_run_at or model.date_changed)
            log.info("%s did not run at %s UTC (beat was down); sending it once now", model.name, f"{missed:%F %R}")
            schedule[model.name] = entry


def _next_fire(task: PeriodicTask, after: datetime) -> datetime:
    # remaining_estimate() counts from Celery's own now, a few microseconds after ours.
    return (timezone.now() + task.schedule.remaining_estimate(after) + timedelta(milliseconds=500)).replace(
        microsecond=0
    )


def before_publish(headers: dict) -> None:
    """In beat, for every task it sends."""
    now = _heartbeat()
    if headers.get("periodic_task_name") == DAILY:
        # Beat itself writes last_run_at minutes later; written now, before the message exists,
        # the worker can compare it with the auto backups it finds, and a beat killed meanwhile
        # does not send the same night again when it restarts.
        PeriodicTask.objects.filter(name=DAILY).update(last_run_at=now)


def _heartbeat() -> datetime:
    now = timezone.now()
    cache.set(BEAT_HEARTBEAT_KEY, now.isoformat(), timeout=None)
    return now


def beat_heartbeat() -> datetime | None:
    raw = cache.get(BEAT_HEARTBEAT_KEY)
    return datetime.fromisoformat(raw) if raw else None


def worker_took_heartbeat(worker: str) -> None:
    cache.set(WORKER_SEEN_KEY, {"at": timezone.now().isoformat(), "worker": worker}, timeout=None)


def worker_seen() -> tuple[datetime, str] | None:
    """When a worker last took beat's heartbeat task from the backups queue, and which."""
    seen = cache.get(WORKER_SEEN_KEY)
    return (datetime.fromisoformat(seen["at"]), seen["worker"]) if seen else None


def last_sent() -> datetime | None:
    """When beat last sent the nightly task."""
    return PeriodicTask.objects.filter(name=DAILY).values_list("last_run_at", flat=True).first()


# What the Backup page and the health page show --------------------------------------------------


@dataclass
class Daily:
    pk: int
    enabled: bool
    next_run: datetime | None  # None while off
    overdue: bool  # a fire time passed without a send (beat down)
    off_by_setting: bool
    description: str  # the schedule as operators read it


def describe() -> Daily | None:
    task = PeriodicTask.objects.select_related("crontab", "interval").filter(name=DAILY).first()
    if task is None:
        return None
    next_run, overdue = None, False
    if task.enabled and task.scheduler is not None:
        now = timezone.now()
        next_run = _next_fire(task, task.last_run_at or task.date_changed)
        overdue = next_run <= now
        next_run = max(next_run, now)
    return Daily(
        pk=task.pk,
        enabled=task.enabled,
        next_run=next_run,
        overdue=overdue,
        off_by_setting=not task.enabled and not settings.BACKUP_DAILY_ENABLED,
        description=_describe_schedule(task),
    )


def _describe_schedule(task: PeriodicTask) -> str:
    if task.crontab is not None:
        c = task.crontab
        if (
            (c.day_of_week, c.day_of_month, c.month_of_year) == ("*", "*", "*")
            and c.minute.isdigit()
            and c.hour.isdigit()
        ):
            return f"every day at {int(c.hour):02}:{int(c.minute):02} {c.timezone}"
        return f"cron “{c.minute} {c.hour} {c.day_of_month} {c.month_of_year} {c.day_of_week}” ({c.timezone})"
    return str(task.scheduler)
