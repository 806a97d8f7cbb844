from django.contrib import admin

from trusca.backups.models import Backup


@admin.register(Backup)
class BackupAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "status", "created_at", "size_bytes", "db_revision", "progress"]
    list_filter = ["kind", "status"]
    readonly_fields = [f.name for f in Backup._meta.fields]
    show_full_result_count = False

    def has_add_permission(self, request):
        return False
