"""Maintenance mode: while a restore replaces the database and workspace, the web answers 503
(with Retry-After) and workers hold other tasks.

The flag lives in the cache, not the database being replaced, with a lifetime its holder keeps
renewing: a restore that dies cannot leave the portal closed for good.
"""

from django.conf import settings
from django.core.cache import cache
from django.http import HttpResponse
from django.utils import timezone
from django.utils.html import escape

from trusca.backups.problems import problem, wants_json

KEY = "trusca:maintenance"
RETRY_AFTER_SECONDS = 30
# Static files need no database, and the 503 page may use them.
ALLOWED_PREFIXES = ("/static/",)


def enter(reason: str) -> None:
    cache.set(KEY, {"reason": reason, "since": timezone.now().isoformat()}, timeout=settings.BACKUP_STALE_SECONDS)


def renew(reason: str) -> None:
    state = cache.get(KEY) or {"reason": reason, "since": timezone.now().isoformat()}
    cache.set(KEY, state, timeout=settings.BACKUP_STALE_SECONDS)


def leave() -> None:
    cache.delete(KEY)


def active() -> dict | None:
    return cache.get(KEY)


class MaintenanceMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        state = active()
        if state is None or request.path.startswith(ALLOWED_PREFIXES):
            return self.get_response(request)
        detail = f"{state['reason']} (since {state['since']}). Try again shortly."
        if wants_json(request):
            response = problem(503, "maintenance", "Down for maintenance", detail)
        else:
            response = HttpResponse(
                f"<!doctype html><title>Down for maintenance</title><h1>TRUSCA is down for maintenance</h1>"
                f"<p>{escape(detail)}</p>",
                status=503,
                content_type="text/html",
            )
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
