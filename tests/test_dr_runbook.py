"""The README's disaster-recovery runbook, run as written: a host backs up to the bucket and is
lost whole (database, workspace, backups, var directory); a new host gets only the secrets an
operator keeps elsewhere (the secret key and the backup signing key; the bucket's credentials come
with the new host's role or environment), migrates an empty database, finds the old backups with
``sync_backups`` and restores one by name. Every command runs as its own ``manage.py`` process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

from tests.helpers import create_database, spare_database, tree
from tests.test_restore_command import REWRITTEN  # rows a restore rewrites on purpose

pytest_plugins = ["tests.s3server"]  # the s3 and s3_server fixtures

PASSWORD = "correct-horse-battery-staple"
SNAPSHOT = """
import json
from django.db import connection
rows = {}
with connection.cursor() as cursor:
    for table in sorted(connection.introspection.table_names(cursor)):
        cursor.execute(f'SELECT * FROM "{table}"')
        rows[table] = sorted(repr(row) for row in cursor.fetchall())
print(json.dumps(rows))
"""
SIGN_IN = """
import json
import os
from django.contrib.auth import authenticate
print(json.dumps(authenticate(username="root", password=os.environ["SIGN_IN_PASSWORD"]) is not None))
"""
CATALOG = """
import json
from trusca.backups.models import Backup
print(json.dumps({b.name: [b.kind, b.location] for b in Backup.objects.all()}))
"""


class Host:
    """One installation: its directories, its database, and manage.py run in its environment."""

    def __init__(self, root: Path, database: str, s3, secrets: dict[str, str]):
        self.root, self.database = root, database
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(_OWN)},
            **s3.env(),
            "DATABASE_URL": database,
            "TRUSCA_VAR_DIR": str(root / "var"),
            "WORKSPACE_HOST_PATH": str(root / "workspace"),
            "BACKUP_ROOT": str(root / "backups"),
            **secrets,
        }

    def install(self) -> None:
        for directory in ("var", "workspace", "backups"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        self.manage("migrate", "-v0")

    def manage(self, *args: str, **env: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=settings.BASE_DIR,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def python(self, code: str, **env: str):
        return json.loads(self.manage("shell", "-c", code, **env).strip().splitlines()[-1])


# The installation's own settings, which the new host must not inherit from the test's environment.
_OWN = ("DATABASE_URL", "SECRET_KEY", "BACKUP_SIGNING_KEY", "BACKUP_ROOT", "WORKSPACE_HOST_PATH", "TRUSCA_VAR_DIR")


@pytest.fixture
def database(tmp_path):
    """An empty database of the test's engine beside the test's own, dropped afterwards."""
    with spare_database("dr", tmp_path / "host" / "var" / "trusca.sqlite3") as url:
        yield url


def lose(host: Host) -> None:
    """The host is gone: its database, its workspace, every local backup, its var directory."""
    if host.database.startswith("postgres"):
        base, name = host.database.rsplit("/", 1)
        with psycopg.connect(f"{base}/postgres", autocommit=True) as db:
            db.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    shutil.rmtree(host.root)


def test_the_disaster_recovery_runbook_brings_back_every_row_and_byte_from_the_bucket(s3, database, tmp_path):
    create_database(database)
    old = Host(tmp_path / "host", database, s3, {})
    old.install()
    old.manage("seed_demo", "--projects", "2", "--scans", "2", "--files", "6", "--file-kb", "2")
    old.manage("createsuperuser", "--noinput", "--username", "root", "--email", "root@example.org",
               DJANGO_SUPERUSER_PASSWORD=PASSWORD)  # fmt: skip
    rows = old.python(SNAPSHOT)
    files = tree(old.root / "workspace")
    assert files and rows["portal_project"]
    out = old.manage("backup")
    name = Path(out.splitlines()[-1]).name
    assert f"✓ copied {name} to s3://{s3.bucket}/backups/{name}/" in out

    # What the operator kept elsewhere, as files (README: Disaster recovery).
    vault = tmp_path / "vault"
    vault.mkdir()
    for secret in ("secret_key", "backup_signing_key"):
        shutil.copy(old.root / "var" / secret, vault / secret)
    lose(old)
    assert not (tmp_path / "host").exists()

    create_database(database)
    new = Host(
        tmp_path / "host",
        database,
        s3,
        {"SECRET_KEY_FILE": str(vault / "secret_key"), "BACKUP_SIGNING_KEY_FILE": str(vault / "backup_signing_key")},
    )
    new.install()
    found = new.manage("sync_backups").splitlines()
    assert found[0].startswith(f"✓ {name}  cli") and found[0].endswith("S3")
    assert found[-1] == f"1 backup(s): 0 on this host only, 1 in s3://{s3.bucket}/backups/ only, 0 in both"
    out = new.manage("restore", name, "--yes")
    assert out.splitlines()[0] == f"✓ downloaded s3://{s3.bucket}/backups/{name}/"
    assert "signed with this installation's key" in out and out.splitlines()[-1] == "Restore complete"

    restored = new.python(SNAPSHOT)
    assert set(restored) == set(rows)
    for table in rows:
        if table not in REWRITTEN:
            assert restored[table] == rows[table], table
    assert set(rows["portal_auditevent"]) <= set(restored["portal_auditevent"])
    assert tree(new.root / "workspace") == files
    assert new.python(SIGN_IN, SIGN_IN_PASSWORD=PASSWORD) is True
    assert new.python(SIGN_IN, SIGN_IN_PASSWORD="not-the-password") is False
    catalog = new.python(CATALOG)
    assert catalog[name] == ["cli", "s3"]
    assert [location for n, (kind, location) in catalog.items() if kind == "pre_restore"] == ["local"]
