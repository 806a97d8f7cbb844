"""The two backup directory names that coexist, and every reader accepts both.

CLI legacy: ``YYYY-MM-DD-HHMMSS`` (UTC), made by ``manage.py backup``.
UI / Celery: ``<prefix>-YYYYMMDDTHHMMSSZ``, the prefix saying who made it: ``auto`` and ``manual``
as DESIGN.md names them, plus ``pre-restore`` and ``uploaded`` for the safety copy a restore
takes and for a bundle an operator uploads.
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime

CLI_FORMAT = "%Y-%m-%d-%H%M%S"
UI_FORMAT = "%Y%m%dT%H%M%SZ"
_CLI = re.compile(r"^(\d{4}-\d{2}-\d{2}-\d{6})$")
_UI = re.compile(r"^(auto|manual|pre-restore|uploaded)-(\d{8}T\d{6}Z)$")
_PREFIX_KIND = {"auto": "auto", "manual": "manual", "pre-restore": "pre_restore", "uploaded": "uploaded"}
_KIND_PREFIX = {kind: prefix for prefix, kind in _PREFIX_KIND.items()}


@dataclass(frozen=True)
class ParsedName:
    kind: str  # the kind the name implies; the manifest's kind wins where they differ
    timestamp: datetime


def format_name(kind: str, when: datetime) -> str:
    when = when.astimezone(UTC)
    if kind == "cli":
        return when.strftime(CLI_FORMAT)
    return f"{_KIND_PREFIX[kind]}-{when.strftime(UI_FORMAT)}"


def parse_name(name: str) -> ParsedName | None:
    try:
        if match := _CLI.match(name):
            when = datetime.strptime(match.group(1), CLI_FORMAT)
            return ParsedName(kind="cli", timestamp=when.replace(tzinfo=UTC))
        if match := _UI.match(name):
            when = datetime.strptime(match.group(2), UI_FORMAT)
            return ParsedName(kind=_PREFIX_KIND[match.group(1)], timestamp=when.replace(tzinfo=UTC))
    except ValueError:  # the shape matched but the date does not exist (month 13 …)
        return None
    return None
