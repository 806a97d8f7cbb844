"""Where backups live: the local disk always, S3 as well when BACKUP_S3_BUCKET is set."""

from django.conf import settings

from trusca.backups.store.base import Store, StoredBackup, Upload
from trusca.backups.store.local import LocalStore, check_name

__all__ = ["LocalStore", "Store", "StoredBackup", "Upload", "check_name", "local"]


def local() -> LocalStore:
    return LocalStore(settings.BACKUP_ROOT)
