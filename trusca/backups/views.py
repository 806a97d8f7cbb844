"""The admin's Backup page and its small JSON API. Thin: every action is an ``operations`` call.

Who may do what: staff read (the page, a backup's status, the list); superusers run, download
and delete. An HTML page asked for by someone not signed in as staff redirects to the admin
login, like the rest of the admin; every other refusal is an RFC 9457 problem document.
"""

from functools import wraps

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.views import redirect_to_login
from django.http import JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.csrf import csrf_failure as django_csrf_failure
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from trusca.backups import locks, operations, tasks
from trusca.backups.models import Backup
from trusca.backups.problems import problem, wants_json

PAGE_SIZE = 50


def csrf_failure(request, reason: str = ""):
    """CSRF refusals are problem documents too, for the API's clients; pages keep Django's."""
    if wants_json(request) or request.path.startswith("/admin/backup/"):
        return problem(403, "csrf_failed", "CSRF check failed", f"{reason} Reload the page and try again.")
    return django_csrf_failure(request, reason)


def _guard(*, superuser: bool, page: bool = False):
    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            user = request.user
            if not (user.is_active and user.is_staff):
                if page and request.method == "GET":
                    return redirect_to_login(request.get_full_path(), reverse("admin:login"))
                if not user.is_authenticated:
                    return problem(
                        403, "not_authenticated", "Sign in required", "Sign in to the admin as a staff member first."
                    )
                return problem(403, "permission_denied", "Staff only", "Backups are visible to staff members only.")
            if superuser and not user.is_superuser:
                return problem(
                    403,
                    "permission_denied",
                    "Superuser only",
                    "Only a superuser may run, download or delete backups; ask one to do it for you.",
                )
            return view(request, *args, **kwargs)

        return never_cache(wrapped)

    return decorator


def _page(request) -> tuple[list[Backup], int, bool]:
    """One page, newest first, without counting the table: one row more than a page tells
    whether an older page exists, and the cost stays flat however many backups there are."""
    try:
        number = max(1, int(request.GET.get("page", "1")))
    except ValueError:
        number = 1
    start = (number - 1) * PAGE_SIZE
    rows = list(Backup.objects.defer("manifest")[start : start + PAGE_SIZE + 1])
    return rows[:PAGE_SIZE], number, len(rows) > PAGE_SIZE


def _not_found(exc: operations.NotFound) -> JsonResponse:
    return problem(404, "backup_not_found", "No such backup", str(exc))


def _describe(backup: Backup) -> dict:
    return {
        "id": backup.pk,
        "name": backup.name,
        "kind": backup.kind,
        "created": backup.created_at.isoformat(),
        "size": backup.size_bytes,
        "db_revision": backup.db_revision,
        "status": backup.status,
        "progress": backup.progress,
        "message": backup.message,
        "status_url": reverse("backups:status", args=[backup.pk]),
        # Where it lives ("local", "s3", "both"; "" without files) and its off-host copy's state.
        "location": backup.location,
        "offsite": {
            "state": backup.offsite or "none",
            "progress": backup.offsite_progress,
            "message": backup.offsite_message,
            "copied_at": backup.offsite_at.isoformat() if backup.offsite == Backup.Offsite.COPIED else None,
        },
    }


def _render_index(request, *, status: int = 200) -> TemplateResponse:
    # Reading the list is when a run whose worker died gets noticed and marked failed.
    operations.sweep()
    rows, number, has_next = _page(request)
    context = {
        **admin.site.each_context(request),
        "title": "Backup",
        "backups": rows,
        "page": number,
        "has_next": has_next,
        "retention_days": settings.BACKUP_RETENTION_DAYS,
        "bucket": f"s3://{settings.BACKUP_S3_BUCKET}/{settings.BACKUP_S3_PREFIX}" if settings.BACKUP_S3_BUCKET else "",
    }
    return TemplateResponse(request, "backups/index.html", context, status=status)


@_guard(superuser=False, page=True)
@require_GET
def index(request):
    return _render_index(request)


@_guard(superuser=False)
@require_GET
def list_api(request):
    operations.sweep()
    rows, number, has_next = _page(request)
    latest = rows[0] if rows and number == 1 else Backup.objects.defer("manifest").first()
    return JsonResponse(
        {
            "latest": _describe(latest) if latest else None,
            "backups": [_describe(b) for b in rows],
            "page": number,
            "next": f"{reverse('backups:list')}?page={number + 1}" if has_next else None,
        }
    )


@_guard(superuser=True)
@require_POST
def run(request):
    try:
        backup = operations.backup_enqueue(
            kind=Backup.Kind.MANUAL, actor=request.user.get_username(), send=tasks.run_backup.delay, request=request
        )
    except locks.Busy as exc:
        detail = f"Not started: {exc}. One backup or restore runs at a time; try again when it has finished."
        if wants_json(request):
            return problem(409, "operation_in_progress", "Another backup or restore is running", detail)
        messages.error(request, detail)
        return _render_index(request, status=409)
    except operations.OperationFailed as exc:
        detail = str(exc)
        if wants_json(request):
            return problem(503, "queue_unavailable", "The task queue is unavailable", detail)
        messages.error(request, detail)
        return _render_index(request, status=503)
    if wants_json(request):
        return JsonResponse(_describe(backup), status=202)
    messages.success(request, f"Backup {backup.name} is queued; its progress shows below.")
    return redirect("backups:index")


@_guard(superuser=False)
@require_GET
def status(request, pk: int):
    operations.sweep()
    try:
        return JsonResponse(_describe(operations.get_backup(pk)))
    except operations.NotFound as exc:
        return _not_found(exc)


@_guard(superuser=True)
@require_POST
def download(request, pk: int):
    try:
        backup = operations.get_backup(pk)
    except operations.NotFound as exc:
        return _not_found(exc)
    try:
        chunks = operations.backup_download(backup=backup, actor=request.user, request=request)
    except operations.OperationFailed as exc:
        return problem(409, "backup_not_downloadable", "Nothing to download", str(exc))
    response = StreamingHttpResponse(chunks, content_type="application/gzip")
    response["Content-Disposition"] = f'attachment; filename="{backup.name}.tar.gz"'
    return response


@_guard(superuser=True, page=True)
@require_http_methods(["GET", "POST"])
def delete(request, pk: int):
    try:
        backup = operations.get_backup(pk)
    except operations.NotFound as exc:
        return _not_found(exc)
    context = {**admin.site.each_context(request), "title": "Are you sure?", "backup": backup}
    if request.method == "GET":
        return TemplateResponse(request, "backups/delete_confirmation.html", context)
    try:
        operations.backup_delete(backup=backup, actor=request.user, request=request)
    except operations.OperationFailed as exc:
        if wants_json(request):
            return problem(409, "backup_in_use", "Cannot delete this backup now", str(exc))
        messages.error(request, str(exc))
        return TemplateResponse(request, "backups/delete_confirmation.html", context, status=409)
    messages.success(request, f"Deleted backup {backup.name}: its files and its entry are gone.")
    return redirect("backups:index")


@_guard(superuser=True)
@require_POST
def offload(request, pk: int):
    """Copy a backup to the bucket again (a failed copy's Retry, or a first copy)."""
    try:
        backup = operations.get_backup(pk)
    except operations.NotFound as exc:
        return _not_found(exc)
    actor = request.user.get_username()

    def send(name: str) -> None:
        tasks.offload_backup.delay(name, actor)

    try:
        backup = operations.offload_request(backup=backup, actor=request.user, send=send, request=request)
    except operations.OffloadFailed as exc:
        if isinstance(exc, operations.CopyNotQueued):
            status, kind, title = 503, "queue_unavailable", "The task queue is unavailable"
        elif isinstance(exc, operations.CopyInProgress):
            status, kind, title = 409, "offload_in_progress", "This backup is being copied already"
        else:
            status, kind, title = 409, "offload_refused", "This backup cannot be copied to the bucket"
        if wants_json(request):
            return problem(status, kind, title, str(exc))
        messages.error(request, str(exc))
        return _render_index(request, status=status)
    if wants_json(request):
        return JsonResponse(_describe(backup), status=202)
    messages.success(request, f"The copy of {backup.name} to the bucket is queued; its state shows below.")
    return redirect("backups:index")
