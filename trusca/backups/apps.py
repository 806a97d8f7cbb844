import os
import shutil

from django.apps import AppConfig
from django.core import checks
from django.db.models.signals import post_migrate

from trusca.backups.crypto import check_encryption


class BackupsConfig(AppConfig):
    name = "trusca.backups"
    label = "backups"
    verbose_name = "Backups"

    def ready(self):
        checks.register(check_paths, "backups")
        checks.register(check_tools, "backups")
        checks.register(check_encryption, "backups")

        from trusca.backups import database

        checks.register(database.check_restricted_psql, "backups")
        checks.register(database.check_database_role, "backups", checks.Tags.database)
        post_migrate.connect(create_schedule, sender=self)


def create_schedule(using, **kwargs):
    """The periodic tasks are data in django-celery-beat's tables that operators edit, so they
    are created when missing after every migrate rather than by a data migration, which would run
    once and never bring back a deleted one."""
    from trusca.backups import schedule

    schedule.ensure(using)


def check_paths(app_configs=None, **kwargs):
    from django.conf import settings

    errors = []
    root, ws = settings.BACKUP_ROOT, settings.WORKSPACE_HOST_PATH
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        errors.append(
            checks.Error(
                f"BACKUP_ROOT {root} cannot be created or written",
                hint="Point BACKUP_ROOT at a writable directory.",
                id="backups.E001",
            )
        )
    if ws.exists() and not ws.is_dir():
        errors.append(
            checks.Error(
                f"WORKSPACE_HOST_PATH {ws} is not a directory",
                hint="Point WORKSPACE_HOST_PATH at the workspace directory.",
                id="backups.E002",
            )
        )
    if root.resolve().is_relative_to(ws.resolve()):
        errors.append(
            checks.Error(
                f"BACKUP_ROOT {root} lies inside WORKSPACE_HOST_PATH {ws}",
                hint="Every backup would contain the previous ones; move BACKUP_ROOT out.",
                id="backups.E003",
            )
        )
    return errors


def check_tools(app_configs=None, **kwargs):
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        return []
    return [
        checks.Error(
            f"{tool} is not installed; PostgreSQL backups and restores need it",
            hint="Install the PostgreSQL client tools matching the server (postgresql-client).",
            id="backups.E004",
        )
        for tool in ("pg_dump", "psql")
        if shutil.which(tool) is None
    ]
