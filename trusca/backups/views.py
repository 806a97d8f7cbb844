"""The admin's Backup page and its small JSON API. Thin: every action is an ``operations`` call.

Who may do what: staff read (the page, a backup's status, the list); superusers run, download,
delete and restore. An HTML page asked for by someone not signed in as staff redirects to the
admin login, like the rest of the admin; every other refusal is an RFC 9457 problem document to
a script and, to a browser, the admin's page with a message.
"""

import io
import json
import re
from functools import wraps
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.views import redirect_to_login
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import redirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.timesince import timesince
from django.views.csrf import csrf_failure as django_csrf_failure
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from gunicorn.http.body import LengthReader

from trusca.backups import locks, maintenance, manifest, operations, tasks
from trusca.backups.models import Backup
from trusca.backups.operations.lifecycle import Cancelled
from trusca.backups.operations.restore_jobs import JOB_TTL_SECONDS, SUCCEEDED
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


def _browser(request) -> bool:
    """A person's browser navigating (it asks for HTML), not a script or the page's own fetch."""
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "json" not in accept


def _admin_context(request, **extra) -> dict:
    context = {**admin.site.each_context(request), **extra}
    # The sidebar's Backup entry points at this page, so the admin marks it current here.
    for app in context.get("available_apps", []):
        for model in app["models"]:
            if model["object_name"] == Backup.__name__:
                model["admin_url"] = reverse("backups:index")
    return context


def _not_found(request, exc: operations.NotFound):
    if _browser(request):
        context = _admin_context(request, title="Page not found", detail=str(exc))
        return TemplateResponse(request, "backups/404.html", context, status=404)
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
    context = _admin_context(
        request,
        title="Backup",
        backups=rows,
        page=number,
        has_next=has_next,
        retention_days=settings.BACKUP_RETENTION_DAYS,
        bucket=f"s3://{settings.BACKUP_S3_BUCKET}/{settings.BACKUP_S3_PREFIX}" if settings.BACKUP_S3_BUCKET else "",
    )
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
        return _not_found(request, exc)


@_guard(superuser=True)
@require_GET
def download(request, pk: int):
    """A plain link (a new tab, or curl with a session cookie). Reading changes nothing but the
    audit log; a cross-site request, which could only mean someone else's page triggering it,
    is refused so that log stays the superuser's own doing."""
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return problem(
            403, "cross_site_download", "Download from the admin", "Open the Download link from the Backup page."
        )
    try:
        backup = operations.get_backup(pk)
    except operations.NotFound as exc:
        return _not_found(request, exc)
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
        return _not_found(request, exc)
    context = _admin_context(request, title="Are you sure?", backup=backup)
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
        return _not_found(request, exc)
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


# Restore ----------------------------------------------------------------------------------------
#
# The request carries the bundle as its raw body (application/octet-stream or application/gzip),
# never as a form: Django's CSRF middleware reads request.POST, which would parse a multipart
# upload into temporary files before any check. So these views are exempt from the middleware
# and make the CSRF check themselves (token in X-CSRFToken), in this order and before a byte of
# the body is read: superuser (403), CSRF (403), X-Confirm-Restore: yes (412), the typed word in
# ``confirmation`` (400), the size (413), another backup or restore (409). The page first sends
# the same request without a body and with ``check=yes&size=N``, so a refusal arrives before an
# upload instead of after it.

CONFIRM_HEADER = "X-Confirm-Restore"
# The token of the decryption keys held for this restore (restore_keys), when it needs any.
KEYS_HEADER = "X-Restore-Keys"
CONFIRMATION = "restore"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JOB_COOKIE = "trusca_restore"
_UNSAFE_LABEL = re.compile(r"[^A-Za-z0-9._+-]")
# (exception, status, problem type, title); the first that matches answers, so the specific first.
_REFUSALS = (
    (locks.Busy, 409, "operation_in_progress", "Another backup or restore is running"),
    (Cancelled, 409, "operation_in_progress", "The restore lost its turn"),
    (operations.UploadTooLarge, 413, "upload_too_large", "The bundle is too large for the admin"),
    (operations.NotEnoughSpace, 507, "insufficient_storage", "Not enough disk space"),
    (operations.UploadIncomplete, 400, "upload_incomplete", "The upload did not arrive whole"),
    (operations.KeysExpired, 400, "restore_keys_expired", "Give the key or passphrase again"),
    (operations.RestoreUntrusted, 422, "backup_not_trusted", "Not signed by this installation"),
    (operations.RestoreRefused, 422, "restore_refused", "This backup cannot be restored"),
    (operations.QueueUnavailable, 503, "queue_unavailable", "The task queue is unavailable"),
    (operations.OperationFailed, 500, "restore_not_started", "The restore could not be started"),
)


def _refuse(request, status: int, kind: str, title: str, detail: str):
    if _browser(request):
        messages.error(request, detail)
        return _restore_page(request, request.resolver_match.kwargs.get("pk"), status=status)
    return problem(status, kind, title, detail)


def _refusal(request, exc: operations.OperationFailed):
    status, kind, title = next((s, k, t) for cls, s, k, t in _REFUSALS if isinstance(exc, cls))
    detail = str(exc)
    if isinstance(exc, locks.Busy):
        detail = f"Not started: {exc}. One backup or restore runs at a time; try again when it has finished."
    return _refuse(request, status, kind, title, detail)


def _gates(request, *, upload: bool):
    """The checks that need no byte of the body, in the documented order after the superuser's."""
    if upload and request.content_type in FORM_TYPES:
        return _refuse(
            request,
            415,
            "unsupported_media_type",
            "Send the bundle as the request body",
            "An upload is not a form: send the bundle itself as the request body with Content-Type: "
            "application/octet-stream (curl -X POST -T bundle.tar.gz -H 'Content-Type: application/octet-stream'). "
            "Nothing was changed.",
        )
    if request.content_type == "multipart/form-data":
        return _refuse(
            request,
            415,
            "unsupported_media_type",
            "No multipart form",
            "Restoring a listed backup takes no file: send the confirmation as a query parameter or an "
            "application/x-www-form-urlencoded field. Nothing was changed.",
        )
    refused = CsrfViewMiddleware(lambda request: None).process_view(request, None, (), {})
    if refused is not None:
        return refused
    header = request.headers.get(CONFIRM_HEADER)
    if header != "yes":
        said = "The request has no X-Confirm-Restore header" if header is None else f"X-Confirm-Restore is {header!r}"
        return _refuse(
            request,
            412,
            "restore_confirmation_required",
            "Restore confirmation header missing",
            f"{said}: a restore needs X-Confirm-Restore: yes, exactly, besides the typed confirmation (the admin's "
            "Restore button sends both). Nothing was changed.",
        )
    # The body is the bundle in an upload; only a listed backup's restore may be a small form.
    word = request.GET.get("confirmation") or ("" if upload else request.POST.get("confirmation", ""))
    if word != CONFIRMATION:
        said = f"it was {word!r}" if word else "it is missing"
        return _refuse(
            request,
            400,
            "restore_confirmation_mismatch",
            "Type restore to confirm",
            f"The confirmation must be the word restore, typed exactly (lower case, no spaces); {said}. "
            "Nothing was changed.",
        )
    return None


def _trusts_unsigned(request, *, upload: bool) -> bool:
    return (request.GET.get("trust_unsigned") or ("" if upload else request.POST.get("trust_unsigned", ""))) == "yes"


def _label(filename: str) -> str:
    """The uploaded file's name, for messages and the audit log: a name, never a path or markup."""
    name = _UNSAFE_LABEL.sub("_", filename.replace("\\", "/").rsplit("/", 1)[-1])[:100]
    return name or "the uploaded bundle"


def _describe_job(job: operations.RestoreJob) -> dict:
    query = f"?{urlencode({'id': job.id})}"
    return {
        "id": job.id,
        "backup": job.backup,
        "state": job.state,
        "step": job.step,
        "percent": job.percent,
        "steps": job.steps,
        "error": job.error,
        "safety_backup": job.safety_backup,
        "notes": job.notes,
        "taken_at": job.taken_at,
        "maintenance": job.maintenance,
        "status_url": reverse("backups:restore_status") + query,
        "done_url": reverse("backups:restore_done") + query,
    }


def _accepted(request, job: operations.RestoreJob) -> JsonResponse:
    response = JsonResponse(_describe_job(job), status=202)
    # The page that follows the restore (the maintenance page, after the sessions are gone)
    # finds it by this cookie; the job's id is the capability, unguessable.
    response.set_cookie(
        JOB_COOKIE,
        job.id,
        max_age=JOB_TTL_SECONDS,
        path="/admin/",
        httponly=True,
        samesite="Lax",
        secure=request.is_secure(),
    )
    return response


def _database_label() -> str:
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"the SQLite database {db['NAME']}"
    return f"the PostgreSQL database “{db['NAME']}” on {db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}"


def _restore_page(request, pk: int | None, *, status: int = 200) -> TemplateResponse:
    backup = signature = None
    if pk is not None:
        try:
            backup = operations.get_backup(pk)
        except operations.NotFound as exc:
            return _not_found(request, exc)
        signature = operations.signature_of(backup.name) if backup.status == Backup.Status.SUCCEEDED else None
        if backup.status != Backup.Status.SUCCEEDED and request.method == "GET":
            messages.error(request, f"{backup.name} is {backup.status}: only a complete backup can be restored.")
            status = 409
    context = _admin_context(
        request,
        title=f"Restore {backup.name}" if backup else "Upload and restore",
        backup=backup,
        signature=signature,
        trusted=signature is not None and manifest.trusted(signature),
        database=_database_label(),
        workspace=settings.WORKSPACE_HOST_PATH,
        max_bytes=settings.BACKUP_UPLOAD_MAX_BYTES,
        action=request.path,
        status_url=reverse("backups:restore_status"),
    )
    return TemplateResponse(request, "backups/restore.html", context, status=status)


def _upload_body(request, length: int | None):
    """The upload's body as a stream. Behind gunicorn with a Content-Length, read from the
    connection's socket itself into the reader's buffer: gunicorn's body reader hands each read out
    as new bytes through a BytesIO, and with Django's stream on top that cost the worker 2 to 3
    CPU-s per GB, most of an upload's (measured with benchmarks/upload_bench.py). Anywhere else
    (another server, a body gunicorn already started reading, a chunked body) through the request."""
    if length is None:
        return request.environ["wsgi.input"]
    body = request.environ.get("wsgi.input")
    reader = getattr(body, "reader", None)
    sock = request.environ.get("gunicorn.socket")
    if sock is None or not isinstance(reader, LengthReader) or reader.length != length or body.buf.tell():
        return request
    return _SocketBody(sock, reader, length)


class _SocketBody(io.RawIOBase):
    """A body of known length from gunicorn's socket: first what gunicorn read along with the
    headers, then ``recv_into`` the caller's buffer. gunicorn's reader is told what is left, so
    that it drains exactly that before reading the connection's next request."""

    def __init__(self, sock, reader: LengthReader, length: int):
        self._sock, self._reader, self._left = sock, reader, length
        held = reader.unreader.take_buffered()
        if len(held) > length:  # the client's next request, sent before our answer
            reader.unreader.unread(held[length:])
        self._held = memoryview(held[:length])

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[: self._left]
        if not view:
            return 0
        if self._held:
            count = min(len(view), len(self._held))
            view[:count], self._held = self._held[:count], self._held[count:]
        else:
            count = self._sock.recv_into(view)  # 0: the client went away
        self._left -= count
        self._reader.length = self._left
        return count


@csrf_exempt  # checked in _gates: after the superuser check, without reading the body
@_guard(superuser=True, page=True)
@require_http_methods(["GET", "POST"])
def restore(request):
    if request.method == "GET":
        return _restore_page(request, None)
    if (refused := _gates(request, upload=True)) is not None:
        return refused
    # ?check=yes&size=N: the page asks whether an upload of N bytes would be taken, before sending it.
    checking = request.GET.get("check") == "yes"
    announced = request.GET.get("size", "") if checking else request.META.get("CONTENT_LENGTH") or ""
    if announced and not (announced.isascii() and announced.isdigit()):
        return _refuse(request, 400, "bad_request", "Bad length", f"{announced!r} is not a length in bytes.")
    length = int(announced) if announced else None
    # Without a length the body must be chunked, and only a server that ends it (gunicorn) says so.
    if length is None and not checking and not request.environ.get("wsgi.input_terminated"):
        return _refuse(
            request, 411, "length_required", "Content-Length required", "Send the bundle with a Content-Length."
        )
    try:
        operations.upload_check(length=length)
        if checking:
            if (holder := locks.current()) is not None:
                raise locks.Busy(holder)
            return HttpResponse(status=204)
        job = operations.restore_upload(
            stream=_upload_body(request, length),
            length=length,
            label=_label(request.GET.get("filename", "")),
            actor=request.user.get_username(),
            trust_unsigned=_trusts_unsigned(request, upload=True),
            send=tasks.run_restore.delay,
            keys_token=request.headers.get(KEYS_HEADER, ""),
            request=request,
        )
    except operations.OperationFailed as exc:
        return _refusal(request, exc)
    return _accepted(request, job)


@csrf_exempt  # checked in _gates: after the superuser check
@_guard(superuser=True, page=True)
@require_http_methods(["GET", "POST"])
def restore_backup(request, pk: int):
    if request.method == "GET":
        return _restore_page(request, pk)
    if (refused := _gates(request, upload=False)) is not None:
        return refused
    try:
        backup = operations.get_backup(pk)
    except operations.NotFound as exc:
        return _not_found(request, exc)
    if backup.status != Backup.Status.SUCCEEDED:
        return _refuse(
            request,
            409,
            "backup_not_restorable",
            "Only a complete backup can be restored",
            f"{backup.name} is {backup.status}: only a complete backup can be restored. Nothing was changed.",
        )
    try:
        job = operations.restore_enqueue(
            backup=backup.name,
            actor=request.user.get_username(),
            trust_unsigned=_trusts_unsigned(request, upload=False),
            send=tasks.run_restore.delay,
            keys_token=request.headers.get(KEYS_HEADER, ""),
            request=request,
        )
    except operations.OperationFailed as exc:
        return _refusal(request, exc)
    return _accepted(request, job)


@_guard(superuser=True)
@require_POST
def restore_keys(request):
    """Hold a private key and its passphrase, or a backup's passphrase, for one restore: the
    restore runs on a worker, so they wait in the cache under the token returned (15 minutes at
    most, removed when the restore ends). JSON in, never a form: nothing of it is logged."""
    try:
        given = json.loads(request.body or b"{}")
        token = operations.hold_keys(
            secret_key=str(given.get("secret_key") or ""),
            key_passphrase=str(given.get("key_passphrase") or ""),
            passphrase=str(given.get("passphrase") or ""),
        )
    except (ValueError, AttributeError):
        return problem(400, "bad_request", "Not JSON", "Send the keys as a JSON object. Nothing was changed.")
    except operations.OperationFailed as exc:
        return problem(400, "bad_request", "No usable key", str(exc))
    return JsonResponse({"token": token}, status=201)


def _job(request) -> operations.RestoreJob | None:
    return operations.restore_job(request.GET.get("id") or request.COOKIES.get(JOB_COOKIE, ""))


@never_cache
@require_GET
def restore_status(request):
    """The one page maintenance mode lets through: it reads the cache only (never the session,
    the user or the database the restore holds), and answers whoever holds the job's id."""
    job = _job(request)
    if job is None:
        return problem(404, "restore_not_found", "No such restore", "There is no restore with that id to follow.")
    return JsonResponse(_describe_job(job))


@never_cache
@require_GET
def restore_done(request):
    """Where the page goes when the restore has ended: after a success every session is gone, so
    the operator is sent to sign in, with a message (in the messages cookie, not the database)
    saying whose credentials now work."""
    job = _job(request)
    if job is None or job.active:
        return redirect("backups:index")
    taken = parse_datetime(job.taken_at)
    if job.state == SUCCEEDED:
        undo = (
            f" The state before the restore was kept as {job.safety_backup}: restore it from the Backup page to undo."
            if job.safety_backup
            else ""
        )
        messages.success(
            request,
            f"The restore of {job.backup} completed: the portal now holds its state of {taken:%Y-%m-%d %H:%M} UTC. "
            f"Every session was ended: sign in with the credentials of that time.{undo} {' '.join(job.notes)}".strip(),
        )
        response = redirect(f"{reverse('admin:login')}?{urlencode({'next': reverse('backups:index')})}")
    else:
        messages.error(request, f"The restore of {job.backup} failed: {job.error.rstrip('.')}.")
        response = redirect("backups:index")
    response.delete_cookie(JOB_COOKIE, path="/admin/")
    return response


def _ago(when) -> str:
    now = timezone.now()
    return "just now" if (now - when).total_seconds() < 60 else f"{timesince(when, now)} ago"


def maintenance_page(request, state: dict) -> HttpResponse:
    """What every request gets while a restore holds the portal (maintenance.py decides when):
    the restore's step and progress, from the cache. Rendered without the request, so that no
    context processor reaches for the session or the user in the database being replaced."""
    status = operations.restore_status() or {}
    running = status.get("state") == "running"
    step, percent = (status.get("step"), status.get("percent")) if running else (None, None)
    detail = f"{state['reason']} (since {state['since']}). " + (f"Now: {step} ({percent}%). " if step else "")
    if not _browser(request):
        return problem(503, "maintenance", "Down for maintenance", detail + "Try again shortly.")
    since = parse_datetime(state.get("since") or "")
    context = {
        "reason": state["reason"],
        "since": since,
        "ago": _ago(since) if since else "",
        "step": step,
        "percent": percent,
        "retry": maintenance.RETRY_AFTER_SECONDS,
        "status_url": reverse("backups:restore_status"),
    }
    return HttpResponse(render_to_string("backups/maintenance.html", context), status=503)
