"""Backups are hostile until their signature and checksums say otherwise: unsigned and foreign
ones are refused unless trusted on purpose, bombs stop at the sizes the manifest records, and one
damaged manifest never changes another run's outcome."""

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from tests.helpers import backup_dirs, replace_member, rewrite_manifest
from tests.test_restore_command import change_everything, live_state, restore, take_backup
from trusca.backups import manifest
from trusca.backups.models import Backup

pytestmark = pytest.mark.usefixtures("drop_tables_made_after_backup")


def verify(path, *extra) -> list[str]:
    out = io.StringIO()
    call_command("verify_backup", str(path), *extra, stdout=out)
    return out.getvalue().splitlines()


def unsigned(backup: Path) -> None:
    document = json.loads((backup / "manifest.json").read_text())
    del document["signature"]
    (backup / "manifest.json").write_text(json.dumps(document))


# Signatures ------------------------------------------------------------------------------------


def test_an_unsigned_backup_is_refused_naming_the_risk_and_restored_only_when_trusted(demo):
    backup = take_backup()
    unsigned(backup)
    change_everything()
    before = live_state()
    with pytest.raises(CommandError, match="its manifest is unsigned.*runs with the portal's database rights.*"):
        restore(backup)
    assert live_state() == before
    with pytest.raises(CommandError, match="unsigned.*--trust-unsigned"):
        verify(backup)
    assert "Restore complete" in restore(backup, "--trust-unsigned", "--no-safety-backup")


def test_a_backup_signed_with_another_installations_key_is_refused(demo, settings):
    backup = take_backup()
    settings.BACKUP_SIGNING_KEY = "another installation's key"
    with pytest.raises(CommandError, match="signed with another installation's key"):
        restore(backup)


def test_a_rotated_key_kept_as_an_old_key_still_vouches(demo, settings):
    backup = take_backup()
    settings.BACKUP_SIGNING_OLD_KEYS = (settings.VAR_DIR / "backup_signing_key").read_text()
    settings.BACKUP_SIGNING_KEY = "the new key"
    assert any("signed with an older key of this installation" in line for line in verify(backup))


def test_verify_sign_vouches_for_an_unsigned_backup_after_checking_it_whole(demo):
    backup = take_backup()
    document = json.loads((backup / "manifest.json").read_text())
    for entry in document["files"].values():
        del entry["uncompressed_size"]  # as manifests made before the field
    del document["signature"]
    (backup / "manifest.json").write_text(json.dumps(document))
    lines = verify(backup, "--sign")
    assert "✓ signed with this installation's BACKUP_SIGNING_KEY" in lines
    signed = manifest.parse((backup / "manifest.json").read_bytes())
    assert signed.signature_state() == manifest.SignatureState.VALID
    assert all(entry.uncompressed_size for entry in signed.files.values())
    assert any("signed with this installation's key" in line for line in verify(backup))


def test_verify_sign_refuses_a_damaged_backup(demo):
    backup = take_backup()
    unsigned(backup)
    data = bytearray((backup / "workspace.tar.gz").read_bytes())
    data[len(data) // 2] ^= 1
    (backup / "workspace.tar.gz").write_bytes(bytes(data))
    with pytest.raises(CommandError, match="does not match its sha256"):
        verify(backup, "--sign")
    assert "signature" not in json.loads((backup / "manifest.json").read_text())


# Bombs -------------------------------------------------------------------------------------------


def zeros_archive(megabytes: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = megabytes << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    return buffer.getvalue()


def test_a_gzip_bomb_stops_at_the_size_its_manifest_records(demo):
    backup = take_backup()
    replace_member(backup, "workspace.tar.gz", zeros_archive(64))
    # The archive is replaced with one that inflates far beyond what the manifest says.
    rewrite_manifest(backup, lambda d: d["files"]["workspace.tar.gz"].__setitem__("uncompressed_size", 1 << 20))
    unsigned(backup)
    change_everything()
    before = live_state()
    with pytest.raises(CommandError, match="decompresses to more than the 1048576 bytes its manifest records"):
        restore(backup, "--trust-unsigned")
    assert live_state() == before
    with pytest.raises(CommandError, match="decompresses to more than"):
        verify(backup, "--trust-unsigned")


def test_a_restore_whose_staging_would_not_fit_is_refused_saying_how_much_is_needed(demo):
    backup = take_backup()
    huge = 1 << 50
    rewrite_manifest(backup, lambda d: d["files"]["workspace.tar.gz"].__setitem__("uncompressed_size", huge))
    before = live_state()
    with pytest.raises(CommandError, match=r"not enough free disk space: the restore needs about [\d,]+ MB"):
        restore(backup)
    assert live_state() == before


def test_preflight_refuses_what_does_not_fit_the_free_disk_space(demo, tmp_path):
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        for i in range(4):  # 4 MB of text that compresses well: the backup fits anywhere, its staging does not
            (settings.WORKSPACE_HOST_PATH / f"text{i}.txt").write_bytes(b"license text " * 80000)
        backup = take_backup()
        settings.WORKSPACE_HOST_PATH = small / "workspace"
        settings.WORKSPACE_HOST_PATH.mkdir()
        with pytest.raises(CommandError, match=r"not enough free disk space: the restore needs about [\d.,]+ MB"):
            restore(backup, "--no-safety-backup")
        assert list(small.iterdir()) == [settings.WORKSPACE_HOST_PATH]
    finally:
        subprocess.run(["umount", str(small)], check=True)


# Damaged manifests in BACKUP_ROOT ---------------------------------------------------------------

POISONS = {
    "deep nesting": b"[" * 200000 + b"]" * 200000,
    "a list where a string belongs": None,
    "a naive timestamp": None,
    "not an object": b'"just a string"',
    "garbage bytes": bytes(range(256)) * 8,
}


def poison(name: str, kind: str) -> None:
    directory = settings.BACKUP_ROOT / name
    directory.mkdir(parents=True)
    content = POISONS[kind]
    if content is None:
        good = json.loads(next(p for p in backup_dirs() if p.name != name).joinpath("manifest.json").read_text())
        if kind == "a list where a string belongs":
            good["kind"] = ["cli"]
        else:
            good["timestamp"] = "2026-01-01T00:00:00"
        content = json.dumps(good).encode()
    (directory / "manifest.json").write_bytes(content)


@pytest.mark.parametrize("kind", list(POISONS))
def test_a_damaged_manifest_beside_good_backups_changes_no_other_runs_outcome(demo, kind):
    good = take_backup()
    poison("2026-01-01-000000", kind)
    with pytest.raises(CommandError, match="is not a good backup"):
        verify(settings.BACKUP_ROOT / "2026-01-01-000000")
    out = io.StringIO()
    call_command("backup", stdout=out)  # prunes too: the damaged one is old
    assert out.getvalue().splitlines()[-2] == "Backup complete"
    change_everything()
    assert restore(good, "--no-safety-backup")[-1] == "Restore complete"
    damaged = Backup.objects.filter(name="2026-01-01-000000").first()
    assert damaged is None or damaged.status == "failed"


def test_a_manifest_of_another_shape_is_one_clear_error(demo):
    backup = take_backup()
    rewrite_manifest(backup, lambda d: None)
    document = json.loads((backup / "manifest.json").read_text())
    document["files"]["workspace.tar.gz"]["size"] = "twelve"
    (backup / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(CommandError, match='workspace.tar.gz size must be a whole number of bytes, not "twelve"'):
        verify(backup)


# What operators give as a source ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fault"),
    [
        (lambda tmp: tmp / "empty.tar.gz", "is an empty file, not a backup bundle"),
        (lambda tmp: tmp / "garbage.tar.gz", "is not a gzip file"),
        (lambda tmp: tmp / "emptydir", "manifest.json is missing"),
        (lambda tmp: Path("/dev/null"), "neither a backup directory nor a bundle file"),
    ],
)
def test_a_source_that_is_no_backup_is_named_before_asking_anything(
    transactional_db, tmp_path, monkeypatch, make, fault
):
    import sys

    (tmp_path / "empty.tar.gz").write_bytes(b"")
    (tmp_path / "garbage.tar.gz").write_bytes(b"u\x19" * 300)
    (tmp_path / "emptydir").mkdir()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal
    with pytest.raises(CommandError) as refused:
        call_command("restore", str(make(tmp_path)), stdout=io.StringIO())
    message = str(refused.value)
    assert fault in message
    assert message.endswith("Nothing was changed.")
    assert "no terminal" not in message and "b'" not in message and "\\x" not in message


def test_a_gzip_that_holds_no_tar_is_refused_in_words(transactional_db, tmp_path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(gzip.compress(b"not a tar at all" * 100))
    with pytest.raises(CommandError, match="the bundle does not read as a .tar.gz"):
        verify(bogus)
