import os

import pytest
from django.conf import settings
from django.core.management import call_command

# OpenPGP keys made by the real gpg at session start, for every test that encrypts.
from tests.gpgkeys import alice, bob, hand  # noqa: F401


def pytest_configure(config):
    # Under CI a PostgreSQL that cannot be reached is a failure, not a quiet fall-back to SQLite.
    if os.environ.get("CI") and os.environ.get("TRUSCA_TEST_ENGINE") == "postgresql":
        assert settings.DATABASES["default"]["ENGINE"].endswith("postgresql"), "CI must test on PostgreSQL"


@pytest.fixture(autouse=True)
def isolated_paths(settings, tmp_path):
    """Each test gets its own workspace, backup root, var directory and on-disk cache."""
    settings.WORKSPACE_HOST_PATH = tmp_path / "workspace"
    settings.BACKUP_ROOT = tmp_path / "backups"
    settings.VAR_DIR = tmp_path / "var"
    settings.VAR_DIR.mkdir()
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(tmp_path / "var" / "cache"),
        }
    }
    settings.WORKSPACE_HOST_PATH.mkdir()
    return tmp_path


@pytest.fixture
def demo(transactional_db):
    """Demo data committed to the database (a backup reads it from outside the test's connection)."""
    call_command(
        "seed_demo", projects=2, scans=2, files=6, file_kb=2, findings=20, audit_events=5, stdout=open(os.devnull, "w")
    )


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.org", "correct-horse-battery")


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("staffer", "staff@example.org", "staff-password-123", is_staff=True)


@pytest.fixture
def su_client(client, superuser):
    client.force_login(superuser)
    return client


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def drop_tables_made_after_backup(transactional_db):
    """Tables a test creates beside the portal's (to prove a restore removes them) go at its end."""
    from django.db import connection

    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS made_after_backup")
