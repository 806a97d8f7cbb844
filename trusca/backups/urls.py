from django.urls import path

from trusca.backups import views

app_name = "backups"

urlpatterns = [
    path("", views.index, name="index"),
    path("list", views.list_api, name="list"),
    path("run", views.run, name="run"),
    path("restore", views.restore, name="restore"),
    # Reachable during maintenance (maintenance.ALLOWED_PREFIXES): the restore's own progress.
    path("restore/status", views.restore_status, name="restore_status"),
    path("restore/done", views.restore_done, name="restore_done"),
    path("restore/keys", views.restore_keys, name="restore_keys"),
    path("<int:pk>/status", views.status, name="status"),
    path("<int:pk>/download", views.download, name="download"),
    path("<int:pk>/restore", views.restore_backup, name="restore_backup"),
    path("<int:pk>/delete", views.delete, name="delete"),
    path("<int:pk>/offload", views.offload, name="offload"),
]
