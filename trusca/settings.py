"""TRUSCA settings: everything comes from the environment.

The defaults run on one machine with no server at all (SQLite, a filesystem Celery broker, local
storage); production sets DATABASE_URL, CELERY_BROKER_URL and CACHE_URL. A bad value stops the
process at start-up with a message naming the variable, instead of surfacing at 3 a.m.
"""

import os
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.validators import validate_email

BASE_DIR = Path(__file__).resolve().parent.parent


def envstr(name: str, default: str = "") -> str:
    # NAME_FILE lets secrets come from a mounted file instead of the process environment.
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path} cannot be read: {exc.strerror}") from None
    return os.environ.get(name, default)


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def envbool(name: str, default: str) -> bool:
    value = envstr(name, default)
    if value.strip().lower() not in _TRUE + _FALSE:
        raise ImproperlyConfigured(f"{name} is {value!r}; set it to true or false (or 1/0, yes/no, on/off)")
    return value.strip().lower() in _TRUE


def envint(name: str, default: str, minimum: int = 0, maximum: int = 10**9) -> int:
    value = envstr(name, default)
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} is {value!r}; set it to a whole number") from None
    if not minimum <= number <= maximum:
        raise ImproperlyConfigured(f"{name} is {number}; set it to a whole number from {minimum} to {maximum}")
    return number


def envchoice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = envstr(name, default)
    if value.upper() not in choices:
        raise ImproperlyConfigured(f"{name} is {value!r}; set it to one of {', '.join(choices)}")
    return value.upper()


def envemails(name: str) -> list[str]:
    addresses = [a.strip() for a in envstr(name).split(",") if a.strip()]
    for address in addresses:
        try:
            validate_email(address)
        except ValidationError:
            raise ImproperlyConfigured(
                f"{name} holds {address!r}, not an email address; separate addresses with commas"
            )
    return addresses


def envpath(name: str, default: str) -> Path:
    value = envstr(name, default)
    if not value:
        raise ImproperlyConfigured(f"{name} is empty; set it to a directory path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (BASE_DIR / path)


DEBUG = envbool("DEBUG", "false")
LOG_LEVEL = envchoice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
VAR_DIR = envpath("TRUSCA_VAR_DIR", "var")
if VAR_DIR.exists() and not VAR_DIR.is_dir():
    raise ImproperlyConfigured(f"TRUSCA_VAR_DIR {VAR_DIR} is not a directory; point it at a directory")
SECRET_KEY = envstr("SECRET_KEY")
if not SECRET_KEY:
    # One machine, no configuration: keep a generated key beside the SQLite file, readable by
    # the owner only, so sessions survive restarts and every local process agrees on it.
    _key_file = VAR_DIR / "secret_key"
    if not _key_file.exists():
        import secrets

        VAR_DIR.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process started at the same moment and wrote it
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(50))
    SECRET_KEY = _key_file.read_text().strip()
ALLOWED_HOSTS = [h.strip() for h in envstr("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in envstr("CSRF_TRUSTED_ORIGINS").split(",") if o.strip()]

WORKSPACE_HOST_PATH = envpath("WORKSPACE_HOST_PATH", "workspace")
BACKUP_ROOT = envpath("BACKUP_ROOT", "backups")
BACKUP_RETENTION_DAYS = envint("BACKUP_RETENTION_DAYS", "7", minimum=1, maximum=36500)
# A running backup or restore refreshes its heartbeat this often; one silent for
# BACKUP_STALE_SECONDS is taken for dead, its lock freed and its row marked failed.
BACKUP_HEARTBEAT_SECONDS = envint("BACKUP_HEARTBEAT_SECONDS", "10", minimum=1)
BACKUP_STALE_SECONDS = envint("BACKUP_STALE_SECONDS", "180", minimum=2)
# The largest bundle the admin accepts for "Upload and restore" (10 GB); larger ones are restored
# with manage.py restore on the server. The upload streams to disk, so this bounds disk, not memory.
BACKUP_UPLOAD_MAX_BYTES = envint("BACKUP_UPLOAD_MAX_BYTES", str(10 * 1024**3), minimum=1, maximum=2**62)
# Signs every manifest (which holds every file's sha256): a restore trusts only backups signed
# with it. Unset, one is generated once into VAR_DIR/backup_signing_key. Keys used before a
# rotation stay usable for checking, comma- or line-separated.
BACKUP_SIGNING_KEY = envstr("BACKUP_SIGNING_KEY")
BACKUP_SIGNING_OLD_KEYS = envstr("BACKUP_SIGNING_OLD_KEYS")
# OpenPGP encryption of new backups (trusca/backups/crypto.py): a passphrase, armored public keys
# (one or several), or both, in which case either opens them.
BACKUP_ENCRYPTION_PASSPHRASE = envstr("BACKUP_ENCRYPTION_PASSPHRASE")
BACKUP_ENCRYPTION_RECIPIENTS = envstr("BACKUP_ENCRYPTION_RECIPIENTS")
# The passphrase of the private key given to a restore with --decryption-key, for automation;
# otherwise it is asked for on the terminal. Never on a command line.
BACKUP_DECRYPTION_KEY_PASSPHRASE = envstr("BACKUP_DECRYPTION_KEY_PASSPHRASE")
# A pg_dump or psql that makes no progress for this long is killed and its run fails.
BACKUP_STALL_SECONDS = envint("BACKUP_STALL_SECONDS", "300", minimum=1)


def envmatch(name: str, default: str, pattern: str, what: str, *, show: bool = True) -> str:
    value = envstr(name, default)
    if value and not re.fullmatch(pattern, value):
        # show=False for a value that may hold a secret by mistake (a URL with user:password@).
        raise ImproperlyConfigured(f"{name} is {value[:80]!r}; set it to {what}" if show else f"set {name} to {what}")
    return value


# Off-host copies in S3 or an S3-compatible store (MinIO, Backblaze B2, Wasabi, Ceph); no bucket,
# no copy. The credentials are not settings: boto3 finds them itself (environment, shared files,
# instance or container role), so they never pass through anything the portal prints.
BACKUP_S3_BUCKET = envmatch("BACKUP_S3_BUCKET", "", r"[A-Za-z0-9._-]{3,255}", "a bucket name (letters, digits, . - _)")
_prefix = envmatch(
    "BACKUP_S3_PREFIX",
    "backups/",
    r"(?!/)(?!.*//)(?!(.*/)?\.\.?(/|$))[A-Za-z0-9._/-]{1,512}",
    "a key prefix such as backups/ (letters, digits, . - _ and /, no leading slash, no . or .. part)",
).removesuffix("/")
BACKUP_S3_PREFIX = f"{_prefix}/" if _prefix else ""  # empty: the bucket's top level
BACKUP_S3_ENDPOINT_URL = envmatch(
    "BACKUP_S3_ENDPOINT_URL",
    "",
    r"https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?",
    "an http:// or https:// URL without credentials, query or fragment (empty for AWS)",
    show=False,
)
BACKUP_S3_REGION = envmatch("BACKUP_S3_REGION", "", r"[a-z0-9-]{1,64}", "a region name such as eu-west-1")
# GLACIER and DEEP_ARCHIVE are refused: a copy in them cannot be read back without hours of restore.
BACKUP_S3_STORAGE_CLASS = envmatch(
    "BACKUP_S3_STORAGE_CLASS",
    "STANDARD_IA",
    "STANDARD|STANDARD_IA|ONEZONE_IA|INTELLIGENT_TIERING|GLACIER_IR|REDUCED_REDUNDANCY",
    "STANDARD, STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING, GLACIER_IR, REDUCED_REDUNDANCY, "
    "or nothing to send none (some S3-compatible stores refuse any other than STANDARD)",
)
BACKUP_S3_RETENTION_DAYS = envint("BACKUP_S3_RETENTION_DAYS", str(BACKUP_RETENTION_DAYS), minimum=1, maximum=36500)
# The nightly auto backup (the periodic task daily-auto-backup, 00:00 UTC unless edited in the
# admin). Applied on migrate and when beat starts: false switches the task off; a change back to
# true switches it on again once, after which the admin's switch stands.
BACKUP_DAILY_ENABLED = envbool("BACKUP_DAILY_ENABLED", "true")
BACKUP_ALERT_EMAILS = envemails("BACKUP_ALERT_EMAILS")
# A monitor reads /admin/health with "Authorization: Bearer <token>": a restore signs every
# session out, and the page matters most right then.
BACKUP_HEALTH_TOKEN = envstr("BACKUP_HEALTH_TOKEN")
if BACKUP_HEALTH_TOKEN and len(BACKUP_HEALTH_TOKEN) < 24:
    raise ImproperlyConfigured(
        "BACKUP_HEALTH_TOKEN is shorter than 24 characters; generate one with "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    )

# Alerts go out through Django's mail settings. Without EMAIL_HOST they are written to the log.
EMAIL_HOST = envstr("EMAIL_HOST")
EMAIL_PORT = envint("EMAIL_PORT", "25", minimum=1, maximum=65535)
EMAIL_HOST_USER = envstr("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = envstr("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", "false")
EMAIL_USE_SSL = envbool("EMAIL_USE_SSL", "false")
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured(
        "EMAIL_USE_TLS and EMAIL_USE_SSL are both true; set one: TLS (STARTTLS, port 587) or SSL (port 465)"
    )
# A mail server that does not answer must not hold a worker for minutes.
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = envstr("DEFAULT_FROM_EMAIL", "trusca@localhost")
EMAIL_BACKEND = (
    "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "django.core.mail.backends.console.EmailBackend"
)

try:
    DATABASES = {
        "default": dj_database_url.parse(
            envstr("DATABASE_URL", f"sqlite:///{VAR_DIR / 'trusca.sqlite3'}"), conn_max_age=0
        )
    }
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL cannot be parsed: {exc}") from None
if DATABASES["default"]["ENGINE"] not in (
    "django.db.backends.sqlite3",
    "django.db.backends.postgresql",
):
    raise ImproperlyConfigured("DATABASE_URL must point at PostgreSQL (postgres://…) or SQLite (sqlite:///…)")
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web, the worker and beat read while one of them writes.
    DATABASES["default"]["OPTIONS"] = {"init_command": "PRAGMA journal_mode=WAL;", "timeout": 20}
    # A file, not memory: backups read the database from outside the test's connection.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-trusca.sqlite3")}

CACHE_URL = envstr("CACHE_URL")
if CACHE_URL:
    if not CACHE_URL.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured("CACHE_URL must be a redis:// URL")
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CACHE_URL,
            # A Redis that is down or hung answers in seconds, not never: pages, the health check
            # and the lock fail fast and say so.
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 5},
        }
    }
else:
    # Restore progress and the maintenance flag must outlive the database being replaced and be
    # seen by every process on the host, so the default cache is on disk, not in memory.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

CELERY_BROKER_URL = envstr("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL == "filesystem://":
    _broker_dir = VAR_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
elif not CELERY_BROKER_URL.startswith(("redis://", "rediss://", "amqp://")):
    raise ImproperlyConfigured("CELERY_BROKER_URL must be filesystem://, redis://… or amqp://…")
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {"trusca.backups.tasks.*": {"queue": "backups"}}
# A broker that is down refuses "Run manual backup now" in seconds instead of hanging the request.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
CELERY_BROKER_CONNECTION_TIMEOUT = 3
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
# django-celery-beat's DatabaseScheduler with a fix (see the class).
CELERY_BEAT_SCHEDULER = "trusca.backups.schedule:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "trusca.portal",
    "trusca.backups",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "trusca.backups.maintenance.MaintenanceMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "trusca.urls"
CSRF_FAILURE_VIEW = "trusca.backups.views.csrf_failure"
WSGI_APPLICATION = "trusca.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # The trusca loggers write through the root logger's handler, which Celery's worker and beat
    # replace with their own (timestamped, to their log): one line each, in every process.
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "trusca": {"level": LOG_LEVEL},
        # One line per backup outcome, the lines the manual's troubleshooting greps for: kept
        # whatever LOG_LEVEL says.
        "trusca.backups.outcome": {"level": "INFO"},
        # Server errors (500) with their traceback: without this Django only mails them to ADMINS.
        "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False},
    },
}
