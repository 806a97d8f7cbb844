"""/admin/health: for staff in the admin, and for a monitor presenting the health token.

The token path never touches the session (a restore flushes every session, and a database that
is down must still be reported), so a monitor reads the page whatever state the portal is in.
Failing answers 503, so a monitor that only looks at status codes notices.
"""

import hmac

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.http import JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from trusca.backups import health as checks
from trusca.backups.problems import problem, wants_json


@never_cache
@require_GET
def health(request):
    header = request.headers.get("Authorization", "")
    # Other schemes (a proxy's Basic sign-in in front of the admin) leave it to the session.
    if header[:7].lower() == "bearer ":
        if not _token_matches(header[7:]):
            return _unauthorized("The Authorization header does not carry the health token (BACKUP_HEALTH_TOKEN).")
        context = {"site_header": admin.site.site_header, "site_title": admin.site.site_title, "has_permission": False}
    else:
        user = request.user
        if not (user.is_active and user.is_staff):
            if not wants_json(request):
                return redirect_to_login(request.get_full_path(), reverse("admin:login"))
            return _unauthorized("Sign in to the admin as staff, or send Authorization: Bearer <BACKUP_HEALTH_TOKEN>.")
        context = admin.site.each_context(request)
    report = checks.run_checks()
    status = 503 if report.status == checks.FAILING else 200
    if wants_json(request):
        return JsonResponse(report.as_json(), status=status)
    return TemplateResponse(
        request, "backups/health.html", {**context, "title": "Health", "report": report}, status=status
    )


def _token_matches(given: str) -> bool:
    expected = settings.BACKUP_HEALTH_TOKEN
    # compare_digest takes as long whatever the first differing byte: the token cannot be
    # guessed one character at a time from response times.
    return bool(expected) and hmac.compare_digest(given.strip().encode(), expected.encode())


def _unauthorized(detail: str):
    response = problem(401, "not_authenticated", "Health token or staff sign-in required", detail)
    response["WWW-Authenticate"] = 'Bearer realm="trusca-health"'
    return response
