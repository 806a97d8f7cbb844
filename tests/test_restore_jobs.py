"""Restoring from the admin, through its doors: an uploaded bundle or a listed backup is checked
as ``manage.py restore`` checks it before anything is queued, and the queued job runs the same
restore in the worker (here called in-process; tests/e2e runs it in a real Celery worker)."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from tests.helpers import fill_workspace, rewrite_manifest, tree
from tests.test_restore_command import with_member
from trusca.backups import bundle, locks, manifest, operations, store, tasks
from trusca.backups.models import Backup
from trusca.backups.operations import restore_jobs
from trusca.portal.models import AuditEvent, Project

pytestmark = pytest.mark.usefixtures("drop_tables_made_after_backup")


@pytest.fixture
def queued(monkeypatch) -> list[str]:
    """Stands in for the broker: the job ids handed to the Celery task."""
    ids: list[str] = []
    monkeypatch.setattr(tasks.run_restore, "delay", ids.append)
    return ids


@pytest.fixture
def era(demo, superuser) -> Backup:
    """A backup of the portal as it was: the demo data, a project of that time, root's password."""
    Project.objects.create(name="of-the-backups-era")
    return operations.backup_create(kind="manual", actor="root", prune=False).backup


def bundle_bytes(directory: Path) -> bytes:
    data = (directory / manifest.MANIFEST).read_bytes()
    source = store.DirectoryStore(directory)
    return b"".join(bundle.stream(source, directory.name, manifest.parse(data), data))


def edited_copy(backup: Backup, tmp_path: Path, edit) -> bytes:
    """The bundle of a copy of ``backup`` changed by ``edit(directory)`` and re-signed."""
    copy = tmp_path / "edited" / backup.name
    shutil.copytree(store.local().path(backup.name), copy)
    edit(copy)
    return bundle_bytes(copy)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(client, data: bytes, *, filename="bundle.tar.gz", trust=False, **extra):
    query = {"confirmation": "restore", "filename": filename} | ({"trust_unsigned": "yes"} if trust else {})
    return client.post(
        f"{reverse('backups:restore')}?{urlencode(query)}",
        data=data,
        content_type="application/octet-stream",
        headers={"x-confirm-restore": "yes", "accept": "application/json"},
        **extra,
    )


def restore_listed(client, backup: Backup):
    """As the page's fetch sends it: no body, the word in the query."""
    return client.post(
        f"{reverse('backups:restore_backup', args=[backup.pk])}?confirmation=restore",
        data=b"",
        content_type="application/octet-stream",
        headers={"x-confirm-restore": "yes", "accept": "application/json"},
    )


def stored() -> list[str]:
    """Everything under the backup root, hidden work-in-progress entries included."""
    root = settings.BACKUP_ROOT
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def assert_nothing_changed(before_stored: list[str], queued: list[str]) -> None:
    assert stored() == before_stored
    assert locks.current() is None
    assert queued == []
    assert not AuditEvent.objects.filter(action__in=["backup.uploaded", "backup.restore_requested"]).exists()


# Bad bundles: refused with the CLI's words before anything is queued, leaving nothing --------------


def truncated(era, tmp_path) -> bytes:
    whole = bundle_bytes(store.local().path(era.name))
    return whole[: len(whole) // 2]


def not_gzip(era, tmp_path) -> bytes:
    return b"PK\x03\x04" + b"\x00" * 4000


def foreign_tar(era, tmp_path) -> bytes:
    return tar_gz({"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"})


def climbing_bundle_member(era, tmp_path) -> bytes:
    return tar_gz({"../manifest.json": b"{}"})


def climbing_workspace_member(era, tmp_path) -> bytes:
    def edit(directory):
        member = tarfile.TarInfo("1/../../escaped.txt")
        member.size = 5
        with_member(directory, lambda tar: tar.addfile(member, io.BytesIO(b"owned")))

    return edited_copy(era, tmp_path, edit)


def newer_migrations(era, tmp_path) -> bytes:
    def edit(directory):
        rewrite_manifest(
            directory, lambda document: document["migrations"].__setitem__("portal", "0042_from_the_future")
        )

    return edited_copy(era, tmp_path, edit)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (truncated, "the bundle does not read as a .tar.gz"),
        (not_gzip, "is not a gzip file"),
        (foreign_tar, "the bundle holds an unexpected member 'etc/passwd'"),
        (climbing_bundle_member, "the bundle holds an unexpected member '../manifest.json'"),
        (climbing_workspace_member, "member '1/../../escaped.txt' contains '..'"),
        (newer_migrations, "taken by newer code: it has migrations this code does not know (portal.0042_from"),
    ],
)
def test_a_bad_bundle_is_refused_with_422_in_the_clis_words_and_leaves_nothing(
    era, su_client, queued, tmp_path, monkeypatch, make, words
):
    data = make(era, tmp_path)
    before_stored = stored()
    response = upload(su_client, data)
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["type"] == "urn:trustedoss:problem:restore_refused"
    assert words in body["detail"]
    assert body["detail"].endswith("Nothing was changed.")
    assert_nothing_changed(before_stored, queued)
    # The same bundle given to manage.py restore: the same words.
    monkeypatch.chdir(tmp_path)
    Path("bundle.tar.gz").write_bytes(data)
    with pytest.raises(CommandError) as refused:
        call_command("restore", "bundle.tar.gz", "--yes")
    assert str(refused.value) == f"Restore failed: {body['detail']}"


def test_a_bundle_no_key_of_this_installation_signed_needs_the_second_confirmation(era, su_client, queued, tmp_path):
    data = edited_copy(era, tmp_path, _unsign)
    before_stored = stored()
    response = upload(su_client, data)
    assert response.status_code == 422
    body = response.json()
    assert body["type"] == "urn:trustedoss:problem:backup_not_trusted"
    assert "its manifest is unsigned" in body["detail"]
    assert "SQL runs with the portal's database rights" in body["detail"]
    assert_nothing_changed(before_stored, queued)
    response = upload(su_client, data, trust=True)
    assert response.status_code == 202
    assert len(queued) == 1


def _unsign(directory: Path) -> None:
    path = directory / manifest.MANIFEST
    document = manifest.parse(path.read_bytes())
    path.write_bytes(manifest.from_document(document.unsigned_document()).to_json())


def test_an_upload_that_announces_more_than_it_sends_is_refused_and_removed(era, su_client, queued):
    data = bundle_bytes(store.local().path(era.name))
    before_stored = stored()
    response = upload(su_client, data, CONTENT_LENGTH=str(len(data) + 5000), **{"wsgi.input": io.BytesIO(data)})
    assert response.status_code == 400
    assert response.json()["type"] == "urn:trustedoss:problem:upload_incomplete"
    assert_nothing_changed(before_stored, queued)


class Counting(io.RawIOBase):
    def __init__(self, data: bytes):
        self.inner, self.read_bytes = io.BytesIO(data), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.inner.readinto(buffer)
        self.read_bytes += count
        return count


def test_a_body_without_a_length_is_read_to_its_end_when_the_server_ends_it(era, su_client, queued):
    data = bundle_bytes(store.local().path(era.name))
    body = {"wsgi.input": io.BytesIO(data), "wsgi.input_terminated": True}
    response = upload(su_client, b"", CONTENT_LENGTH="", **body)
    assert response.status_code == 202, response.content
    assert Backup.objects.get(kind="uploaded").name == response.json()["backup"]
    event = AuditEvent.objects.get(action="backup.uploaded")
    assert event.detail["bytes"] == len(data)


def test_a_body_without_a_length_is_cut_off_once_past_the_limit(era, su_client, queued, settings):
    fill_workspace(megabytes=3)
    big = operations.backup_create(kind="manual", actor="root", prune=False).backup
    data = bundle_bytes(store.local().path(big.name))
    settings.BACKUP_UPLOAD_MAX_BYTES = 256 * 1024
    assert len(data) > 4 * settings.BACKUP_UPLOAD_MAX_BYTES
    body = Counting(data)
    before_stored = stored()
    response = upload(su_client, b"", CONTENT_LENGTH="", **{"wsgi.input": body, "wsgi.input_terminated": True})
    assert response.status_code == 413
    assert response.json()["type"] == "urn:trustedoss:problem:upload_too_large"
    # It stopped reading at the limit (give or take one read), not at the end of the body.
    assert body.read_bytes <= settings.BACKUP_UPLOAD_MAX_BYTES + 1024 * 1024
    assert_nothing_changed(before_stored, queued)


def test_an_upload_larger_than_the_free_disk_is_refused_before_reading(su_client, settings, queued):
    settings.BACKUP_UPLOAD_MAX_BYTES = 2**62
    free = store.local().free_bytes()
    response = upload(su_client, b"x", CONTENT_LENGTH=str(free + 1), **{"wsgi.input": io.BytesIO()})
    assert response.status_code == 507
    assert response.json()["type"] == "urn:trustedoss:problem:insufficient_storage"
    assert locks.current() is None


# An accepted upload, then its restore --------------------------------------------------------------


def test_an_uploaded_bundle_is_kept_queued_and_restored_by_the_task(era, superuser, su_client, queued):
    data = bundle_bytes(store.local().path(era.name))
    # Life goes on after the backup: a project, a new password.
    Project.objects.create(name="after-the-backup")
    superuser.set_password("a-newer-password")
    superuser.save()
    su_client.force_login(superuser)
    response = upload(su_client, data)
    assert response.status_code == 202, response.content
    job = response.json()
    assert job["state"] == "queued"
    assert queued == [job["id"]]
    assert response.cookies["trusca_restore"].value == job["id"]
    uploaded = Backup.objects.get(kind="uploaded")
    assert (uploaded.name, uploaded.status) == (job["backup"], "succeeded")
    assert uploaded.name.startswith("uploaded-")
    assert store.local().path(uploaded.name).is_dir()
    assert [name for name in stored() if name.startswith(".")] == []
    # The lock is held for the job, and nothing else can start meanwhile.
    assert locks.current()["owner"] == f"restore:{job['id']}"
    assert su_client.post(reverse("backups:run"), headers={"accept": "application/json"}).status_code == 409
    assert AuditEvent.objects.filter(action="backup.uploaded", target=uploaded.name, actor="root").exists()
    assert AuditEvent.objects.filter(action="backup.restore_requested", target=uploaded.name).exists()

    tasks.run_restore(job["id"])

    assert set(Project.objects.values_list("name", flat=True)) >= {"of-the-backups-era"}
    assert not Project.objects.filter(name="after-the-backup").exists()
    assert get_user_model().objects.get(username="root").check_password("correct-horse-battery")
    assert not Session.objects.exists()
    assert AuditEvent.objects.filter(action="backup.restored", target=uploaded.name).exists()
    assert locks.current() is None
    status = Client().get(job["status_url"]).json()
    assert (status["state"], status["error"]) == ("succeeded", "")
    assert status["safety_backup"].startswith("pre-restore-")
    assert any(line.startswith("✓ safety backup") for line in status["steps"])
    assert "✓ portal back online" in status["steps"]
    # The catalog lists the backup, its uploaded copy and the safety backup, all restorable.
    assert sorted(Backup.objects.values_list("kind", "status")) == [
        ("manual", "succeeded"),
        ("pre_restore", "succeeded"),
        ("uploaded", "succeeded"),
    ]
    assert su_client.get(job["done_url"])["Location"].startswith(reverse("admin:login"))


def test_a_listed_backup_is_checked_queued_and_restored(era, su_client, queued):
    Project.objects.create(name="after-the-backup")
    response = restore_listed(su_client, era)
    assert response.status_code == 202, response.content
    job = response.json()
    assert (job["backup"], queued) == (era.name, [job["id"]])
    tasks.run_restore(job["id"])
    assert not Project.objects.filter(name="after-the-backup").exists()
    assert Project.objects.filter(name="of-the-backups-era").exists()
    assert restore_jobs.restore_job(job["id"]).state == "succeeded"


def test_a_redelivered_job_runs_once(era, su_client, queued):
    # The typed word as a form field this time, as a plain HTML form would send it.
    response = su_client.post(
        reverse("backups:restore_backup", args=[era.pk]),
        urlencode({"confirmation": "restore"}),
        content_type="application/x-www-form-urlencoded",
        headers={"x-confirm-restore": "yes", "accept": "application/json"},
    )
    job_id = response.json()["id"]
    assert operations.restore_run_queued(restore_id=job_id) is not None
    assert operations.restore_run_queued(restore_id=job_id) is None
    assert AuditEvent.objects.filter(action="backup.restored").count() == 1


def test_a_job_whose_lock_lapsed_in_the_queue_does_not_start(era, su_client, queued, settings):
    response = restore_listed(su_client, era)
    job_id = response.json()["id"]
    Project.objects.create(name="after-the-backup")
    lock_file = settings.VAR_DIR / "operation.lock"
    past = time.time() - settings.BACKUP_STALE_SECONDS - 5
    os.utime(lock_file, (past, past))
    assert operations.restore_run_queued(restore_id=job_id) is None
    job = restore_jobs.restore_job(job_id)
    assert job.state == "failed"
    assert "its turn lapsed" in job.error
    assert Project.objects.filter(name="after-the-backup").exists()
    assert AuditEvent.objects.filter(action="backup.restore_failed", target=era.name).count() == 1


def test_a_backup_gone_by_the_time_the_worker_starts_fails_the_job_with_the_reason(era, su_client, queued):
    response = restore_listed(su_client, era)
    job_id = response.json()["id"]
    shutil.rmtree(store.local().path(era.name))
    before = tree(settings.WORKSPACE_HOST_PATH)
    with pytest.raises(operations.RestoreRefused):
        operations.restore_run_queued(restore_id=job_id)
    job = restore_jobs.restore_job(job_id)
    assert job.state == "failed"
    assert "is not a backup directory, a bundle file, or the name of a stored backup" in job.error
    assert tree(settings.WORKSPACE_HOST_PATH) == before
    assert locks.current() is None
    assert AuditEvent.objects.filter(action="backup.restore_failed", target=era.name).count() == 1


# A client that goes away --------------------------------------------------------------------------

_HALF_UPLOAD = """
import socket, sys, time
host, port, cookie, token, length, path = sys.argv[1:7]
body = open(path, "rb").read()
s = socket.create_connection((host, int(port)))
s.sendall(
    f"POST /admin/backup/restore?confirmation=restore&filename=b.tar.gz HTTP/1.1\\r\\nHost: {host}\\r\\n"
    f"Cookie: sessionid={cookie}; csrftoken={token}\\r\\nX-CSRFToken: {token}\\r\\nX-Confirm-Restore: yes\\r\\n"
    f"Content-Type: application/octet-stream\\r\\nContent-Length: {length}\\r\\n"
    "Accept: application/json\\r\\n\\r\\n".encode()
)
s.sendall(body)
print("sent", flush=True)
time.sleep(600)
"""


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_an_upload_killed_halfway_leaves_no_partial_file_and_no_lock(era, superuser, live_server, tmp_path):
    fill_workspace(megabytes=2)
    whole = bundle_bytes(store.local().path(operations.backup_create(kind="manual", actor="root").backup.name))
    half = tmp_path / "half"
    half.write_bytes(whole[: len(whole) // 2])
    browser = Client()
    browser.force_login(superuser)
    token = "a" * 32  # a CSRF secret of our own: the cookie and the header agree
    before = stored()
    host, port = live_server.thread.host, live_server.thread.port
    args = [host, str(port), browser.cookies["sessionid"].value, token, str(len(whole)), str(half)]
    client = subprocess.Popen([sys.executable, "-c", _HALF_UPLOAD, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "sent"
        # The server is receiving: its hidden unpack directory exists and it holds the lock.
        assert wait_for(lambda: any(name.startswith(".partial-unpack-") for name in stored()))
        assert locks.current() is not None
        client.send_signal(signal.SIGKILL)
        client.wait()
        assert wait_for(lambda: stored() == before and locks.current() is None), (stored(), locks.current())
    finally:
        client.kill()
        client.wait()
    assert not AuditEvent.objects.filter(action="backup.uploaded").exists()
