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
        ({"DEBUG": "maybe"}, "DEBUG is 'maybe'; set it to true or false (or 1/0, yes/no, on/off)"),
        ({"BACKUP_RETENTION_DAYS": "seven"}, "BACKUP_RETENTION_DAYS is 'seven'; set it to a whole number"),
        ({"BACKUP_RETENTION_DAYS": "0"}, "BACKUP_RETENTION_DAYS is 0; set it to a whole number from 1 to 36500"),
        ({"BACKUP_RETENTION_DAYS": "99999999999"}, "BACKUP_RETENTION_DAYS is 99999999999; set it to a whole number"),
        ({"BACKUP_UPLOAD_MAX_BYTES": "10GB"}, "BACKUP_UPLOAD_MAX_BYTES is '10GB'; set it to a whole number"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL is 'LOUD'; set it to one of DEBUG, INFO, WARNING, ERROR"),
        ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL must point at PostgreSQL"),
        ({"CELERY_BROKER_URL": "sqs://"}, "CELERY_BROKER_URL must be filesystem://"),
        ({"CACHE_URL": "memcached://x"}, "CACHE_URL must be a redis:// URL"),
        ({"SECRET_KEY_FILE": "/nonexistent/secret"}, "SECRET_KEY_FILE=/nonexistent/secret cannot be read"),
    ],
)
def test_a_bad_value_fails_at_start_up_naming_the_variable(tmp_path, env, message):
    result = start(tmp_path, **env)
    assert result.returncode != 0
    assert result.stderr == f"Configuration error: {message}\n" or message in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


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


def test_a_var_dir_that_is_a_file_is_one_line_naming_the_variable(tmp_path):
    (tmp_path / "varfile").write_text("not a directory")
    result = start(tmp_path, TRUSCA_VAR_DIR=str(tmp_path / "varfile"))
    assert result.returncode != 0
    assert "TRUSCA_VAR_DIR" in result.stderr and "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "On", "false", "0", "no", "OFF", "False"])
def test_booleans_take_what_operators_type(tmp_path, value):
    result = start(tmp_path, DEBUG=value)
    assert result.returncode == 0, result.stderr


def test_redis_down_at_start_is_one_line_naming_the_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "backup"],
        cwd=settings.BASE_DIR,
        env={
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")},
            "TRUSCA_VAR_DIR": str(tmp_path / "var"),
            "WORKSPACE_HOST_PATH": str(tmp_path / "ws"),
            "BACKUP_ROOT": str(tmp_path / "backups"),
            "CACHE_URL": "redis://127.0.0.1:1/0",
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "CACHE_URL" in result.stderr.strip().splitlines()[-1]
