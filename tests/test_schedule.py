"""The periodic tasks in django-celery-beat's tables: created on migrate, never overwritten,
BACKUP_DAILY_ENABLED applied on migrate, at beat start and after a restore, and a missed night
run once when beat comes back."""

import io
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.forms.models import model_to_dict
from django.urls import reverse
from django.utils import timezone
from django_celery_beat import schedulers
from django_celery_beat.models import CrontabSchedule, PeriodicTask, PeriodicTasks

from trusca.backups import schedule
from trusca.backups.models import ScheduleSwitch
from trusca.backups.schedule import DatabaseScheduler
from trusca.celery import app as celery_app

pytestmark = pytest.mark.django_db
# Beat runs in autocommit, and its scheduler closes a connection it finds inside a transaction:
# the tests that start one commit for real.
with_beat = pytest.mark.django_db(transaction=True)


@pytest.fixture
def beat_scheduler():
    """Beat's scheduler as beat builds it: it reads the table as it is made, before beat_init."""
    made = []

    def make() -> DatabaseScheduler:
        made.append(DatabaseScheduler(app=celery_app))
        return made[-1]

    yield make
    for scheduler in made:
        scheduler.sync()  # what beat does as it stops: nothing left to write at exit


def daily() -> PeriodicTask:
    return PeriodicTask.objects.select_related("crontab").get(name=schedule.DAILY)


def migrate() -> None:
    call_command("migrate", verbosity=0, stdout=io.StringIO())


def edit_hour(hour: str) -> None:
    crontab = daily().crontab
    crontab.hour = hour
    crontab.save()


def switch_in_admin(enabled: bool) -> None:
    task = daily()
    task.enabled = enabled
    task.save()


def hours_from_now(hours: int) -> str:
    return str((timezone.now() + timedelta(hours=hours)).hour)


def snapshot() -> list:
    return [
        [
            model_to_dict(t) | {"date_changed": t.date_changed, "last_run_at": t.last_run_at}
            for t in PeriodicTask.objects.order_by("name")
        ],
        [model_to_dict(c) for c in CrontabSchedule.objects.order_by("pk")],
        PeriodicTasks.last_change(),
        list(ScheduleSwitch.objects.values()),
    ]


def test_migrate_creates_the_nightly_backup_at_midnight_utc():
    task = daily()
    assert task.task == "trusca.backups.tasks.auto_backup"
    assert task.enabled
    c = task.crontab
    assert (c.minute, c.hour, c.day_of_week, c.day_of_month, c.month_of_year, str(c.timezone)) == (
        "0",
        "0",
        "*",
        "*",
        "*",
        "UTC",
    )
    assert {t.name for t in PeriodicTask.objects.all()} == {p.name for p in schedule.PERIODIC}


def test_a_second_migrate_changes_nothing():
    before = snapshot()
    migrate()
    assert snapshot() == before


def test_an_hour_edited_in_the_admin_survives_migrate(su_client):
    task = daily()
    inline = "periodictask_set"
    response = su_client.post(
        reverse("admin:django_celery_beat_crontabschedule_change", args=[task.crontab.pk]),
        {
            **{"minute": "15", "hour": "3", "day_of_month": "*", "month_of_year": "*", "day_of_week": "*"},
            "timezone": "UTC",
            **{f"{inline}-TOTAL_FORMS": "1", f"{inline}-INITIAL_FORMS": "1", f"{inline}-0-id": str(task.pk)},
            f"{inline}-0-crontab": str(task.crontab.pk),
        },
    )
    assert response.status_code == 302
    pk = daily().pk
    migrate()
    assert (daily().pk, daily().crontab.minute, daily().crontab.hour) == (pk, "15", "3")
    assert schedule.describe().description == "every day at 03:15 UTC"


def test_false_disables_the_task_and_true_enables_it_again_keeping_the_edited_hour(settings):
    edit_hour("3")
    settings.BACKUP_DAILY_ENABLED = False
    migrate()
    assert not daily().enabled
    settings.BACKUP_DAILY_ENABLED = True
    migrate()
    assert daily().enabled
    assert daily().crontab.hour == "3"
    before = snapshot()
    migrate()
    assert snapshot() == before


def test_while_it_stays_true_an_operators_switch_in_the_admin_stands(settings):
    switch_in_admin(False)
    migrate()
    assert not daily().enabled
    switch_in_admin(True)
    migrate()
    assert daily().enabled


def test_while_it_is_false_the_task_is_switched_off_again_at_every_migrate(settings):
    settings.BACKUP_DAILY_ENABLED = False
    migrate()
    switch_in_admin(True)
    migrate()
    assert not daily().enabled


def test_a_deleted_task_comes_back_on_migrate_and_an_existing_one_is_kept():
    PeriodicTask.objects.filter(name="backup-retention").delete()
    heartbeat = PeriodicTask.objects.get(name="beat-heartbeat")
    migrate()
    assert PeriodicTask.objects.filter(name="backup-retention").exists()
    assert PeriodicTask.objects.get(name="beat-heartbeat").date_changed == heartbeat.date_changed


@with_beat
def test_beat_started_with_false_does_not_send_a_due_nightly_backup(settings, beat_scheduler):
    PeriodicTask.objects.filter(name=schedule.DAILY).update(last_run_at=timezone.now() - timedelta(days=2))
    edit_hour(hours_from_now(0))
    scheduler = beat_scheduler()
    assert scheduler.schedule[schedule.DAILY].is_due().is_due
    settings.BACKUP_DAILY_ENABLED = False
    schedule.at_beat_start(scheduler)
    assert schedule.DAILY not in scheduler.schedule
    assert not daily().enabled


@with_beat
def test_beat_started_after_a_change_back_to_true_runs_the_re_enabled_task(settings, beat_scheduler):
    edit_hour(hours_from_now(0))
    settings.BACKUP_DAILY_ENABLED = False
    migrate()
    settings.BACKUP_DAILY_ENABLED = True
    scheduler = beat_scheduler()
    assert schedule.DAILY not in scheduler.schedule
    schedule.at_beat_start(scheduler)
    assert daily().enabled
    # In beat's schedule from the first tick, its clock started at the re-enabling: the nights
    # it was off are not caught up.
    assert not scheduler.schedule[schedule.DAILY].is_due().is_due


@with_beat
def test_a_night_missed_while_beat_was_down_is_sent_once_when_beat_comes_back(beat_scheduler):
    # Twelve hours away from now: outside the two hours django-celery-beat reads crontabs for.
    edit_hour(hours_from_now(12))
    scheduler = beat_scheduler()
    schedule.at_beat_start(scheduler)
    assert schedule.DAILY not in scheduler.schedule, "no night was missed: nothing is put back"

    PeriodicTask.objects.filter(name=schedule.DAILY).update(last_run_at=timezone.now() - timedelta(days=3))
    scheduler = beat_scheduler()
    assert schedule.DAILY not in scheduler.schedule, "the library leaves it out: why the put-back exists"

    schedule.at_beat_start(scheduler)
    entry = scheduler.schedule[schedule.DAILY]
    assert entry.is_due().is_due
    sent = scheduler.reserve(entry)  # what beat's tick does as it sends it
    assert not sent.is_due().is_due, "three missed nights make one run, not three"


@with_beat
@pytest.mark.parametrize("scheduler_cls", [DatabaseScheduler, schedulers.DatabaseScheduler], ids=["ours", "upstream"])
def test_an_edit_beat_notices_while_it_rebuilds_its_heap_does_not_send_a_due_task_twice(scheduler_cls, monkeypatch):
    edit_hour(hours_from_now(0))
    PeriodicTask.objects.filter(name=schedule.DAILY).update(last_run_at=timezone.now() - timedelta(days=1))
    scheduler = scheduler_cls(app=celery_app)
    schedule.at_beat_start(scheduler)
    sent = []
    # The broker's side: what beat's tick hands over to be published.
    monkeypatch.setattr(scheduler, "apply_entry", lambda entry, producer=None: sent.append(entry.name))
    rebuild = scheduler.populate_heap

    def edited_as_beat_rebuilds():
        # Once, as an operator saving any periodic task in the admin at that moment.
        monkeypatch.setattr(scheduler, "populate_heap", rebuild)
        PeriodicTasks.update_changed()
        rebuild()

    monkeypatch.setattr(scheduler, "populate_heap", edited_as_beat_rebuilds)
    for _ in range(len(schedule.PERIODIC) + 3):  # a tick sends one due task
        scheduler.tick()
    scheduler.sync()
    if scheduler_cls is DatabaseScheduler:
        assert sent.count(schedule.DAILY) == 1, sent
    else:  # why ours exists; a newer django-celery-beat that passes here lets it go
        assert sent.count(schedule.DAILY) == 2, sent


@with_beat
def test_a_missed_night_inside_the_window_is_left_to_beat_itself(beat_scheduler):
    edit_hour(hours_from_now(0))
    PeriodicTask.objects.filter(name=schedule.DAILY).update(last_run_at=timezone.now() - timedelta(days=3))
    scheduler = beat_scheduler()
    assert scheduler.schedule[schedule.DAILY].is_due().is_due
    schedule.at_beat_start(scheduler)
    assert scheduler.schedule[schedule.DAILY].is_due().is_due


def test_after_a_restore_the_setting_applies_and_the_clock_starts_from_now(settings):
    # The restored table holds the backup's state: enabled, last run days before now.
    PeriodicTask.objects.filter(name=schedule.DAILY).update(last_run_at=timezone.now() - timedelta(days=4))
    changed_before = PeriodicTasks.last_change()
    schedule.after_restore()
    assert timezone.now() - daily().last_run_at < timedelta(seconds=5)
    assert PeriodicTasks.last_change() > changed_before, "beat is told to re-read the table"

    settings.BACKUP_DAILY_ENABLED = False
    schedule.after_restore()
    assert not daily().enabled


def test_beat_records_its_heartbeat_and_the_nightly_send_at_publish():
    schedule.before_publish({"periodic_task_name": "beat-heartbeat"})
    assert timezone.now() - schedule.beat_heartbeat() < timedelta(seconds=5)
    assert daily().last_run_at is None
    schedule.before_publish({"periodic_task_name": schedule.DAILY})
    assert timezone.now() - schedule.last_sent() < timedelta(seconds=5)


def test_the_schedule_is_described_with_its_next_run_in_utc():
    described = schedule.describe()
    assert described.description == "every day at 00:00 UTC"
    tomorrow = (timezone.now() + timedelta(days=1)).date()
    assert described.next_run == datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC)
    assert not described.overdue

    switch_in_admin(False)
    described = schedule.describe()
    assert (described.enabled, described.next_run, described.off_by_setting) == (False, None, False)


@with_beat
def test_a_restore_re_checks_the_restored_schedule(settings, drop_tables_made_after_backup):
    out = io.StringIO()
    call_command("backup", "--no-prune", stdout=out)
    backup = out.getvalue().splitlines()[-1]
    PeriodicTask.objects.filter(name=schedule.DAILY).update(last_run_at=timezone.now() - timedelta(days=1))
    settings.BACKUP_DAILY_ENABLED = False  # the setting at the time of the restore, not of the backup
    call_command("restore", backup, "--yes", "--no-safety-backup", stdout=io.StringIO())
    restored = daily()
    assert not restored.enabled
    assert ScheduleSwitch.objects.get(task_name=schedule.DAILY).enabled is False
