"""manifest.json: what a backup holds, checked against a schema, and signed.

Every manifest is hostile until its signature says otherwise: ``parse`` checks types, lengths
and nesting before anything uses a value, so a damaged or crafted file is one clear error and
never a crash in whatever reads it next (listing, pruning, the catalog). The signature is an
HMAC-SHA256 over the rest of the document, with a key kept outside the database and the
backups (``BACKUP_SIGNING_KEY``): the manifest holds every file's sha256, so a good signature
vouches for every byte of the backup.
"""

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field, replace
from datetime import datetime

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder

FORMAT = 1
MANIFEST = "manifest.json"
WORKSPACE_ARCHIVE = "workspace.tar.gz"
DUMP_FILES = {"postgresql": "postgres.sql.gz", "sqlite": "sqlite.db.gz"}
ENCRYPTED_SUFFIX = ".gpg"
ARCHIVES = (*DUMP_FILES.values(), WORKSPACE_ARCHIVE)
KINDS = ("auto", "manual", "cli", "uploaded", "pre_restore")
# Bigger than any real manifest by far; refusing larger ones keeps a hostile file out of memory.
MAX_MANIFEST_BYTES = 1024 * 1024
_MAX_SIZE = 2**63 - 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REVISION = re.compile(r"^[0-9a-f]{12}$")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class ManifestError(Exception):
    pass


@dataclass(frozen=True)
class FileEntry:
    size: int  # bytes as stored
    sha256: str  # of the bytes as stored (encrypted ones: of the ciphertext)
    uncompressed_size: int | None = None  # None in manifests older than the field
    plain_size: int | None = None  # encrypted files: the gzip inside
    plain_sha256: str | None = None

    def as_dict(self) -> dict:
        fields = {
            "size": self.size,
            "sha256": self.sha256,
            "uncompressed_size": self.uncompressed_size,
            "plain_size": self.plain_size,
            "plain_sha256": self.plain_sha256,
        }
        return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class Manifest:
    timestamp: datetime
    kind: str
    engine: str
    db_revision: str
    migrations: dict[str, str]
    db_size: int
    workspace_path: str
    app_version: str
    files: dict[str, FileEntry]
    encryption: dict | None = None
    signature: dict | None = field(default=None, compare=False)

    @property
    def dump(self) -> str:
        """The stored name of the database dump (``postgres.sql.gz`` or its ``.gpg``)."""
        return next(name for name in self.files if archive_of(name) == DUMP_FILES[self.engine])

    @property
    def workspace(self) -> str | None:
        return next((name for name in self.files if archive_of(name) == WORKSPACE_ARCHIVE), None)

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    def unsigned_document(self) -> dict:
        document = {
            "format": FORMAT,
            "timestamp": self.timestamp.isoformat(),
            "kind": self.kind,
            "engine": self.engine,
            "db_revision": self.db_revision,
            # The name the portal's manual and operators' scripts check ("a non-empty alembic_head").
            "alembic_head": self.db_revision,
            "migrations": dict(sorted(self.migrations.items())),
            "db_size": self.db_size,
            "workspace_path": self.workspace_path,
            "app_version": self.app_version,
            "files": {name: entry.as_dict() for name, entry in sorted(self.files.items())},
        }
        if self.encryption is not None:
            document["encryption"] = self.encryption
        return document

    def signed(self) -> "Manifest":
        return replace(self, signature=sign(self.unsigned_document()))

    def to_json(self) -> bytes:
        document = self.unsigned_document()
        if self.signature is not None:
            document["signature"] = self.signature
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"

    def signature_state(self) -> "SignatureState":
        return check_signature(self.unsigned_document(), self.signature)


def archive_of(stored_name: str) -> str:
    """``workspace.tar.gz.gpg`` -> ``workspace.tar.gz``: the gzip file a stored file holds."""
    return stored_name.removesuffix(ENCRYPTED_SUFFIX)


# Reading ---------------------------------------------------------------------------------------


def parse(data: bytes) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a TRUSCA manifest")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{MANIFEST} does not decode as JSON ({_short(exc)})") from None
    except RecursionError:
        raise ManifestError(f"{MANIFEST} is nested too deeply to be a TRUSCA manifest") from None
    return from_document(document)


def from_document(document) -> Manifest:
    if not isinstance(document, dict):
        raise ManifestError(f"{MANIFEST} is not a JSON object")
    document = dict(document)
    if "db_revision" not in document and "alembic_head" in document:
        document["db_revision"] = document["alembic_head"]  # legacy manifests
    missing = [key for key in _REQUIRED if key not in document]
    if missing:
        raise ManifestError(f"{MANIFEST} lacks {', '.join(missing)}")
    if document["format"] != FORMAT or isinstance(document["format"], bool):
        raise ManifestError(f"{MANIFEST} has format {_show(document['format'])}; this version reads format {FORMAT}")
    engine = _choice(document, "engine", tuple(DUMP_FILES))
    files = _files(document["files"], engine)
    encryption = document.get("encryption")
    if encryption is not None and not _small_json_object(encryption):
        raise ManifestError(f"{MANIFEST} has an unreadable encryption record")
    encrypted = [name for name in files if name.endswith(ENCRYPTED_SUFFIX)]
    if encrypted and encryption is None:
        raise ManifestError(f"{MANIFEST} lists encrypted files but no encryption record")
    signature = document.get("signature")
    if signature is not None and not (
        isinstance(signature, dict)
        and set(signature) == {"key_id", "hmac_sha256"}
        and all(isinstance(v, str) and len(v) <= 64 for v in signature.values())
    ):
        raise ManifestError(f"{MANIFEST} has an unreadable signature")
    return Manifest(
        timestamp=_timestamp(document["timestamp"]),
        kind=_choice(document, "kind", KINDS),
        engine=engine,
        db_revision=_matching(document, "db_revision", _REVISION, "12 hexadecimal characters"),
        migrations=_migrations(document["migrations"]),
        db_size=_size(document["db_size"], "db_size"),
        workspace_path=_text(document, "workspace_path", 4096),
        app_version=_text(document, "app_version", 64),
        files=files,
        encryption=encryption,
        signature=signature,
    )


_REQUIRED = (
    "format",
    "timestamp",
    "kind",
    "engine",
    "db_revision",
    "migrations",
    "db_size",
    "workspace_path",
    "app_version",
    "files",
)


def _short(exc: Exception) -> str:
    return str(exc).split("\n")[0][:120]


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | type(None)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _text(document: dict, key: str, limit: int) -> str:
    value = document[key]
    if not isinstance(value, str) or len(value) > limit:
        raise ManifestError(f"{MANIFEST} {key} must be a string of at most {limit} characters, not {_show(value)}")
    return value


def _choice(document: dict, key: str, choices: tuple[str, ...]) -> str:
    value = document[key]
    if value not in choices or not isinstance(value, str):
        raise ManifestError(f"{MANIFEST} names {key} {_show(value)}; expected one of {', '.join(choices)}")
    return value


def _matching(document: dict, key: str, pattern: re.Pattern, what: str) -> str:
    value = document[key]
    if not isinstance(value, str) or not pattern.match(value):
        raise ManifestError(f"{MANIFEST} {key} must be {what}, not {_show(value)}")
    return value


def _size(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_SIZE:
        raise ManifestError(f"{MANIFEST} {what} must be a whole number of bytes, not {_show(value)}")
    return value


def _timestamp(value) -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise ManifestError(f"{MANIFEST} timestamp must be an ISO 8601 string, not {_show(value)}")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ManifestError(f"{MANIFEST} has an unreadable timestamp {_show(value)}") from None
    if when.utcoffset() is None:
        raise ManifestError(f"{MANIFEST} timestamp {_show(value)} has no time zone")
    return when


def _migrations(value) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > 1000:
        raise ManifestError(f"{MANIFEST} migrations must be an object of app names to migration names")
    for app, name in value.items():
        if not (isinstance(name, str) and _IDENTIFIER.match(app) and _IDENTIFIER.match(name)):
            raise ManifestError(f"{MANIFEST} migrations has an unreadable entry for {_show(app)}")
    return dict(value)


def _files(value, engine: str) -> dict[str, FileEntry]:
    if not isinstance(value, dict):
        raise ManifestError(f"{MANIFEST} files must be an object")
    files = {}
    for name, entry in value.items():
        if archive_of(name) not in ARCHIVES:
            raise ManifestError(f"{MANIFEST} lists an unexpected file {_show(name)}")
        if not isinstance(entry, dict) or not _HEX64.match(str(entry.get("sha256", ""))):
            raise ManifestError(f"{MANIFEST} entry for {name} needs an integer size and a sha256")
        plain_sha = entry.get("plain_sha256")
        if plain_sha is not None and not _HEX64.match(str(plain_sha)):
            raise ManifestError(f"{MANIFEST} entry for {name} has an unreadable plain_sha256")
        optional = {k: _size(entry[k], f"{name} {k}") for k in ("uncompressed_size", "plain_size") if k in entry}
        files[name] = FileEntry(
            size=_size(entry.get("size"), f"{name} size"), sha256=entry["sha256"], plain_sha256=plain_sha, **optional
        )
    if sorted(archive_of(n) for n in files) != sorted({archive_of(n) for n in files}):
        raise ManifestError(f"{MANIFEST} lists the same archive twice")
    if DUMP_FILES[engine] not in {archive_of(n) for n in files}:
        raise ManifestError(f"{MANIFEST} does not list the database dump {DUMP_FILES[engine]}")
    if any(archive_of(n) in DUMP_FILES.values() and archive_of(n) != DUMP_FILES[engine] for n in files):
        raise ManifestError(f"{MANIFEST} lists a dump of another engine than {engine}")
    return files


def _small_json_object(value) -> bool:
    return isinstance(value, dict) and len(json.dumps(value)) <= 64 * 1024


# Signing ---------------------------------------------------------------------------------------


class SignatureState:
    VALID = "valid"  # signed with this installation's current key
    VALID_OLD_KEY = "valid with an older key"  # one of BACKUP_SIGNING_OLD_KEYS
    UNSIGNED = "unsigned"
    FOREIGN = "signed with another installation's key"
    ALTERED = "altered after it was signed"


def signing_key() -> bytes:
    """BACKUP_SIGNING_KEY, or one generated once into the var directory (mode 600), like the
    secret key: every process on the machine agrees, and a new host needs the same key to
    trust its backups (README: keep it with your other secrets)."""
    if settings.BACKUP_SIGNING_KEY:
        return settings.BACKUP_SIGNING_KEY.encode()
    path = settings.VAR_DIR / "backup_signing_key"
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process wrote it at the same moment
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48) + "\n")
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ImproperlyConfigured(f"the backup signing key {path} cannot be read: {exc.strerror}") from None
    if not key:
        raise ImproperlyConfigured(f"the backup signing key {path} is empty; remove it to generate a new one")
    return key.encode()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"trusca-backup-signing-key:" + key).hexdigest()[:16]


def _mac(key: bytes, document: dict) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def sign(document: dict) -> dict:
    key = signing_key()
    return {"key_id": _key_id(key), "hmac_sha256": _mac(key, document)}


def check_signature(document: dict, signature: dict | None) -> str:
    if signature is None:
        return SignatureState.UNSIGNED
    current = signing_key()
    keys = [(current, SignatureState.VALID)] + [(k.encode(), SignatureState.VALID_OLD_KEY) for k in _old_keys()]
    for key, state in keys:
        if hmac.compare_digest(_key_id(key), signature["key_id"]):
            good = hmac.compare_digest(_mac(key, document), signature["hmac_sha256"])
            return state if good else SignatureState.ALTERED
    return SignatureState.FOREIGN


def _old_keys() -> list[str]:
    return [k for k in re.split(r"[\s,]+", settings.BACKUP_SIGNING_OLD_KEYS) if k]


def trusted(state: str) -> bool:
    return state in (SignatureState.VALID, SignatureState.VALID_OLD_KEY)


# The live database -----------------------------------------------------------------------------


def applied_migrations() -> list[tuple[str, str]]:
    """(app, migration) in the order they were applied to the live database."""
    recorder = MigrationRecorder(connection)
    if not recorder.has_table():
        return []
    return list(recorder.migration_qs.order_by("id").values_list("app", "name"))


def db_revision(applied: list[tuple[str, str]]) -> str:
    # The set, not the order: two databases migrated along different paths to the same state match.
    digest = hashlib.sha256("\n".join(f"{a}.{n}" for a, n in sorted(applied)).encode())
    return digest.hexdigest()[:12]


def latest_per_app(applied: list[tuple[str, str]]) -> dict[str, str]:
    latest: dict[str, str] = {}
    for app, name in applied:
        latest[app] = name
    return dict(sorted(latest.items()))


def live_revision() -> str:
    return db_revision(applied_migrations())


def compare_migrations(backup_migrations: dict[str, str]) -> tuple[list[str], list[str]]:
    """(unknown, behind): migrations this code lacks, and apps the backup is behind the code on."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    unknown, behind = [], []
    for app, name in sorted(backup_migrations.items()):
        if (app, name) not in loader.disk_migrations:
            unknown.append(f"{app}.{name}")
            continue
        leaves = loader.graph.leaf_nodes(app)
        if leaves and (app, name) not in leaves:
            behind.append(app)
    for app in sorted({a for a, _ in loader.disk_migrations} - set(backup_migrations)):
        behind.append(app)
    return unknown, behind
