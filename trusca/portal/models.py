from django.conf import settings
from django.db import models


class Project(models.Model):
    name = models.CharField(max_length=200, unique=True)
    repository_url = models.URLField(max_length=500, blank=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Scan(models.Model):
    """One scan of a project; its files live in <WORKSPACE_HOST_PATH>/<id>/."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="scans")
    revision = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    sbom_format = models.CharField(max_length=32, default="CycloneDX 1.6")
    file_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.project} @ {self.revision[:12]}"

    @property
    def workspace_dir(self):
        return settings.WORKSPACE_HOST_PATH / str(self.pk)


class LicenseFinding(models.Model):
    scan = models.ForeignKey(Scan, on_delete=models.CASCADE, related_name="findings")
    path = models.CharField(max_length=500)
    license_key = models.CharField(max_length=100, db_index=True)
    score = models.FloatField()
    start_line = models.PositiveIntegerField()
    end_line = models.PositiveIntegerField()
    matched_text = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"{self.license_key} in {self.path}"


class AuditEvent(models.Model):
    """Append-only record of who did what; the restore re-inserts the ones a backup predates."""

    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=64, db_index=True)
    target = models.CharField(max_length=255, blank=True)
    detail = models.JSONField(default=dict, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    timestamp = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-timestamp", "-id"]

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.target}"
