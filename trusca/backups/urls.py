from django.urls import path

from trusca.backups import views

app_name = "backups"

urlpatterns = [
    path("", views.index, name="index"),
    path("list", views.list_api, name="list"),
    path("run", views.run, name="run"),
    path("<int:pk>/status", views.status, name="status"),
    path("<int:pk>/download", views.download, name="download"),
    path("<int:pk>/delete", views.delete, name="delete"),
    path("<int:pk>/offload", views.offload, name="offload"),
]
