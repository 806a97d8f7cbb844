from django.db import models


class Backup(models.Model):
    """The catalog of backups. The files in storage are the truth; this table is rebuilt from them."""

    class Kind(models.TextChoices):
        AUTO = "auto"
        MANUAL = "manual"
        CLI = "cli"
        UPLOADED = "uploaded"
        PRE_RESTORE = "pre_restore"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    class Offsite(models.TextChoices):
        """The off-host copy in the bucket (BACKUP_S3_BUCKET). A copy is claimed on its row, not
        under the one-operation lock: see trusca/backups/operations/offload.py."""

        NONE = "", "not copied"
        PENDING = "pending"
        COPYING = "copying"
        COPIED = "copied"
        FAILED = "failed"

    name = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    created_at = models.DateTimeField(db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    db_revision = models.CharField(max_length=12, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    message = models.TextField(blank=True)
    manifest = models.JSONField(default=dict, blank=True)
    actor = models.CharField(max_length=150, blank=True)
    # Where the backup lives: on this host's disk (BACKUP_ROOT), and in the bucket when ``offsite``
    # is COPIED. A backup found only in the bucket (a new host after a disaster) has local=False.
    local = models.BooleanField(default=True)
    offsite = models.CharField(max_length=16, choices=Offsite.choices, default=Offsite.NONE, blank=True)
    offsite_progress = models.PositiveSmallIntegerField(default=0)
    offsite_message = models.TextField(blank=True)
    offsite_heartbeat_at = models.DateTimeField(null=True, blank=True)
    offsite_at = models.DateTimeField(null=True, blank=True)  # when the copy was completed

    class Meta:
        ordering = ["-created_at", "-id"]
        # The admin sidebar's entry reads "Backup", the page it leads to.
        verbose_name_plural = "Backup"

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING)

    @property
    def location(self) -> str:
        """Where the backup lives: local, s3 or both; empty for one with no files (failed, running)."""
        if self.status != self.Status.SUCCEEDED:
            return ""
        in_bucket = self.offsite == self.Offsite.COPIED
        if self.local:
            return "both" if in_bucket else "local"
        return "s3" if in_bucket else ""


class ScheduleSwitch(models.Model):
    """The value of BACKUP_DAILY_ENABLED last applied to a periodic task. Remembering it lets a
    change of the setting act once while an operator's switch in the admin otherwise stands. A
    row of its own rather than a field of the periodic task, which the admin lets operators edit;
    it lives in the backed-up database, so a restore brings back the pair that belonged together."""

    task_name = models.CharField(max_length=200, unique=True)
    enabled = models.BooleanField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.task_name}: BACKUP_DAILY_ENABLED={'true' if self.enabled else 'false'} applied"
