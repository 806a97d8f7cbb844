"""Where backups live: the local disk always, S3 as well when BACKUP_S3_BUCKET is set."""

from django.conf import settings

from trusca.backups.store.base import Store, StoredBackup, Upload
from trusca.backups.store.local import DirectoryStore, LocalStore, check_name

__all__ = ["DirectoryStore", "LocalStore", "Store", "StoredBackup", "Upload", "check_name", "local", "remote"]


def local() -> LocalStore:
    return LocalStore(settings.BACKUP_ROOT)


def remote():
    """The bucket (an ``s3.S3Store``), or None when BACKUP_S3_BUCKET is unset. boto3 is imported
    only then: it costs every manage.py command 0.2 s of start-up."""
    if not settings.BACKUP_S3_BUCKET:
        return None
    from trusca.backups.store import s3

    return s3.configured()
