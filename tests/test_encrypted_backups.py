"""Encryption at rest, end to end: backups written encrypted from the first byte, that gpg opens
by hand, that restore decrypts on the fly, and that a wrong key or an altered byte never gets
past preflight."""

import io
import json
import os
import subprocess
import sys
import time

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection

from tests.helpers import backup_dirs, dump_name, subprocess_env
from tests.test_restore_command import change_everything, live_state, restore, run

pytestmark = pytest.mark.usefixtures("drop_tables_made_after_backup")
PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def passphrase(settings):
    settings.BACKUP_ENCRYPTION_PASSPHRASE = PASSPHRASE


@pytest.fixture(autouse=True)
def operator_gpg(settings):
    """The GnuPG home the operator's gpg runs in for these tests; the agent gpg starts there
    is stopped afterwards, so none outlives the test."""
    yield
    subprocess.run(["gpgconf", "--homedir", str(settings.VAR_DIR), "--kill", "gpg-agent"], capture_output=True)


@pytest.fixture
def recipient(settings, alice):
    settings.BACKUP_ENCRYPTION_RECIPIENTS = alice.public
    return alice


def encrypted_backup():
    lines = run("backup", "--no-prune")
    [directory] = [d for d in backup_dirs() if d.name == os.path.basename(lines[-1])]
    return directory


def gpg_decrypt(path, passphrase: str = PASSPHRASE) -> bytes:
    return subprocess.run(
        ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0", "--decrypt", str(path)],
        input=passphrase.encode(),
        capture_output=True,
        check=True,
        env={**os.environ, "GNUPGHOME": str(settings.VAR_DIR)},
    ).stdout


def test_a_passphrase_backup_round_trips_and_gpg_opens_each_file_by_hand(demo, passphrase, tmp_path):
    before = live_state()
    backup = encrypted_backup()
    names = sorted(p.name for p in backup.iterdir())
    assert names == sorted(["manifest.json", f"{dump_name()}.gpg", "workspace.tar.gz.gpg"])
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["encryption"]["cipher"] == "AES256" and manifest["encryption"]["passphrase"] is True
    assert PASSPHRASE not in (backup / "manifest.json").read_text()
    for name in (f"{dump_name()}.gpg", "workspace.tar.gz.gpg"):
        plain = tmp_path / name.removesuffix(".gpg")
        plain.write_bytes(gpg_decrypt(backup / name))
        subprocess.run(["gunzip", "-t", str(plain)], check=True)
        assert len(plain.read_bytes()) == manifest["files"][name]["plain_size"]
    change_everything()
    restore(backup, "--no-safety-backup")
    assert live_state() == before


def test_the_decrypted_dump_loads_by_hand(demo, passphrase, tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL engine only")
    backup = encrypted_backup()
    (tmp_path / "postgres.sql.gz").write_bytes(gpg_decrypt(backup / "postgres.sql.gz.gpg"))
    db = settings.DATABASES["default"]
    scratch = f"{db['NAME']}_decrypted"
    env = {**os.environ, "PGHOST": db["HOST"] or "", "PGPORT": str(db["PORT"] or ""), "PGUSER": db["USER"] or ""}
    subprocess.run(["dropdb", "--if-exists", scratch], env=env, check=True)
    subprocess.run(["createdb", scratch], env=env, check=True)
    try:
        subprocess.run(
            f"gunzip -c {tmp_path}/postgres.sql.gz | psql -q -v ON_ERROR_STOP=1 -d {scratch}",
            shell=True,
            env=env,
            check=True,
            capture_output=True,
        )
        count = subprocess.run(
            ["psql", "-tAc", "SELECT count(*) FROM portal_project", "-d", scratch],
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        assert int(count) > 0
    finally:
        subprocess.run(["dropdb", "--if-exists", scratch], env=env, check=True)


def test_a_recipient_key_backup_round_trips_with_the_private_key_given_for_the_restore(
    demo, recipient, tmp_path, settings
):
    before = live_state()
    backup = encrypted_backup()
    assert json.loads((backup / "manifest.json").read_text())["encryption"]["recipients"] == [recipient.fingerprint]
    change_everything()
    changed = live_state()
    with pytest.raises(CommandError, match="no key given opens it.*--decryption-key.*Nothing was changed"):
        restore(backup)
    assert live_state() == changed
    key = tmp_path / "private.asc"
    key.write_text(recipient.secret)
    settings.BACKUP_DECRYPTION_KEY_PASSPHRASE = recipient.passphrase
    restore(backup, "--no-safety-backup", "--decryption-key", str(key))
    assert live_state() == before


def test_a_wrong_passphrase_a_missing_key_and_an_altered_byte_are_refused_before_anything_changes(
    demo,
    passphrase,
    bob,
    tmp_path,
    settings,
):
    backup = encrypted_backup()
    change_everything()
    before = live_state()
    settings.BACKUP_ENCRYPTION_PASSPHRASE = "not the passphrase"
    with pytest.raises(CommandError, match=r"wrong passphrase or key for .*\.gpg.*Nothing was changed"):
        restore(backup)
    key = tmp_path / "bob.asc"
    key.write_text(bob.secret)
    settings.BACKUP_DECRYPTION_KEY_PASSPHRASE = bob.passphrase
    with pytest.raises(CommandError, match=r"wrong passphrase or key.*Nothing was changed"):
        restore(backup, "--decryption-key", str(key))
    settings.BACKUP_ENCRYPTION_PASSPHRASE = PASSPHRASE
    data = bytearray((backup / "workspace.tar.gz.gpg").read_bytes())
    data[len(data) // 2] ^= 1
    (backup / "workspace.tar.gz.gpg").write_bytes(bytes(data))
    with pytest.raises(
        CommandError, match="workspace.tar.gz.gpg (does not match its sha256|was altered).*Nothing was changed"
    ):
        restore(backup)
    assert live_state() == before
    assert [p for p in backup_dirs() if p.name.startswith("pre-restore-")] == []


def test_a_backup_encrypted_by_hand_the_manuals_way_restores_with_the_passphrase(demo, settings):
    before = live_state()
    backup = encrypted_backup()  # plain: no encryption setting yet
    for name in (dump_name(), "workspace.tar.gz"):
        subprocess.run(
            ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0", "--symmetric"]
            + ["--cipher-algo", "AES256", str(backup / name)],
            input=PASSPHRASE.encode(),
            check=True,
            capture_output=True,
            env={**os.environ, "GNUPGHOME": str(settings.VAR_DIR)},
        )
        (backup / name).unlink()
    change_everything()
    with pytest.raises(CommandError, match="encrypted.*no key given opens it"):
        restore(backup)
    settings.BACKUP_ENCRYPTION_PASSPHRASE = PASSPHRASE
    restore(backup, "--no-safety-backup")
    assert live_state() == before


def test_an_encrypted_bundle_restores(demo, passphrase, tmp_path, settings):
    before = live_state()
    run("backup", "--no-prune", "--bundle")
    [directory] = backup_dirs()
    bundle = directory.with_name(f"{directory.name}.tar.gz")
    sealed = tmp_path / f"{directory.name}.tar.gz.gpg"
    subprocess.run(
        ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0", "--symmetric"]
        + ["--cipher-algo", "AES256", "--output", str(sealed), str(bundle)],
        input=PASSPHRASE.encode(),
        check=True,
        capture_output=True,
        env={**os.environ, "GNUPGHOME": str(settings.VAR_DIR)},
    )
    change_everything()
    restore(sealed, "--no-safety-backup")
    assert live_state() == before


def test_no_plaintext_ever_reaches_the_disk_while_an_encrypted_backup_is_written(demo, passphrase):
    from tests.test_interruptions import big_workspace

    big_workspace(128)
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "backup", "--no-prune"],
        env=subprocess_env(BACKUP_ENCRYPTION_PASSPHRASE=PASSPHRASE),
        cwd=settings.BASE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen: dict[str, bytes] = {}
    while proc.poll() is None:
        for staging in settings.BACKUP_ROOT.glob(".partial-*"):
            for path in staging.iterdir():
                try:
                    with open(path, "rb") as fh:
                        seen.setdefault(path.name, fh.read(2))
                except FileNotFoundError:
                    continue
        time.sleep(0.01)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert set(seen) <= {f"{dump_name()}.gpg", "workspace.tar.gz.gpg", "manifest.json"}
    assert seen, "the staging directory was never seen"
    assert all(head != b"\x1f\x8b" for head in seen.values()), "a gzip (plaintext) file was on disk"
    assert PASSPHRASE.encode() not in out + err
    [backup] = backup_dirs()
    assert PASSPHRASE not in (backup / "manifest.json").read_text()
    call_command("verify_backup", str(backup), stdout=io.StringIO())


def test_the_admin_restores_a_backup_encrypted_to_a_key_with_the_key_given_for_that_restore_only(
    demo, recipient, su_client, monkeypatch
):
    from django.urls import reverse

    from trusca.backups import operations, tasks
    from trusca.backups.models import Backup

    before = live_state()
    backup = encrypted_backup()
    pk = Backup.objects.get(name=backup.name).pk
    change_everything()
    changed = live_state()
    queued: list[str] = []
    monkeypatch.setattr(tasks.run_restore, "delay", queued.append)
    restore_url = reverse("backups:restore_backup", args=[pk]) + "?confirmation=restore"
    gate = {"X-Confirm-Restore": "yes", "accept": "application/json"}

    form = "application/x-www-form-urlencoded"
    refused = su_client.post(restore_url, data="", content_type=form, headers=gate)
    assert refused.status_code == 422 and "no key given opens it" in refused.json()["detail"]
    held = su_client.post(
        reverse("backups:restore_keys"),
        data=json.dumps({"secret_key": recipient.secret, "key_passphrase": recipient.passphrase}),
        content_type="application/json",
    )
    assert held.status_code == 201
    token = held.json()["token"]
    accepted = su_client.post(restore_url, data="", content_type=form, headers={**gate, "X-Restore-Keys": token})
    assert accepted.status_code == 202, accepted.content
    assert live_state() == changed
    assert recipient.secret not in json.dumps(accepted.json())

    operations.restore_run_queued(restore_id=queued[0])  # what the worker runs
    assert live_state() == before
    with pytest.raises(operations.KeysExpired):  # held for that restore only
        operations.restore_jobs.held_keys(token)


def test_keys_held_for_a_restore_expire_and_are_asked_for_again(db, su_client, superuser):
    from django.urls import reverse

    from trusca.backups import operations

    token = operations.hold_keys(passphrase="for one restore")
    operations.forget_keys(token)
    bad = su_client.post(reverse("backups:restore_keys"), data="not json", content_type="application/json")
    assert bad.status_code == 400
    with pytest.raises(operations.KeysExpired, match="give them again"):
        operations.restore_jobs.held_keys(token)
