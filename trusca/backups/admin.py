from django.contrib import admin
from django.shortcuts import redirect

from trusca.backups.models import Backup


@admin.register(Backup)
class BackupAdmin(admin.ModelAdmin):
    """The sidebar's way to the Backup page, and a read-only view of one row (its manifest).

    Backups are made, downloaded and deleted on that page, through the operations that also
    remove files and record audit events; the generic add, change and delete views would do
    neither, so they are closed."""

    readonly_fields = [f.name for f in Backup._meta.fields]

    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_staff

    def has_view_permission(self, request, obj=None):
        return self.has_module_permission(request)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        return redirect("backups:index")
