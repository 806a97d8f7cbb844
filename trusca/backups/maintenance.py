"""Maintenance mode: while a restore replaces the database and workspace, the web answers 503
(with Retry-After) and workers hold other tasks.

Two things hold it: a flag in the cache, which every host sees and which expires unless the
restore keeps renewing it; and, from the restore's first step to its last, the restore's
journal beside the workspace, which outlives a killed restore (and a Redis that keeps nothing)
until the next start has finished or undone that restore.
"""

import json
import logging
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

KEY = "trusca:maintenance"
log = logging.getLogger("trusca.backups")
RETRY_AFTER_SECONDS = 30
# Static files need no database, and the 503 page uses them; the restore's status reads only
# the cache, and the 503 page follows it.
ALLOWED_PREFIXES = ("/static/", "/favicon.ico", "/admin/backup/restore/status")


def journal_path() -> Path:
    ws = settings.WORKSPACE_HOST_PATH
    return ws.with_name(f".{ws.name}.restore-journal")


def enter(reason: str) -> None:
    cache.set(KEY, {"reason": reason, "since": timezone.now().isoformat()}, timeout=settings.BACKUP_STALE_SECONDS)


def renew(reason: str) -> None:
    state = cache.get(KEY) or {"reason": reason, "since": timezone.now().isoformat()}
    cache.set(KEY, state, timeout=settings.BACKUP_STALE_SECONDS)


def leave() -> None:
    cache.delete(KEY)


def active() -> dict | None:
    try:
        state = cache.get(KEY)
    except Exception:
        # The cache (Redis) is away: the journal still tells whether a restore holds the portal,
        # and the pages (the health page above all) can say what is wrong.
        log.warning("the cache cannot be read for the maintenance flag; going by the restore journal alone")
        state = None
    if state is not None:
        return state
    try:
        journal = json.loads(journal_path().read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        journal = {}
    if journal.get("holds_maintenance") is False:
        return None  # the portal is back online; the restore only finishes its safety backup
    return {
        "reason": f"A restore from {journal.get('source', 'a backup')} is being finished",
        "since": journal.get("started", ""),
    }


class MaintenanceMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        state = active()
        if state is None or request.path.startswith(ALLOWED_PREFIXES):
            return self.get_response(request)
        # Imported here: the views import the operations, which import this module.
        from trusca.backups.views import maintenance_page

        response = maintenance_page(request, state)
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
