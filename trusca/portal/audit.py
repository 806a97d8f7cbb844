from django.utils import timezone

from trusca.portal.models import AuditEvent


def client_ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR") if request is not None else None


def record(*, actor, action: str, target: str = "", detail: dict | None = None, request=None) -> AuditEvent:
    name = getattr(actor, "get_username", None)
    return AuditEvent.objects.create(
        actor=name() if name else str(actor),
        action=action,
        target=target,
        detail=detail or {},
        ip=client_ip(request),
        timestamp=timezone.now(),
    )
