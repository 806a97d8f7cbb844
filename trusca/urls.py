from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from trusca.backups import health_views

admin.site.site_header = "TRUSCA administration"
admin.site.site_title = "TRUSCA"

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    # Browsers ask for it on every admin page that names no icon.
    path("favicon.ico", RedirectView.as_view(url=f"{settings.STATIC_URL}backups/favicon.ico", permanent=True)),
    # Before the admin's own URLs, whose catch-all would otherwise answer /admin/backup/ with a 404.
    path("admin/backup/", include("trusca.backups.urls")),
    path("admin/health", health_views.health, name="health"),
    path("admin/", admin.site.urls),
]
