from django.contrib import admin

from trusca.portal.models import AuditEvent, LicenseFinding, Project, Scan


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "repository_url", "created_at"]
    search_fields = ["name"]


@admin.register(Scan)
class ScanAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "revision", "status", "file_count", "created_at"]
    list_filter = ["status"]
    list_select_related = ["project"]
    raw_id_fields = ["project"]
    show_full_result_count = False


@admin.register(LicenseFinding)
class LicenseFindingAdmin(admin.ModelAdmin):
    list_display = ["license_key", "path", "score", "scan"]
    list_select_related = ["scan__project"]
    raw_id_fields = ["scan"]
    search_fields = ["license_key"]
    show_full_result_count = False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: an audit log that an admin could edit would prove nothing."""

    list_display = ["timestamp", "actor", "action", "target", "ip"]
    list_filter = ["action"]
    search_fields = ["actor", "target"]
    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
