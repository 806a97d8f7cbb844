"""Retention: which backups a backup's pruning removes, with the clock frozen."""

import io
import json
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.conf import settings
from django.core.management import call_command

from trusca.backups import operations
from trusca.backups.models import Backup
from trusca.backups.naming import format_name

NOW = datetime(2026, 5, 20, 3, 0, 0, tzinfo=UTC)


def fake_backup(kind: str, age: timedelta, *, complete: bool = True) -> str:
    """A stored backup of the given kind and age (pruning reads names, manifests and kinds)."""
    when = NOW - age
    name = format_name(kind, when)
    directory = settings.BACKUP_ROOT / name
    directory.mkdir(parents=True)
    if complete:
        (directory / "manifest.json").write_text(
            json.dumps(
                {
                    "format": 1,
                    "timestamp": when.isoformat(),
                    "kind": kind,
                    "engine": "sqlite",
                    "db_revision": "0" * 12,
                    "migrations": {},
                    "db_size": 1,
                    "workspace_path": "/w",
                    "app_version": "0",
                    "files": {"sqlite.db.gz": {"size": 1, "sha256": "0" * 64}},
                }
            )
        )
    Backup.objects.create(name=name, kind=kind, status="succeeded", created_at=when)
    return name


def stored() -> set[str]:
    return {p.name for p in settings.BACKUP_ROOT.iterdir()}


@pytest.fixture
def frozen():
    with time_machine.travel(NOW, tick=False):
        yield


def test_it_removes_auto_and_cli_backups_past_retention_oldest_first(db, frozen):
    settings.BACKUP_RETENTION_DAYS = 7
    old_cli = fake_backup("cli", timedelta(days=10))
    old_auto = fake_backup("auto", timedelta(days=8))
    fresh = fake_backup("cli", timedelta(days=6, hours=23))
    assert operations.backup_prune() == [old_cli, old_auto]
    assert stored() == {fresh}
    assert set(Backup.objects.values_list("name", flat=True)) == {fresh}


def test_it_keeps_one_just_inside_retention(db, frozen):
    settings.BACKUP_RETENTION_DAYS = 3
    inside = fake_backup("auto", timedelta(days=3) - timedelta(seconds=1))
    newer = fake_backup("auto", timedelta(hours=1))
    assert operations.backup_prune() == []
    assert stored() == {inside, newer}


def test_it_never_removes_manual_backups(db, frozen):
    ancient = fake_backup("manual", timedelta(days=400))
    newer = fake_backup("cli", timedelta(hours=1))
    assert operations.backup_prune() == []
    assert stored() == {ancient, newer}


def test_it_never_removes_the_newest_succeeded_backup_whatever_its_age(db, frozen):
    older = fake_backup("cli", timedelta(days=30))
    newest = fake_backup("auto", timedelta(days=20))
    assert operations.backup_prune() == [older]
    assert stored() == {newest}


def test_an_incomplete_newer_one_does_not_shield_nor_replace_the_newest_good_one(db, frozen):
    good = fake_backup("cli", timedelta(days=30))
    broken = fake_backup("cli", timedelta(days=20), complete=False)
    assert operations.backup_prune() == [broken]
    assert stored() == {good}


def test_the_backup_command_prunes_and_prints_what_it_removed(demo):
    with time_machine.travel(NOW, tick=False):
        old = fake_backup("cli", timedelta(days=9))
    with time_machine.travel(NOW + timedelta(seconds=5), tick=True):
        out = io.StringIO()
        call_command("backup", stdout=out)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("✓ pruned ") and line.split()[2].endswith(old) for line in lines)
    assert old not in stored()


def test_no_prune_keeps_everything(demo):
    with time_machine.travel(NOW, tick=False):
        old = fake_backup("cli", timedelta(days=9))
    with time_machine.travel(NOW + timedelta(seconds=5), tick=True):
        call_command("backup", "--no-prune", stdout=io.StringIO())
    assert old in stored()
