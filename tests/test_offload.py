"""Off-host copies against a real S3 endpoint on loopback (moto's server, credentials checked):
the copy after a backup, its failures and retries, where the list says a backup lives, restore
from the bucket, the catalog rebuilt from it, and retention in the bucket."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.helpers import subprocess_env, tree
from tests.integration import worker
from tests.test_interruptions import STOP_WITHIN_SECONDS, big_workspace, interrupt, start, wait_for
from tests.test_restore_command import change_everything, live_state
from trusca.backups import manifest, operations, store, tasks
from trusca.backups.models import Backup
from trusca.backups.naming import format_name
from trusca.backups.store.s3 import S3Store
from trusca.portal.models import AuditEvent

pytest_plugins = ["tests.s3server"]  # the s3 and s3_server fixtures
# A real worker, for the one test that needs it (after s3, so that it inherits the bucket).
celery_worker = worker.celery_worker

NOW = datetime(2026, 5, 20, 3, 0, 0, tzinfo=UTC)


def run(*args) -> tuple[list[str], list[str]]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue().splitlines(), err.getvalue().splitlines()


def backup(*extra) -> tuple[str, list[str], list[str]]:
    out, err = run("backup", "--no-prune", *extra)
    return Path(out[-1]).name, out, err


def objects(s3, prefix: str = "backups/") -> dict[str, dict]:
    """Every object under the prefix, with its HEAD (storage class, metadata)."""
    client = s3.client()
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.head_object(Bucket=s3.bucket, Key=o["Key"]) for o in listed}


def uploads(s3) -> list:
    return s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])


def body(s3, key: str) -> bytes:
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def row(name: str) -> Backup:
    return Backup.objects.get(name=name)


def secrets_of(s3) -> list[str]:
    return [s3.portal.secret_key, os.environ["AWS_SECRET_ACCESS_KEY"]]


# The copy after a backup ------------------------------------------------------------------------


def test_a_cli_backup_is_copied_whole_with_its_storage_class_and_each_files_sha256(demo, s3):
    name, out, err = backup()
    assert err == []
    assert f"✓ copied {name} to s3://{s3.bucket}/backups/{name}/" in "\n".join(out)
    assert out[-1].endswith(name), "the last line is still the backup's path"
    local = store.local().path(name)
    stored = objects(s3)
    assert sorted(stored) == sorted(f"backups/{name}/{f.name}" for f in local.iterdir())
    for path in local.iterdir():
        key = f"backups/{name}/{path.name}"
        assert stored[key]["StorageClass"] == "STANDARD_IA"
        assert stored[key]["Metadata"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert body(s3, key) == path.read_bytes()
    copied = row(name)
    assert (copied.status, copied.location, copied.offsite, copied.offsite_progress) == (
        "succeeded",
        "both",
        "copied",
        100,
    )
    assert AuditEvent.objects.filter(action="backup.offloaded", target=name).exists()


def test_no_offload_keeps_it_on_this_host_until_offload_missing_copies_it(demo, s3):
    name, out, err = backup("--no-offload")
    assert objects(s3) == {} and row(name).location == "local"
    out, err = run("offload", "--missing")
    assert out[0].startswith(f"✓ copied {name} to s3://") and out[-1] == f"Copy complete: s3://{s3.bucket}/backups/"
    assert row(name).location == "both"
    out, _ = run("offload", "--missing")
    assert out == [f"Nothing to copy: the bucket holds every backup it should (s3://{s3.bucket}/backups/)"]


@pytest.mark.parametrize(
    ("problem", "says"),
    [
        ("wrong secret", "S3 refused the credentials for bucket"),
        ("missing bucket", "does not exist at http://127.0.0.1"),
        ("endpoint down", "could not be reached"),
    ],
)
def test_a_failed_copy_says_why_in_one_line_without_a_secret_and_the_backup_stays_good(
    demo, s3, settings, monkeypatch, problem, says
):
    wrong = "wrong-secret-0123456789abcdefghijklmnopqrstu"
    if problem == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    elif problem == "missing bucket":
        settings.BACKUP_S3_BUCKET = "trusca-no-such-bucket"
    else:
        settings.BACKUP_S3_ENDPOINT_URL = s3.unreachable_url()
    started = time.monotonic()
    name, out, err = backup()  # no CommandError: the backup succeeded
    assert time.monotonic() - started < 30
    assert out[-2:] == ["Backup complete", out[-1]] and out[-1].endswith(name)
    assert len(err) == 2 and err[0].startswith(f"! copy to S3 failed for {name}: ") and says in err[0]
    assert err[1].startswith("! The backups themselves are good.")
    failed = row(name)
    assert (failed.status, failed.location, failed.offsite) == ("succeeded", "local", "failed")
    assert says in failed.offsite_message and "\n" not in failed.offsite_message
    audited = json.dumps(list(AuditEvent.objects.values_list("detail", flat=True)))
    shown = "\n".join([*out, *err, failed.offsite_message, audited])
    for secret in [*secrets_of(s3), wrong]:
        assert secret not in shown
    assert store.local().path(name).is_dir()


def test_a_failed_copy_is_retried_from_the_list_once_the_endpoint_is_back(demo, s3, settings, superuser, monkeypatch):
    settings.BACKUP_S3_ENDPOINT_URL = s3.unreachable_url()
    name, _, err = backup()
    assert "could not be reached" in err[0]
    settings.BACKUP_S3_ENDPOINT_URL = s3.endpoint_url
    sent = []
    monkeypatch.setattr(tasks.offload_backup, "delay", lambda *args: sent.append(args))
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(superuser)
    page = browser.get(reverse("backups:index"))
    assert "copy to S3 failed" in page.content.decode() and "Retry copy" in page.content.decode()
    retry = reverse("backups:offload", args=[row(name).pk])
    assert browser.post(retry).status_code == 403  # no CSRF token
    assert row(name).offsite == "failed" and sent == []

    token = str(page.context["csrf_token"])
    response = browser.post(retry, {"csrfmiddlewaretoken": token}, headers={"accept": "application/json"})
    assert response.status_code == 202
    assert response.json()["offsite"]["state"] == "pending"
    assert sent == [(name, "root")]
    assert AuditEvent.objects.filter(action="backup.offload_requested", target=name, actor="root").exists()
    tasks.offload_backup(name, "root")  # what the worker runs
    assert row(name).location == "both"
    assert f"backups/{name}/manifest.json" in objects(s3)


def test_a_copy_killed_midway_is_never_listed_and_the_next_copy_starts_clean(demo, s3, settings):
    name, _, _ = backup("--no-offload")
    env = subprocess_env(TRUSCA_TEST_KILL_AT="offload-after-a-file")
    killed = subprocess.run(
        [sys.executable, "manage.py", "offload", name], cwd=settings.BASE_DIR, env=env, capture_output=True, check=False
    )
    assert killed.returncode == -9
    sent = set(objects(s3))
    assert sent and f"backups/{name}/manifest.json" not in sent, "files went before the kill, the manifest did not"
    assert store.remote().names() == {}, "without its manifest the bucket does not list it"
    assert row(name).offsite == "copying"
    err = io.StringIO()
    with pytest.raises(CommandError, match="1 copy failed"):
        call_command("offload", name, stdout=io.StringIO(), stderr=err)
    assert f"{name} is already being copied" in err.getvalue()
    operations.offsite_prune()
    assert set(objects(s3)) == sent, "the bucket's tidying never touches a copy that may be alive"

    settings.BACKUP_STALE_SECONDS = 1
    time.sleep(1.1)
    assert operations.sweep() == [f"marked failed: the off-host copy of {name} (its process died)"]
    assert "its process died" in row(name).offsite_message
    operations.offsite_prune()
    assert objects(s3) == {} and uploads(s3) == [], "what the dead copy left is removed"
    run("offload", name)
    assert sorted(objects(s3)) == sorted(f"backups/{name}/{f.name}" for f in store.local().path(name).iterdir())
    assert uploads(s3) == []


def test_the_files_of_a_backup_go_to_the_bucket_at_once(demo, s3):
    name, _, _ = backup("--no-offload")
    remote = store.remote()
    together = threading.Barrier(2, timeout=10)

    def file_sent(request, **_):
        if not request.url.endswith(manifest.MANIFEST):
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait()  # both files on the wire at the same time

    remote.client.meta.events.register("before-send.s3.PutObject", file_sent)
    operations.offload_backup(name=name, remote=remote)
    assert not together.broken, "the second file was not sent before the first one was in the bucket"
    assert remote.names() == {name: sum(f.stat().st_size for f in store.local().path(name).iterdir())}


def test_an_interrupted_copy_stops_every_file_and_is_never_listed(demo, s3):
    big_workspace(96)
    name, _, _ = backup("--no-offload")
    proc = start("offload", name)
    wait_for(lambda: uploads(s3), proc, "the archive's multipart upload")
    out, err, took = interrupt(proc, signal.SIGINT)
    assert proc.returncode == 130 and took < STOP_WITHIN_SECONDS
    assert err.strip().splitlines()[-1] == (
        "Copy interrupted: the backups on this host are untouched; the unfinished copy is not listed in the bucket."
    )
    assert "Traceback" not in out + err
    assert store.remote().names() == {}
    assert uploads(s3) == [], "every file's upload was aborted"
    run("offload", name)  # the next copy starts at once, from a clean slate
    assert sorted(objects(s3)) == sorted(f"backups/{name}/{f.name}" for f in store.local().path(name).iterdir())


def test_a_file_damaged_on_this_disk_is_never_copied(demo, s3):
    name, _, _ = backup("--no-offload")
    archive = store.local().path(name) / "workspace.tar.gz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(CommandError, match="1 copy failed"):
        run("offload", name)
    assert "does not match its manifest's sha256" in row(name).offsite_message
    assert objects(s3) == {} and uploads(s3) == []


def test_retention_and_delete_wait_for_a_running_copy(demo, s3, settings):
    name, _, _ = backup("--no-offload")
    settings.BACKUP_RETENTION_DAYS = 1
    with time_machine.travel(timezone.now() + timedelta(days=3)):
        later, _, _ = backup("--no-offload")  # the newest: retention may take the one being copied
        Backup.objects.filter(name=name).update(offsite="copying", offsite_heartbeat_at=timezone.now())
        assert operations.backup_prune() == []
        assert store.local().path(name).is_dir() and row(name).local
        with pytest.raises(operations.OperationFailed, match="is being copied to the bucket"):
            operations.backup_delete(backup=row(name), actor="root")
        assert store.local().path(name).is_dir()
        with pytest.raises(operations.CopyInProgress):
            operations.offload_backup(name=name)

    Backup.objects.filter(name=name).update(offsite="")
    operations.offload_backup(name=name)
    with time_machine.travel(timezone.now() + timedelta(days=3)):
        assert operations.backup_prune() == [name]
    assert not store.local().path(name).exists()
    assert row(name).location == "s3", "pruned from the disk, still listed in the bucket"


def test_delete_removes_a_backup_from_the_disk_and_the_bucket(demo, s3, su_client):
    name, _, _ = backup()
    response = su_client.get(reverse("backups:delete", args=[row(name).pk]))
    assert "this host's disk and the bucket (S3)" in response.content.decode()
    su_client.post(reverse("backups:delete", args=[row(name).pk]))
    assert not Backup.objects.filter(name=name).exists()
    assert objects(s3) == {} and not store.local().path(name).exists()


# The README's IAM policy ------------------------------------------------------------------------


def test_the_readmes_least_privilege_policy_is_enough_for_every_bucket_operation(
    demo, s3_least_privilege, drop_tables_made_after_backup
):
    """Every call the portal makes, with credentials holding exactly the README's policy (moto
    checks each request's action and resource ARN against it): a right missing there would fail
    here as AccessDenied."""
    s3 = s3_least_privilege
    hand = s3.client(s3.least)
    before = live_state()
    name, _, _ = backup()
    assert row(name).offsite == "copied", row(name).offsite_message

    cut_short = "auto-20260101T000000Z"  # what a killed copy leaves: a file sent, a part in flight
    hand.put_object(Bucket=s3.bucket, Key=f"backups/{cut_short}/postgres.sql.gz", Body=b"partial")
    hand.create_multipart_upload(Bucket=s3.bucket, Key=f"backups/{cut_short}/workspace.tar.gz")
    assert operations.offsite_prune() == []
    assert sorted(objects(s3)) == sorted(f"backups/{name}/{f.name}" for f in store.local().path(name).iterdir())
    assert uploads(s3) == []

    shutil.rmtree(store.local().path(name))
    run("sync_backups")
    assert row(name).location == "s3"
    run("verify_backup", name)
    change_everything()
    out, _ = run("restore", name, "--yes")
    assert out[-1] == "Restore complete"
    assert live_state() == before

    safety = Backup.objects.get(kind="pre_restore").name
    run("offload", safety)
    with time_machine.travel(timezone.now() + timedelta(days=365)):
        assert operations.offsite_prune() == [name], "retention in the bucket removes the older one"
    operations.backup_delete(backup=row(safety), actor="root")
    assert objects(s3) == {} and uploads(s3) == []


# Restore from the bucket ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["a flipped byte, metadata kept", "replaced by hand, no metadata"])
def test_a_damaged_copy_in_the_bucket_is_refused_before_anything_changes(
    demo, s3, damage, drop_tables_made_after_backup
):
    name, _, _ = backup()
    shutil.rmtree(store.local().path(name))
    change_everything()
    before = live_state()
    key = f"backups/{name}/workspace.tar.gz"
    data = bytearray(body(s3, key))
    data[len(data) // 2] ^= 0xFF
    metadata = objects(s3)[key]["Metadata"] if damage.endswith("kept") else {}
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(data), Metadata=metadata)

    with pytest.raises(CommandError) as refused:
        run("restore", name, "--yes")
    message = str(refused.value)
    assert message.endswith("Nothing was changed.") and "\n" not in message
    assert "workspace.tar.gz" in message
    assert "damaged" in message if damage.endswith("kept") else "does not match its sha256" in message
    assert live_state() == before
    assert not list(settings.BACKUP_ROOT.glob(".partial-*")), "the download was removed"
    assert not Backup.objects.filter(kind="pre_restore").exists()


def test_a_backup_only_in_the_bucket_is_downloaded_and_restored_from_its_s3_url(
    demo, s3, su_client, drop_tables_made_after_backup
):
    before = live_state()
    name, _, _ = backup()
    shutil.rmtree(store.local().path(name))
    run("sync_backups")
    assert row(name).location == "s3"
    bundle = b"".join(su_client.get(reverse("backups:download", args=[row(name).pk])).streaming_content)
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        assert tar.extractfile("manifest.json").read() == body(s3, f"backups/{name}/manifest.json")

    change_everything()
    out, _ = run("restore", f"s3://{s3.bucket}/backups/{name}", "--yes")
    assert out[0] == f"✓ downloaded s3://{s3.bucket}/backups/{name}/"
    assert out[-1] == "Restore complete"
    assert live_state() == before
    assert row(name).location == "s3", "the catalog rebuilt after the restore reads the bucket"
    assert Backup.objects.get(kind="pre_restore").location == "local"
    assert not list(settings.BACKUP_ROOT.glob(".partial-*"))


def test_a_name_in_neither_place_or_a_bad_url_is_refused_in_words(db, s3):
    with pytest.raises(
        CommandError, match=r"no backup named auto-20260101T000000Z on this host's disk .* nor in s3://"
    ):
        run("restore", "auto-20260101T000000Z", "--yes")
    for url in (f"s3://{s3.bucket}/backups/../etc", f"s3://AKIA:pasted-secret@{s3.bucket}/backups/2026-05-09-030000"):
        with pytest.raises(CommandError, match="is not s3://BUCKET/PREFIX/NAME") as refused:
            run("restore", url, "--yes")
        assert "pasted-secret" not in str(refused.value)


# The list and the catalog -----------------------------------------------------------------------


def make_row(name: str, **fields) -> Backup:
    values = {"kind": "manual", "status": "succeeded", "created_at": timezone.now(), "db_revision": "0" * 12} | fields
    return Backup.objects.create(name=name, **values)


def test_the_list_shows_where_each_backup_lives_and_the_copys_state(db, settings, superuser, staff_client, client):
    settings.BACKUP_S3_BUCKET = "trusca-list"
    make_row("manual-20260101T000000Z")
    make_row("manual-20260102T000000Z", offsite="copied", offsite_at=timezone.now())
    make_row("manual-20260103T000000Z", local=False, offsite="copied", offsite_at=timezone.now())
    make_row("manual-20260104T000000Z", offsite="copying", offsite_progress=40, offsite_heartbeat_at=timezone.now())
    make_row("manual-20260105T000000Z", offsite="failed", offsite_message="S3 at AWS could not be reached (…)")
    listed = {b["name"]: b for b in staff_client.get(reverse("backups:list")).json()["backups"]}
    assert {name: (b["location"], b["offsite"]["state"]) for name, b in listed.items()} == {
        "manual-20260101T000000Z": ("local", "none"),
        "manual-20260102T000000Z": ("both", "copied"),
        "manual-20260103T000000Z": ("s3", "copied"),
        "manual-20260104T000000Z": ("local", "copying"),
        "manual-20260105T000000Z": ("local", "failed"),
    }
    assert listed["manual-20260104T000000Z"]["offsite"]["progress"] == 40
    assert listed["manual-20260105T000000Z"]["offsite"]["message"] == "S3 at AWS could not be reached (…)"
    page = staff_client.get(reverse("backups:index")).content.decode()
    for shown in ("local + S3", "S3 only", "copying to S3 · 40%", "copy to S3 failed", "could not be reached"):
        assert shown in page
    assert "Retry copy" not in page, "staff read; only superusers act"
    client.force_login(superuser)
    page = client.get(reverse("backups:index")).content.decode()
    assert page.count("Retry copy") == 1 and page.count("Copy to S3") == 1


def fake_backup_in(remote: S3Store, name: str, *, manifest_bytes: bytes | None = None) -> None:
    """A published backup in the bucket with one small file (the catalog and retention read
    names, manifests and kinds)."""
    data = name.encode()
    with remote.open_write(name, "sqlite.db.gz", sha256=hashlib.sha256(data).hexdigest()) as upload:
        upload.write(data)
    if manifest_bytes is None:
        from trusca.backups.naming import parse_name

        parsed = parse_name(name)
        manifest_bytes = manifest.Manifest(
            timestamp=parsed.timestamp,
            kind=parsed.kind,
            engine="sqlite",
            db_revision="0123456789ab",
            migrations={},
            db_size=1,
            workspace_path="/w",
            app_version="test",
            files={"sqlite.db.gz": manifest.FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())},
        ).to_json()
    remote.publish(name, manifest_bytes)


def test_sync_backups_finds_the_buckets_backups_and_says_when_it_cannot(transactional_db, s3, settings):
    remote = store.remote()
    demo_name, broken = "auto-20260101T000000Z", "auto-20260102T000000Z"
    fake_backup_in(remote, demo_name)
    data = b"x"
    with remote.open_write(broken, "sqlite.db.gz", sha256=hashlib.sha256(data).hexdigest()) as upload:
        upload.write(data)
    s3.client().put_object(Bucket=s3.bucket, Key=f"backups/{broken}/manifest.json", Body=b"{not json")
    out, _ = run("sync_backups")
    assert out[0].startswith(f"✓ {demo_name}  auto  2026-01-01 00:00:00 UTC") and out[0].endswith("S3")
    assert out[1].startswith(f"! {broken} (in the bucket): ")
    assert out[-1] == f"1 backup(s): 0 on this host only, 1 in s3://{s3.bucket}/backups/ only, 0 in both"
    assert (row(demo_name).location, row(demo_name).kind) == ("s3", "auto")
    assert row(broken).status == "failed" and "unreadable in the bucket" in row(broken).message

    settings.BACKUP_S3_ENDPOINT_URL = s3.unreachable_url()
    with pytest.raises(CommandError, match="the bucket could not be read"):
        run("sync_backups")
    assert row(demo_name).location == "s3", "a bucket that cannot be read changes nothing"


@pytest.fixture
def frozen():
    with time_machine.travel(NOW, tick=False):
        yield


def local_fake(name: str) -> None:
    from tests.test_prune import fake_backup
    from trusca.backups.naming import parse_name

    parsed = parse_name(name)
    assert fake_backup(parsed.kind, NOW - parsed.timestamp) == name


def test_retention_in_the_bucket_keeps_its_own_days_the_kinds_asked_for_and_the_newest(
    transactional_db, s3, settings, frozen
):
    settings.BACKUP_RETENTION_DAYS, settings.BACKUP_S3_RETENTION_DAYS = 7, 30
    remote = store.remote()

    def at(kind: str, days: float) -> str:
        return format_name(kind, NOW - timedelta(days=days))

    expired = [at("cli", 45), at("pre_restore", 40), at("auto", 31)]
    kept = [at("manual", 90), at("uploaded", 60), at("auto", 29), at("cli", 10), at("auto", 2)]
    for name in [*expired, *kept]:
        fake_backup_in(remote, name)
    local_fake(at("auto", 31))  # on this disk too: past both retentions
    local_fake(at("cli", 10))  # on this disk too: past the local retention only
    local_fake(at("auto", 2))  # on this disk too: the newest
    operations.catalog_sync()

    assert operations.offsite_prune() == expired, "oldest first"
    assert set(remote.names()) == set(kept)
    assert not Backup.objects.filter(name__in=expired[:2]).exists(), "gone from everywhere: no row"
    assert row(at("auto", 31)).location == "local" and "BACKUP_S3_RETENTION_DAYS" in row(at("auto", 31)).offsite_message
    assert operations.backup_prune() == [at("auto", 31), at("cli", 10)]
    assert row(at("cli", 10)).location == "s3", "the bucket keeps it past the local retention"
    assert operations.offload_missing().copied == [], "nothing expired is copied again"

    with time_machine.travel(NOW + timedelta(days=365), tick=False):
        assert operations.offsite_prune() == [at("auto", 29), at("cli", 10)]
    assert set(remote.names()) == {at("manual", 90), at("uploaded", 60), at("auto", 2)}, "the newest stays"


# The worker ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_an_admin_backup_is_copied_by_the_worker(s3, celery_worker, su_client):
    response = su_client.post(reverse("backups:run"), headers={"accept": "application/json"})
    status_url = response.json()["status_url"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = su_client.get(status_url).json()
        if state["status"] == "failed" or state["offsite"]["state"] in ("copied", "failed"):
            break
        time.sleep(0.2)
    assert (state["status"], state["location"], state["offsite"]["state"]) == ("succeeded", "both", "copied"), state
    local = tree(store.local().path(state["name"]))
    assert {k.rsplit("/", 1)[1] for k in objects(s3)} == set(local)
    assert json.loads(body(s3, f"backups/{state['name']}/manifest.json"))["kind"] == "manual"


def test_a_download_whose_process_died_is_swept_and_a_live_ones_kept(db, settings):
    settings.BACKUP_ROOT.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    gone = settings.BACKUP_ROOT / f".partial-download-{host}-{dead.stdout.strip()}-0a1b2c3d"
    alive = settings.BACKUP_ROOT / f".partial-download-{host}-{os.getpid()}-0a1b2c3d"
    for directory in (gone, alive):
        (directory / "auto-20260101T000000Z").mkdir(parents=True)
    operations.sweep()
    assert not gone.exists() and alive.exists()


def test_the_copy_task_waits_while_a_restore_holds_maintenance_mode(db, s3):
    from celery.exceptions import Retry

    from trusca.backups import maintenance

    maintenance.enter("restoring auto-20260509T030000Z")
    try:
        with pytest.raises(Retry):
            tasks.offload_backup.apply(args=["auto-20260509T030000Z"], throw=True)
    finally:
        maintenance.leave()


def test_the_weekly_check_reads_the_buckets_copies_back_and_the_health_page_says_a_copy_failed(demo, s3, client):
    from trusca.backups import health
    from trusca.backups.operations import reverify

    name, _, _ = backup()
    assert {c.id: c for c in health.run_checks().checks}["offsite"].state == health.OK
    key = f"backups/{name}/workspace.tar.gz"
    data = bytearray(body(s3, key))
    data[len(data) // 3] ^= 0xFF
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(data), Metadata=objects(s3)[key]["Metadata"])

    report = reverify.reverify_stored()
    assert name in report.intact  # the copy on this host's disk
    assert [damaged for damaged, _why in report.damaged] == [f"{name} (S3)"]
    assert row(name).offsite == Backup.Offsite.FAILED
    assert row(name).offsite_message.startswith("damaged in the bucket")
    offsite = {c.id: c for c in health.run_checks().checks}["offsite"]
    assert offsite.state == health.FAILING and "copy of the latest backup failed" in offsite.detail
    out, _ = run("offload", "--missing")  # the copy from this host's disk replaces the damaged one
    assert row(name).offsite == Backup.Offsite.COPIED
    assert reverify.reverify_stored().damaged == []
