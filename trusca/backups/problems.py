"""RFC 9457 problem documents, the one shape every API error of the backups takes."""

from django.http import JsonResponse


def problem(status: int, kind: str, title: str, detail: str) -> JsonResponse:
    return JsonResponse(
        {"type": f"urn:trustedoss:problem:{kind}", "title": title, "status": status, "detail": detail},
        status=status,
        content_type="application/problem+json",
    )


def wants_json(request) -> bool:
    return "json" in request.headers.get("Accept", "")
