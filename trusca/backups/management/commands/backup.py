import getpass

from django.conf import settings
from django.core.management.base import CommandError

from trusca.backups import locks, operations, store
from trusca.backups.errors import Interrupted
from trusca.backups.management.base import OperationCommand, report_offload
from trusca.backups.terminal import LiveLine, display_path, human_size


class Command(OperationCommand):
    help = (
        "Back up the database and the workspace into BACKUP_ROOT/YYYY-MM-DD-HHMMSS/ "
        "(postgres.sql.gz or sqlite.db.gz, workspace.tar.gz, and manifest.json signed with "
        "BACKUP_SIGNING_KEY), then prune auto, cli and pre-restore backups older than "
        "BACKUP_RETENTION_DAYS. With BACKUP_S3_BUCKET set, then copy it to the bucket, with any other "
        "backup missing there, and apply the bucket's retention (BACKUP_S3_RETENTION_DAYS); a copy that "
        "fails is reported on stderr and never fails the backup. The last line printed is the backup's path."
    )
    action = "Backup"
    interrupted_leaves = "the partial backup was removed and nothing else was changed"

    def add_arguments(self, parser):
        parser.add_argument(
            "--bundle",
            action="store_true",
            help="also write BACKUP_ROOT/<name>.tar.gz, the single file to copy off the host or upload to restore",
        )
        parser.add_argument(
            "--no-prune",
            action="store_true",
            help="keep backups past BACKUP_RETENTION_DAYS (and, in the bucket, past BACKUP_S3_RETENTION_DAYS)",
        )
        parser.add_argument(
            "--no-offload",
            action="store_true",
            help="do not copy it to the bucket (BACKUP_S3_BUCKET) now; `manage.py offload` or the next backup does",
        )

    def handle(self, *args, bundle, no_prune, no_offload, **options):
        live = LiveLine(label="backing up", announce=lambda where: self.stdout.write(f"Backup → {display_path(where)}"))
        try:
            outcome = operations.backup_create(
                kind="cli",
                actor=f"cli:{getpass.getuser()}",
                bundle_too=bundle,
                prune=not no_prune,
                reporter=live,
            )
        except locks.Busy as exc:
            raise CommandError(f"{exc}; nothing was done. Wait for it to finish, then run the backup again.") from None
        except operations.OperationFailed as exc:
            raise CommandError(f"Backup failed: {exc}") from None
        finally:
            live.clear()
        path = display_path(settings.BACKUP_ROOT / outcome.backup.name)
        for name, size in outcome.files.items():
            if name != "manifest.json":
                self.stdout.write(f"✓ wrote {path}/{name} ({human_size(size)})")
        self.stdout.write(f"✓ wrote {path}/manifest.json (db revision = {outcome.db_revision})")
        if outcome.bundle_path:
            size = human_size(outcome.bundle_path.stat().st_size)
            self.stdout.write(f"✓ wrote {display_path(outcome.bundle_path)} ({size})")
        for name in outcome.pruned:
            self.stdout.write(
                f"✓ pruned {display_path(settings.BACKUP_ROOT / name)} "
                f"(older than {settings.BACKUP_RETENTION_DAYS} days)"
            )
        if not no_offload and store.remote() is not None:
            self._offload(outcome.backup.name, path, prune=not no_prune)
        if outcome.bundle_error:
            self.stdout.write(f"Backup complete: {path}")
            raise CommandError(f"Bundle failed: {outcome.bundle_error}; the backup itself is good: {path}")
        self.stdout.write("Backup complete")
        self.stdout.write(path)

    def _offload(self, name: str, path: str, *, prune: bool) -> None:
        live = LiveLine(label="copying")
        try:
            report = operations.offload_run(name=name, actor=f"cli:{getpass.getuser()}", reporter=live, prune=prune)
        except Interrupted as exc:
            live.clear()
            self.stderr.write(
                f"\nCopy to S3 interrupted: the backup itself is good: {path}. `manage.py offload {name}` copies it."
            )
            raise SystemExit(exc.exit_code) from None
        finally:
            live.clear()
        report_offload(self, report)
