"""The schedule box on the Backup page, as a tag: the page's view does not need to know it."""

from django import template
from django.conf import settings
from django.urls import reverse

from trusca.backups import schedule

register = template.Library()


@register.inclusion_tag("backups/schedule_box.html", takes_context=True)
def schedule_box(context) -> dict:
    daily = schedule.describe()
    user = context["request"].user
    can_open = daily is not None and user.has_perm("django_celery_beat.view_periodictask")
    return {
        "daily": daily,
        "change_url": reverse("admin:django_celery_beat_periodictask_change", args=[daily.pk]) if can_open else None,
        "retention_days": settings.BACKUP_RETENTION_DAYS,
    }
