from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from trusca.backups import operations
from trusca.backups.terminal import display_path


class Command(BaseCommand):
    help = (
        "Check a backup without restoring it: PATH is a backup directory (either naming format) "
        "or a bundle .tar.gz. The manifest must decode with every key, each file's size and sha256 "
        "must match, each gzip stream must be intact to its end and the workspace tar must list "
        "with only safe members. Exits 0 when all hold, 1 naming the first fault otherwise."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", help="backup directory or bundle file")

    def handle(self, *args, path, **options):
        target = Path(path)
        try:
            report = operations.backup_verify(path=target)
        except operations.OperationFailed as exc:
            raise CommandError(f"{display_path(target)} is not a good backup: {exc}") from None
        files = report.manifest["files"]
        for name, entry in files.items():
            self.stdout.write(f"✓ {name}: {entry['size']} bytes, sha256 matches, gzip stream intact")
        if "workspace.tar.gz" in files:
            self.stdout.write(f"✓ workspace.tar.gz lists {report.members} members, all safe to extract")
        self.stdout.write(
            f"✓ manifest: {report.manifest['kind']} backup of {report.manifest['timestamp']}, "
            f"db revision {report.manifest['db_revision']}"
        )
        self.stdout.write(f"Backup OK: {display_path(target)}")
