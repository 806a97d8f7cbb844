"""The workflows. The admin, the views, the Celery tasks and the management commands all call
these functions and nothing else: no workflow is written twice.

- ``lifecycle``: the lock, heartbeat, cancellation and signals every run shares;
- ``backup``: taking a backup, here or queued for a worker;
- ``verify``: checking one without restoring it; ``sources``: what an operator names as one;
- ``restore``: the restore protocol, its journal and the recovery after a crash;
- ``restore_jobs``: a restore asked for from the admin (a listed backup or an upload), queued;
- ``catalog``: the Backup table, retention (on this host and in the bucket), delete and download;
- ``offload``: the off-host copy into the bucket, and its retries;
- ``sweep``: what dead processes left behind.
"""

from trusca.backups.errors import Interrupted, NotFound, OperationFailed
from trusca.backups.operations.backup import (
    BackupFailed,
    BackupOutcome,
    backup_create,
    backup_enqueue,
    backup_run_queued,
)
from trusca.backups.operations.catalog import (
    backup_delete,
    backup_download,
    backup_prune,
    catalog_sync,
    get_backup,
    offsite_prune,
)
from trusca.backups.operations.offload import (
    CopyInProgress,
    CopyNotQueued,
    OffloadFailed,
    OffloadOutcome,
    OffloadReport,
    bucket,
    offload_backup,
    offload_missing,
    offload_request,
    offload_run,
)
from trusca.backups.operations.restore import (
    RestoreFailed,
    RestoreOutcome,
    RestorePlan,
    RestoreRefused,
    restore_prepare,
    restore_recover,
    restore_run,
    restore_status,
)
from trusca.backups.operations.restore_jobs import (
    KeysExpired,
    NotEnoughSpace,
    QueueUnavailable,
    RestoreJob,
    RestoreUntrusted,
    UploadIncomplete,
    UploadTooLarge,
    forget_keys,
    hold_keys,
    restore_enqueue,
    restore_job,
    restore_run_queued,
    restore_upload,
    signature_of,
    upload_check,
)
from trusca.backups.operations.sources import Source, SourceError, decryption_keys, open_source
from trusca.backups.operations.sweep import sweep
from trusca.backups.operations.verify import Untrusted, VerifyFailed, VerifyReport, backup_sign, backup_verify

__all__ = [
    "KeysExpired",
    "BackupFailed",
    "BackupOutcome",
    "CopyInProgress",
    "CopyNotQueued",
    "Interrupted",
    "NotEnoughSpace",
    "NotFound",
    "OffloadFailed",
    "OffloadOutcome",
    "OffloadReport",
    "OperationFailed",
    "QueueUnavailable",
    "RestoreFailed",
    "RestoreJob",
    "RestoreOutcome",
    "RestorePlan",
    "RestoreRefused",
    "RestoreUntrusted",
    "Source",
    "SourceError",
    "Untrusted",
    "UploadIncomplete",
    "UploadTooLarge",
    "VerifyFailed",
    "VerifyReport",
    "backup_create",
    "backup_delete",
    "backup_download",
    "backup_enqueue",
    "backup_prune",
    "backup_run_queued",
    "backup_sign",
    "backup_verify",
    "bucket",
    "catalog_sync",
    "decryption_keys",
    "get_backup",
    "offload_backup",
    "offload_missing",
    "offload_request",
    "offload_run",
    "offsite_prune",
    "open_source",
    "forget_keys",
    "hold_keys",
    "restore_enqueue",
    "restore_job",
    "restore_prepare",
    "restore_recover",
    "restore_run",
    "restore_run_queued",
    "restore_status",
    "restore_upload",
    "signature_of",
    "sweep",
    "upload_check",
]
