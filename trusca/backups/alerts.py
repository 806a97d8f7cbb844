"""Emails to BACKUP_ALERT_EMAILS when the backups need a person: the nightly backup failed, a
stored copy is damaged, or nothing has succeeded for 26 hours.

One email per cause per 24 hours, whatever happens meanwhile (retries, the watch task looking
every minute): the cache holds when each cause last went out, taken with an atomic add, so two
processes noticing the same thing send one email. A lost cache costs at most one repeat.
"""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.core.mail import send_mail
from django.db.migrations.recorder import MigrationRecorder
from django.utils import timezone

from trusca.backups.models import Backup

log = logging.getLogger("trusca.backups.outcome")

AUTO_FAILED = "auto_backup_failed"
DAMAGED = "backup_damaged"
STALE = "no_recent_backup"
# A nightly schedule plus two hours for a slow backup or a late beat.
STALE_AFTER = timedelta(hours=26)
THROTTLE = timedelta(hours=24)
RESEND_AFTER_FAILURE = timedelta(hours=1)
HEALTH_PATH = "/admin/health"


def _key(cause: str) -> str:
    return f"trusca:backups:alert:{cause}"


def send(cause: str, subject: str, body: str) -> bool:
    """Send one alert unless this cause was sent in the last 24 hours. Returns whether it went
    out. A mail server that refuses it is logged, and the next occasion after an hour tries again."""
    if not cache.add(_key(cause), timezone.now().isoformat(), timeout=int(THROTTLE.total_seconds())):
        return False
    recipients = settings.BACKUP_ALERT_EMAILS
    log.warning("backup.alert %s: %s", cause, subject)
    if not recipients:
        return False
    text = f"{body}\n\nThe portal's health page: {HEALTH_PATH}\nThis alert is sent at most once a day per cause.\n"
    try:
        send_mail(f"[TRUSCA] {subject}", text, settings.DEFAULT_FROM_EMAIL, recipients)
    except Exception as exc:
        # Tried again in an hour rather than at every look of the watch task.
        cache.set(_key(cause), timezone.now().isoformat(), timeout=int(RESEND_AFTER_FAILURE.total_seconds()))
        log.error("backup.alert_failed %s: the mail was not sent (%s); check the EMAIL_* settings", cause, exc)
        return False
    return True


def auto_backup_failed(name: str, why: str) -> bool:
    return send(
        AUTO_FAILED,
        f"Nightly backup {name} failed",
        f"The nightly backup {name} failed: {why}\n\n"
        "Nothing else was changed: earlier backups are untouched, and partial files are removed.\n"
        "Fix the cause (the worker's log has the line 'backup.failed'), then take a backup with "
        "'Run manual backup now' on the Backup page, or wait for the next night.",
    )


def backups_damaged(damaged: list[tuple[str, str]]) -> bool:
    lines = "\n".join(f"  {name}: {reason}" for name, reason in damaged)
    return send(
        DAMAGED,
        f"{len(damaged)} stored backup{'s' if len(damaged) != 1 else ''} failed verification",
        f"The weekly check re-read every stored backup and found damage:\n{lines}\n\n"
        "They are marked failed on the Backup page and will not be restored. Check the disk under "
        f"BACKUP_ROOT ({settings.BACKUP_ROOT}), delete the damaged ones, and take a fresh backup.",
    )


def check_last_auto(now: datetime | None = None) -> bool:
    """The newest auto backup failed within the last day (worker lost included): alert."""
    now = now or timezone.now()
    latest = Backup.objects.filter(kind=Backup.Kind.AUTO).defer("manifest").first()
    if latest is None or latest.status != Backup.Status.FAILED or latest.finished_at is None:
        return False
    if now - latest.finished_at > THROTTLE:
        return False
    return auto_backup_failed(latest.name, latest.message)


def check_backup_age(now: datetime | None = None) -> bool:
    """No backup has succeeded for 26 hours (counted from the installation when none ever did)."""
    now = now or timezone.now()
    last = last_succeeded()
    since = last.created_at if last else installed_at()
    if since is None or now - since <= STALE_AFTER:
        return False
    hours = int((now - since).total_seconds() // 3600)
    what = f"the last one, {last.name}, is {hours} hours old" if last else f"none in the {hours} hours since install"
    return send(
        STALE,
        f"No backup has succeeded for {hours} hours",
        f"No backup has succeeded for more than {int(STALE_AFTER.total_seconds() // 3600)} hours: {what}.\n\n"
        "Look at /admin/health: is beat running, is a worker consuming the backups queue, is the disk full? "
        "Then take a backup with 'Run manual backup now' on the Backup page.",
    )


def last_succeeded() -> Backup | None:
    return Backup.objects.filter(status=Backup.Status.SUCCEEDED).defer("manifest").first()


def installed_at() -> datetime | None:
    return (
        MigrationRecorder.Migration.objects.filter(app="backups", name="0001_initial")
        .values_list("applied", flat=True)
        .first()
    )
