"""The admin's restore door: the page, the gates (each refused before a byte of the body is read,
changing nothing), the status the maintenance page follows, and the landing after the restore."""

import io
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.helpers import tree
from trusca.backups import locks, maintenance, operations, tasks
from trusca.backups.models import Backup
from trusca.backups.naming import format_name
from trusca.backups.operations import restore_jobs
from trusca.backups.operations.restore import _Status
from trusca.backups.views import JOB_COOKIE
from trusca.portal.models import AuditEvent

HTML = "text/html,application/xhtml+xml"


class Untouchable(io.RawIOBase):
    """A request body that fails the test if anyone reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise AssertionError("the request body was read before the request was refused")


@pytest.fixture
def queued(monkeypatch) -> list[str]:
    """Stands in for the broker: the job ids handed to the Celery task."""
    ids: list[str] = []
    monkeypatch.setattr(tasks.run_restore, "delay", ids.append)
    return ids


@pytest.fixture
def listed(db) -> Backup:
    when = timezone.now().replace(microsecond=0)
    return Backup.objects.create(
        name=format_name("manual", when), kind="manual", status="succeeded", created_at=when, size_bytes=4096
    )


def snapshot() -> tuple:
    """Every table's row count, the workspace, the backup root (hidden entries included), the lock."""
    with connection.cursor() as cursor:
        counts = {}
        for table in sorted(connection.introspection.table_names(cursor)):
            cursor.execute(f'SELECT COUNT(*) FROM "{table}"')
            counts[table] = cursor.fetchone()[0]
    root = settings.BACKUP_ROOT
    listing = sorted(p.name for p in root.iterdir()) if root.exists() else []
    return counts, tree(settings.WORKSPACE_HOST_PATH), listing, locks.current()


def post_restore(
    client,
    url,
    *,
    header="yes",
    word="restore",
    length=None,
    csrf=None,
    content_type="application/octet-stream",
    **query,
):
    """A restore request whose body must not be read: ``length`` is only announced."""
    params = {"confirmation": word, **query} if word is not None else query
    extra = {"wsgi.input": Untouchable(), "CONTENT_TYPE": content_type}
    if length is not None:
        extra["CONTENT_LENGTH"] = str(length)
    if csrf is not None:
        extra["HTTP_X_CSRFTOKEN"] = csrf
    return client.post(
        f"{url}?{urlencode(params)}",
        data=b"",
        content_type=content_type,
        headers={"accept": "application/json", **({"x-confirm-restore": header} if header is not None else {})},
        **extra,
    )


def assert_problem(response, status: int, kind: str) -> dict:
    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"urn:trustedoss:problem:{kind}"
    assert (body["status"], bool(body["title"]), bool(body["detail"])) == (status, True, True)
    return body


def endpoints(listed: Backup) -> list[str]:
    return [reverse("backups:restore"), reverse("backups:restore_backup", args=[listed.pk])]


# The gates, in order -----------------------------------------------------------------------------


def test_anonymous_visitors_are_refused_and_nothing_changes(client, listed, queued):
    before = snapshot()
    for url in endpoints(listed):
        assert_problem(post_restore(client, url, length=10), 403, "not_authenticated")
    assert snapshot() == before
    assert queued == []


def test_staff_without_rights_are_refused_and_nothing_changes(staff_client, listed, queued):
    before = snapshot()
    for url in endpoints(listed):
        body = assert_problem(post_restore(staff_client, url, length=10), 403, "permission_denied")
        assert "superuser" in body["detail"]
    assert snapshot() == before
    assert queued == []


def test_a_request_without_the_csrf_token_is_refused_and_nothing_changes(superuser, listed, queued):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(superuser)
    browser.get(reverse("backups:restore"))  # the CSRF cookie, as the page would have it
    before = snapshot()
    for url in endpoints(listed):
        assert_problem(post_restore(browser, url, length=10), 403, "csrf_failed")
    assert snapshot() == before
    assert queued == []


@pytest.mark.parametrize("header", [None, "no", "YES", "yes ", ""])
def test_without_exactly_x_confirm_restore_yes_it_answers_412_and_nothing_changes(su_client, listed, queued, header):
    before = snapshot()
    for url in endpoints(listed):
        body = assert_problem(
            post_restore(su_client, url, header=header, length=10), 412, "restore_confirmation_required"
        )
        assert body["title"] == "Restore confirmation header missing"
        assert "X-Confirm-Restore: yes" in body["detail"]
    assert snapshot() == before
    assert queued == []


@pytest.mark.parametrize("word", [None, "", "Restore", " restore", "restore ", "restor", "RESTORE"])
def test_a_wrong_typed_word_answers_400_and_nothing_changes(su_client, listed, queued, word):
    before = snapshot()
    for url in endpoints(listed):
        body = assert_problem(post_restore(su_client, url, word=word, length=10), 400, "restore_confirmation_mismatch")
        assert "typed exactly" in body["detail"]
    assert snapshot() == before
    assert queued == []


def test_a_bundle_over_the_limit_is_refused_from_its_content_length(su_client, settings, queued):
    settings.BACKUP_UPLOAD_MAX_BYTES = 1000
    before = snapshot()
    body = assert_problem(post_restore(su_client, reverse("backups:restore"), length=1001), 413, "upload_too_large")
    assert "manage.py restore" in body["detail"]
    assert snapshot() == before
    assert queued == []


def test_while_another_operation_runs_it_answers_409_and_nothing_changes(su_client, listed, queued):
    with locks.OperationLock("a manual backup"):
        before = snapshot()
        for url in endpoints(listed):
            body = assert_problem(post_restore(su_client, url, length=10), 409, "operation_in_progress")
            assert "a manual backup is already running" in body["detail"]
        assert snapshot() == before
    assert queued == []


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "application/x-www-form-urlencoded"])
def test_an_upload_sent_as_a_form_is_refused_before_anything_parses_it(su_client, queued, content_type):
    before = snapshot()
    response = post_restore(su_client, reverse("backups:restore"), length=10, content_type=content_type)
    body = assert_problem(response, 415, "unsupported_media_type")
    assert "curl -X POST -T bundle.tar.gz" in body["detail"]
    assert snapshot() == before


def test_the_gates_come_in_order_superuser_csrf_header_word_size_busy(superuser, staff, settings, queued):
    settings.BACKUP_UPLOAD_MAX_BYTES = 100
    url = reverse("backups:restore")
    everything_wrong = {"header": "no", "word": "nope", "length": 101}
    staffer = Client(enforce_csrf_checks=True)
    staffer.force_login(staff)
    root = Client(enforce_csrf_checks=True)
    root.force_login(superuser)
    root.get(url)
    with locks.OperationLock("a manual backup"):
        assert post_restore(staffer, url, **everything_wrong).status_code == 403
        assert_problem(post_restore(root, url, **everything_wrong), 403, "csrf_failed")
        token = root.cookies["csrftoken"].value
        assert post_restore(root, url, **everything_wrong, csrf=token).status_code == 412
        assert post_restore(root, url, word="nope", length=101, csrf=token).status_code == 400
        assert post_restore(root, url, length=101, csrf=token).status_code == 413
        assert post_restore(root, url, length=100, csrf=token).status_code == 409


def test_a_browser_refused_gets_the_page_with_the_reason(su_client, queued):
    response = su_client.post(
        f"{reverse('backups:restore')}?confirmation=restore",
        data=b"",
        content_type="application/octet-stream",
        headers={"accept": HTML},
    )
    assert response.status_code == 412
    assert "X-Confirm-Restore: yes" in response.content.decode()
    assert 'id="restore-form"' in response.content.decode()


# The check before an upload ----------------------------------------------------------------------


def test_the_page_can_ask_whether_an_upload_of_a_given_size_would_be_accepted(su_client, settings, queued):
    settings.BACKUP_UPLOAD_MAX_BYTES = 1000
    url = reverse("backups:restore")
    before = snapshot()
    assert post_restore(su_client, url, check="yes", size="1000").status_code == 204
    assert_problem(post_restore(su_client, url, check="yes", size="1001"), 413, "upload_too_large")
    with locks.OperationLock("a manual backup"):
        assert_problem(post_restore(su_client, url, check="yes", size="10"), 409, "operation_in_progress")
    assert_problem(
        post_restore(su_client, url, header=None, check="yes", size="10"), 412, "restore_confirmation_required"
    )
    assert_problem(post_restore(su_client, url, check="yes", size="-1"), 400, "bad_request")
    assert snapshot() == before
    assert queued == []


def test_an_upload_without_a_length_is_refused_unless_the_server_ends_the_body(su_client, queued):
    response = su_client.post(
        f"{reverse('backups:restore')}?confirmation=restore",
        data=b"",
        content_type="application/octet-stream",
        headers={"x-confirm-restore": "yes"},
        CONTENT_LENGTH="",
        **{"wsgi.input": Untouchable()},
    )
    assert_problem(response, 411, "length_required")


# The pages ---------------------------------------------------------------------------------------


def test_the_toolbar_offers_upload_and_restore_and_each_complete_backup_a_restore(su_client, listed):
    failed = Backup.objects.create(
        name=format_name("auto", datetime(2026, 1, 1, tzinfo=UTC)),
        kind="auto",
        status="failed",
        created_at=timezone.now(),
    )
    page = su_client.get(reverse("backups:index")).content.decode()
    assert f'<li><a href="{reverse("backups:restore")}">Upload and restore…</a></li>' in page
    assert f'<a href="{reverse("backups:restore_backup", args=[listed.pk])}">Restore…</a>' in page
    assert reverse("backups:restore_backup", args=[failed.pk]) not in page


def test_the_upload_page_says_what_is_replaced_and_never_the_database_password(su_client, settings, monkeypatch):
    monkeypatch.setitem(settings.DATABASES["default"], "PASSWORD", "hunter2-not-shown")
    page = su_client.get(reverse("backups:restore")).content.decode()
    db = settings.DATABASES["default"]
    assert str(db["NAME"]) in page
    if connection.vendor == "postgresql":
        assert f"{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}" in page
    assert "hunter2-not-shown" not in page
    assert f"<code>{settings.WORKSPACE_HOST_PATH}</code>" in page
    assert "Everything written since the backup was taken" in page
    assert "Every signed-in session," in page
    assert "pre-restore-…" in page
    assert "10.0\xa0GB" in page
    assert "manage.py restore /path/to/bundle.tar.gz" in page
    assert '<label for="restore-file"' in page
    assert '<label for="restore-confirmation"' in page
    assert 'id="restore-submit" class="backup-danger" value="Restore" disabled aria-disabled="true"' in page
    assert 'aria-live="polite"' in page


def test_a_listed_backups_page_names_its_time_and_asks_for_trust_only_when_unsigned(su_client, listed):
    operations.backup_create(kind="manual", actor="root", prune=False)
    signed = Backup.objects.exclude(pk=listed.pk).get()
    page = su_client.get(reverse("backups:restore_backup", args=[signed.pk])).content.decode()
    assert f"({signed.created_at:%Y-%m-%d %H:%M:%S} UTC)" in page
    assert "signed with this installation&#x27;s key" in page
    assert "restore-trust" not in page
    # A row whose files carry no signature this installation knows (here: none at all).
    page = su_client.get(reverse("backups:restore_backup", args=[listed.pk])).content.decode()
    assert "data-trust-required" in page
    assert 'id="restore-trust"' in page
    assert "its SQL runs with the portal’s database rights" in page


def test_a_browser_opening_a_missing_backups_restore_page_gets_the_admins_404(su_client):
    response = su_client.get(reverse("backups:restore_backup", args=[999]), headers={"accept": HTML})
    assert response.status_code == 404
    assert "Page not found" in response.content.decode()
    assert_problem(su_client.get(reverse("backups:restore_backup", args=[999])), 404, "backup_not_found")


def test_a_failed_backup_cannot_be_restored(su_client, queued):
    when = timezone.now().replace(microsecond=0)
    failed = Backup.objects.create(name=format_name("manual", when), kind="manual", status="failed", created_at=when)
    assert su_client.get(reverse("backups:restore_backup", args=[failed.pk])).status_code == 409
    response = post_restore(su_client, reverse("backups:restore_backup", args=[failed.pk]))
    assert_problem(response, 409, "backup_not_restorable")
    assert queued == []


# Following a restore -----------------------------------------------------------------------------


def running_job(**fields) -> restore_jobs.RestoreJob:
    job = restore_jobs.RestoreJob(
        id="ab" * 16,
        backup="manual-20260509T030000Z",
        actor="root",
        trust_unsigned=False,
        taken_at="2026-05-09T03:00:00+00:00",
        queued_at=timezone.now().isoformat(),
        state="running",
        step=restore_jobs.RESTORING,
        **fields,
    )
    job.save()
    job.beat()
    return job


def test_during_maintenance_the_status_answers_from_the_cache_without_the_database(client, django_assert_num_queries):
    job = running_job()
    maintenance.enter("Restoring the backup manual-20260509T030000Z")
    _Status(job.backup).set("restoring the database", 42)
    client.cookies[JOB_COOKIE] = job.id
    try:
        response = client.get(reverse("backups:restore_status"))
        admin = client.get(reverse("backups:index"), headers={"accept": HTML})
    finally:
        maintenance.leave()
    assert response.status_code == 200
    body = response.json()
    assert (body["state"], body["step"], body["percent"], body["maintenance"]) == (
        "running",
        "restoring the database",
        42,
        True,
    )
    assert admin.status_code == 503


def test_the_status_of_an_unknown_restore_is_a_404_problem(client):
    assert_problem(client.get(reverse("backups:restore_status"), {"id": "0" * 32}), 404, "restore_not_found")
    assert_problem(client.get(reverse("backups:restore_status"), {"id": "../etc"}), 404, "restore_not_found")


def test_the_maintenance_page_shows_the_step_the_percent_and_a_human_time(client):
    # No database fixture: a query would fail the test.
    running_job()
    maintenance.enter("Restoring the backup manual-20260509T030000Z")
    _Status("manual-20260509T030000Z").set("safety backup", 37)
    try:
        page = client.get("/admin/", headers={"accept": HTML})
        script = client.get("/admin/backup/list")
    finally:
        maintenance.leave()
    assert (page.status_code, page["Retry-After"]) == (503, str(maintenance.RETRY_AFTER_SECONDS))
    html = page.content.decode()
    assert "Restoring the backup manual-20260509T030000Z." in html
    assert "safety backup · 37%" in html
    assert 'value="37"' in html
    assert "UTC</time> (just now)" in html
    assert "admin/css/base.css" in html
    assert f'data-status-url="{reverse("backups:restore_status")}"' in html
    body = assert_problem(script, 503, "maintenance")
    assert "Now: safety backup (37%)" in body["detail"]
    assert script["Retry-After"] == str(maintenance.RETRY_AFTER_SECONDS)


def test_after_a_completed_restore_the_operator_lands_on_the_sign_in_page_with_the_message(client):
    job = running_job()
    job.finish(restore_jobs.SUCCEEDED, step="done", safety_backup="pre-restore-20260510T080000Z")
    client.cookies[JOB_COOKIE] = job.id
    response = client.get(reverse("backups:restore_done"))
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?{urlencode({'next': reverse('backups:index')})}"
    assert response.cookies[JOB_COOKIE]["max-age"] == 0
    page = client.get(response["Location"]).content.decode()
    assert 'id="login-form"' in page
    assert "The restore of manual-20260509T030000Z completed" in page
    assert "its state of 2026-05-09 03:00 UTC" in page
    assert "sign in with the credentials of that time" in page
    assert "pre-restore-20260510T080000Z" in page


def test_after_a_failed_restore_the_operator_reads_what_failed(su_client):
    job = running_job()
    job.finish(restore_jobs.FAILED, error="restoring the database failed: disk full. The database was rolled back")
    response = su_client.get(reverse("backups:restore_done"), {"id": job.id}, follow=True)
    page = response.content.decode()
    assert response.redirect_chain[-1][0] == reverse("backups:index")
    assert "The restore of manual-20260509T030000Z failed: restoring the database failed: disk full." in page
    assert "rolled back" in page


def test_a_job_nobody_took_is_reported_failed_once_its_lock_lapsed(db, client, settings):
    settings.BACKUP_STALE_SECONDS = 2
    job = running_job()
    job.save(state=restore_jobs.QUEUED, step="queued")
    cache.set(f"trusca:restore:beat:{job.id}", timezone.now().timestamp() - 5)
    body = client.get(reverse("backups:restore_status"), {"id": job.id}).json()
    assert body["state"] == "failed"
    assert "no worker took it within 2 s" in body["error"]
    event = AuditEvent.objects.get(action="backup.restore_failed")
    assert event.target == job.backup
    client.get(reverse("backups:restore_status"), {"id": job.id})
    assert AuditEvent.objects.filter(action="backup.restore_failed").count() == 1
