"""Bad configuration stops the process at start-up with a message naming the variable."""

import os
import subprocess
import sys

import pytest
from django.conf import settings


def start(tmp_path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CACHE_URL", "CELERY_BROKER_URL")}
    base.update(
        TRUSCA_VAR_DIR=str(tmp_path / "var"),
        WORKSPACE_HOST_PATH=str(tmp_path / "ws"),
        BACKUP_ROOT=str(tmp_path / "backups"),
    )
    base.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=settings.BASE_DIR, env=base, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DEBUG": "yes"}, "DEBUG is 'yes'; set it to True or False"),
        ({"BACKUP_RETENTION_DAYS": "seven"}, "BACKUP_RETENTION_DAYS is 'seven'; set it to a whole number"),
        ({"BACKUP_RETENTION_DAYS": "0"}, "BACKUP_RETENTION_DAYS is 0; it must be at least 1"),
        ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL must point at PostgreSQL"),
        ({"CELERY_BROKER_URL": "sqs://"}, "CELERY_BROKER_URL must be filesystem://"),
        ({"CACHE_URL": "memcached://x"}, "CACHE_URL must be a redis:// URL"),
        ({"SECRET_KEY_FILE": "/nonexistent/secret"}, "SECRET_KEY_FILE=/nonexistent/secret cannot be read"),
    ],
)
def test_a_bad_value_fails_at_start_up_naming_the_variable(tmp_path, env, message):
    result = start(tmp_path, **env)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr or "ImproperlyConfigured" in result.stderr


def test_backup_root_inside_the_workspace_is_refused_by_a_system_check(tmp_path):
    result = start(tmp_path, BACKUP_ROOT=str(tmp_path / "ws" / "backups"))
    assert result.returncode != 0 and "backups.E003" in result.stderr


def test_the_defaults_need_no_server_and_generate_a_private_secret_key(tmp_path):
    result = start(tmp_path)
    assert result.returncode == 0, result.stderr
    key = tmp_path / "var" / "secret_key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text()) > 40


def test_a_secret_comes_from_a_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-from-a-file-" * 3)
    assert start(tmp_path, SECRET_KEY_FILE=str(secret)).returncode == 0
    assert not (tmp_path / "var" / "secret_key").exists()
