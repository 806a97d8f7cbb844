from django.core.management.base import CommandError

from trusca.backups import operations, store
from trusca.backups.management.base import OperationCommand
from trusca.backups.models import Backup
from trusca.backups.operations.catalog import BUCKET_UNREAD
from trusca.backups.terminal import human_size


class Command(OperationCommand):
    help = (
        "Rebuild the catalog of backups (the admin's list) from where they live: BACKUP_ROOT and, with "
        "BACKUP_S3_BUCKET set, the bucket. On a new host after a disaster this finds the old host's backups "
        "in the bucket; `manage.py restore NAME` then restores one. Lists every backup with where it lives; "
        "exits 1 when the bucket could not be read."
    )
    action = "Sync"

    def handle(self, *args, **options):
        problems = operations.catalog_sync()
        remote = store.remote()
        where = {"local": "local", "s3": "S3", "both": "local + S3"}
        rows = Backup.objects.filter(status=Backup.Status.SUCCEEDED).order_by("created_at", "name").defer("manifest")
        counts = dict.fromkeys(where, 0)
        for row in rows:
            counts[row.location] = counts.get(row.location, 0) + 1
            created = row.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")
            self.stdout.write(
                f"✓ {row.name}  {row.kind}  {created}  {human_size(row.size_bytes)}  {where.get(row.location, '?')}"
            )
        for line in problems:
            self.stdout.write(f"! {line}")
        total = sum(counts.values())
        if remote is None:
            self.stdout.write(f"{total} backup(s) on this host; BACKUP_S3_BUCKET is not set, so no bucket was read")
        else:
            self.stdout.write(
                f"{total} backup(s): {counts['local']} on this host only, {counts['s3']} in {remote.url()} only, "
                f"{counts['both']} in both"
            )
        if any(line.startswith(BUCKET_UNREAD) for line in problems):
            raise CommandError("the bucket could not be read; see above")
