import getpass

from django.core.management.base import CommandError

from trusca.backups import operations
from trusca.backups.management.base import OperationCommand, report_offload
from trusca.backups.terminal import LiveLine


class Command(OperationCommand):
    help = (
        "Copy backups from BACKUP_ROOT to the bucket (BACKUP_S3_BUCKET, under BACKUP_S3_PREFIX): the "
        "backups NAMEd, or with --missing every complete one the bucket lacks (newest first, except those "
        "past BACKUP_S3_RETENTION_DAYS). Each file is checked against its manifest's sha256 on the way and "
        "the manifest goes last, so the bucket lists only whole backups. Then the bucket's retention runs. "
        "Exits 1 when a copy failed, naming why; the backups on this host are untouched either way."
    )
    action = "Copy"
    interrupted_leaves = "the backups on this host are untouched; the unfinished copy is not listed in the bucket"

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", metavar="NAME", help="backup names in BACKUP_ROOT")
        parser.add_argument("--missing", action="store_true", help="copy every backup the bucket lacks")
        parser.add_argument(
            "--no-prune", action="store_true", help="keep backups in the bucket past BACKUP_S3_RETENTION_DAYS"
        )

    def handle(self, *args, names, missing, no_prune, **options):
        if not names and not missing:
            raise CommandError("name the backups to copy, or pass --missing (see --help)")
        actor = f"cli:{getpass.getuser()}"
        live = LiveLine(label="copying")
        report = operations.OffloadReport()
        try:
            remote = operations.bucket()
            for name in names:
                try:
                    copy = operations.offload_backup(name=name, actor=actor, reporter=live, remote=remote)
                    report.copied.append(copy)
                except operations.OperationFailed as exc:
                    report.failed[name] = str(exc)
            if missing:
                operations.offload_missing(actor=actor, reporter=live, report=report, remote=remote)
            if not no_prune and not report.failed:
                try:
                    report.pruned = operations.offsite_prune()
                except operations.OperationFailed as exc:
                    report.prune_error = str(exc)
        except operations.OperationFailed as exc:
            raise CommandError(f"Copy failed: {exc}") from None
        finally:
            live.clear()
        report_offload(self, report)
        if report.failed:
            raise CommandError(f"{len(report.failed)} cop{'y' if len(report.failed) == 1 else 'ies'} failed")
        if not report.copied:
            self.stdout.write(f"Nothing to copy: the bucket holds every backup it should ({remote.url()})")
        else:
            self.stdout.write(f"Copy complete: {remote.url()}")
