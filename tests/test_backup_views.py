import io
import tarfile
import threading
from datetime import timedelta

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from trusca.backups import locks, operations, store, tasks
from trusca.backups.models import Backup
from trusca.backups.naming import format_name
from trusca.portal.models import AuditEvent

# (method, URL name, whether the URL names a backup) for every endpoint.
INDEX = ("get", "backups:index", False)
LIST = ("get", "backups:list", False)
STATUS = ("get", "backups:status", True)
RUN = ("post", "backups:run", False)
DOWNLOAD = ("get", "backups:download", True)
DELETE_PAGE = ("get", "backups:delete", True)
DELETE = ("post", "backups:delete", True)

PAGES = [INDEX, DELETE_PAGE]
SUPERUSER_ONLY = [RUN, DOWNLOAD, DELETE_PAGE, DELETE]


def make_row(kind="manual", status=Backup.Status.SUCCEEDED, minutes_ago=0, **fields) -> Backup:
    """A catalog row; a queued or running one with a fresh heartbeat has its run's lock held, as
    a live run does (a run without it is taken for dead)."""
    when = timezone.now().replace(microsecond=0) - timedelta(minutes=minutes_ago)
    values = {"size_bytes": 2_500_000, "db_revision": "0123456789ab", "progress": 100} | fields
    row = Backup.objects.create(name=format_name(kind, when), kind=kind, status=status, created_at=when, **values)
    if row.is_active and row.heartbeat_at and timezone.now() - row.heartbeat_at < timedelta(seconds=10):
        locks.OperationLock(f"a {kind} backup", owner=f"backup:{row.name}").acquire()
    return row


def url(name: str, needs_pk: bool, backup: Backup | None = None) -> str:
    return reverse(name, args=[backup.pk]) if needs_pk else reverse(name)


def assert_problem(response, status: int, kind: str) -> dict:
    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"urn:trustedoss:problem:{kind}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    return body


@pytest.fixture
def no_worker(monkeypatch):
    """Stands in for the broker: the ids handed to the Celery task, in order."""
    queued: list[int] = []
    monkeypatch.setattr(tasks.run_backup, "delay", queued.append)
    return queued


@pytest.fixture
def real_backup(transactional_db) -> Backup:
    return operations.backup_create(kind="manual", actor="root").backup


# Who may do what ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "name", "needs_pk"), PAGES)
def test_anonymous_visitors_are_sent_to_the_admin_login_from_pages(db, client, method, name, needs_pk):
    target = url(name, needs_pk, make_row())
    response = getattr(client, method)(target)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?next={target}"


@pytest.mark.parametrize(("method", "name", "needs_pk"), [LIST, STATUS, RUN, DOWNLOAD, DELETE])
def test_anonymous_visitors_get_a_problem_document_and_change_nothing(db, client, method, name, needs_pk):
    backup = make_row()
    response = getattr(client, method)(url(name, needs_pk, backup))
    assert_problem(response, 403, "not_authenticated")
    assert list(Backup.objects.values_list("name", flat=True)) == [backup.name]


def test_signed_in_users_who_are_not_staff_are_kept_out(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("visitor", password="visitor-password-1"))
    assert client.get(reverse("backups:index")).status_code == 302
    assert_problem(client.get(reverse("backups:list")), 403, "permission_denied")


@pytest.mark.parametrize(("method", "name", "needs_pk"), [INDEX, LIST, STATUS])
def test_staff_without_rights_can_read_the_page_the_list_and_a_status(staff_client, method, name, needs_pk):
    response = getattr(staff_client, method)(url(name, needs_pk, make_row()))
    assert response.status_code == 200


@pytest.mark.parametrize(("method", "name", "needs_pk"), SUPERUSER_ONLY)
def test_staff_without_rights_get_403_from_run_download_and_delete(staff_client, no_worker, method, name, needs_pk):
    backup = make_row()
    response = getattr(staff_client, method)(url(name, needs_pk, backup))
    body = assert_problem(response, 403, "permission_denied")
    assert "superuser" in body["detail"]
    assert list(Backup.objects.values_list("name", flat=True)) == [backup.name]
    assert no_worker == []
    assert not AuditEvent.objects.exists()


def test_staff_without_rights_see_neither_the_toolbar_nor_an_actions_column(staff_client):
    make_row()
    make_row(status=Backup.Status.FAILED, minutes_ago=3, message="disk full")
    page = staff_client.get(reverse("backups:index")).content.decode()
    assert "Run manual backup now" not in page
    assert "Upload and restore…" not in page.split("No backups yet")[0]
    assert ">Actions</th>" not in page
    assert "backup-actions" not in page
    assert "Download" not in page
    assert "Restore…" not in page
    assert "deletelink" not in page
    assert "disk full" in page


@pytest.mark.parametrize(("method", "name", "needs_pk"), [RUN, DELETE])
def test_the_superusers_actions_need_a_csrf_token(superuser, no_worker, method, name, needs_pk):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(superuser)
    backup = make_row()
    response = getattr(browser, method)(url(name, needs_pk, backup))
    assert_problem(response, 403, "csrf_failed")
    assert list(Backup.objects.values_list("name", flat=True)) == [backup.name]
    assert no_worker == []
    assert not AuditEvent.objects.exists()


def test_a_superuser_with_the_pages_csrf_token_can_run_a_backup(superuser, no_worker):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(superuser)
    token = browser.get(reverse("backups:index")).context["csrf_token"]
    response = browser.post(reverse("backups:run"), {"csrfmiddlewaretoken": str(token)})
    assert response.status_code == 302
    assert Backup.objects.get().status == Backup.Status.QUEUED


# The page -------------------------------------------------------------------------------------


def test_with_no_backups_the_page_shows_the_empty_card_under_the_column_headers(su_client):
    page = su_client.get(reverse("backups:index")).content.decode()
    card = page.index("No backups yet…")
    assert page.index(">Name</th>") < page.index(">Actions</th>") < card
    assert "Take the first one with <strong>Run manual backup now</strong>" in page[card:]
    assert "<strong>Upload and restore…</strong>" in page[card:]
    assert "nightly job" in page[card:]


def test_the_page_lists_backups_newest_first_under_the_six_columns(su_client):
    older = make_row(minutes_ago=60)
    newer = make_row(kind="auto", minutes_ago=5)
    page = su_client.get(reverse("backups:index")).content.decode()
    table = page.index('id="result_list"')
    headers = page[table : page.index("</thead>", table)]
    for column in ("Name", "Kind", "Created", "Size", "DB revision", "Actions"):
        assert f">{column}</th>" in headers
    assert page.index(newer.name) < page.index(older.name)
    assert "2.4\xa0MB" in page
    assert "0123456789ab" in page
    assert "No backups yet" not in page


def test_auto_backups_show_a_badge_and_a_lock_saying_retention_removes_them(su_client, settings):
    settings.BACKUP_RETENTION_DAYS = 9
    make_row(kind="auto")
    page = su_client.get(reverse("backups:index")).content.decode()
    assert '<span class="backup-badge">auto</span>' in page
    assert 'title="Removed by the automatic retention after 9 days (BACKUP_RETENTION_DAYS)"' in page


def test_manual_backups_have_neither_badge_nor_lock(su_client):
    make_row(kind="manual")
    page = su_client.get(reverse("backups:index")).content.decode()
    assert "backup-badge" not in page
    assert "backup-lock" not in page


def test_each_row_shows_its_status_and_a_running_one_a_progress_bar(su_client):
    running = make_row(status=Backup.Status.RUNNING, progress=42, heartbeat_at=timezone.now())
    failed = make_row(status=Backup.Status.FAILED, minutes_ago=10, message="No space left on device")
    page = su_client.get(reverse("backups:index")).content.decode()
    assert f'data-status-url="{reverse("backups:status", args=[running.pk])}"' in page
    assert '<progress class="backup-progress" max="100" value="42"' in page
    assert "running · 42%" in page
    assert '<span class="backup-status backup-status-failed">failed</span>' in page
    assert "No space left on device" in page
    assert reverse("backups:delete", args=[failed.pk]) in page


def test_the_page_is_paginated_without_counting_the_table(su_client):
    for minutes in range(52):
        make_row(minutes_ago=minutes)
    first = su_client.get(reverse("backups:index"))
    assert len(first.context["backups"]) == 50
    assert 'href="?page=2"' in first.content.decode()
    second = su_client.get(reverse("backups:index"), {"page": 2})
    assert [b.name for b in second.context["backups"]] == [
        b.name for b in Backup.objects.order_by("created_at")[:2][::-1]
    ]
    assert "?page=3" not in second.content.decode()


def test_the_admin_sidebar_leads_every_staff_member_to_the_backup_page(staff_client):
    index = staff_client.get(reverse("admin:index")).content.decode()
    changelist = reverse("admin:backups_backup_changelist")
    assert f'href="{changelist}"' in index
    assert staff_client.get(changelist)["Location"] == reverse("backups:index")


def test_the_generic_admin_cannot_delete_a_backup_behind_the_operations_back(su_client):
    backup = make_row()
    response = su_client.post(reverse("admin:backups_backup_delete", args=[backup.pk]), {"post": "yes"})
    assert response.status_code == 403
    assert Backup.objects.filter(pk=backup.pk).exists()


# Run ------------------------------------------------------------------------------------------


def test_run_queues_a_manual_backup_and_hands_it_to_the_worker(
    su_client, no_worker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = su_client.post(reverse("backups:run"))
    assert response.status_code == 302
    assert response["Location"] == reverse("backups:index")
    backup = Backup.objects.get()
    assert (backup.kind, backup.status, backup.actor) == ("manual", "queued", "root")
    assert backup.name.startswith("manual-")
    assert no_worker == [backup.pk]
    event = AuditEvent.objects.get(action="backup.requested")
    assert (event.actor, event.target, event.ip) == ("root", backup.name, "127.0.0.1")
    page = su_client.get(reverse("backups:index")).content.decode()
    assert "is queued" in page
    assert '<progress class="backup-progress"' in page


def test_run_answers_a_json_client_with_202_and_the_status_url(su_client, no_worker):
    response = su_client.post(reverse("backups:run"), headers={"accept": "application/json"})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["status_url"] == reverse("backups:status", args=[body["id"]])


def test_a_run_while_another_operation_is_running_gets_409_and_starts_nothing(su_client, no_worker):
    with locks.OperationLock("a restore"):
        response = su_client.post(reverse("backups:run"), headers={"accept": "application/json"})
    body = assert_problem(response, 409, "operation_in_progress")
    assert "a restore is already running" in body["detail"]
    assert not Backup.objects.exists()
    assert no_worker == []


def test_a_run_refused_from_the_page_says_why(su_client, no_worker):
    su_client.post(reverse("backups:run"))
    response = su_client.post(reverse("backups:run"))
    assert response.status_code == 409
    page = response.content.decode()
    assert "a manual backup is already running" in page
    assert "One backup or restore runs at a time" in page
    assert Backup.objects.count() == 1


def test_two_runs_requested_at_once_exactly_one_runs_and_the_other_gets_409(transactional_db, superuser, no_worker):
    barrier = threading.Barrier(2)
    responses = []

    def request() -> None:
        browser = Client()
        browser.force_login(superuser)
        barrier.wait()
        try:
            responses.append(browser.post(reverse("backups:run"), headers={"accept": "application/json"}))
        finally:
            connection.close()

    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in responses) == [202, 409]
    assert_problem(next(r for r in responses if r.status_code == 409), 409, "operation_in_progress")
    [backup] = Backup.objects.all()
    assert no_worker == [backup.pk]
    tasks.run_backup(backup.pk)
    backup.refresh_from_db()
    assert (backup.status, backup.progress) == ("succeeded", 100)


# Status and the list API ----------------------------------------------------------------------


def test_status_reports_one_backups_progress(staff_client):
    backup = make_row(status=Backup.Status.RUNNING, progress=37, heartbeat_at=timezone.now(), size_bytes=0)
    body = staff_client.get(reverse("backups:status", args=[backup.pk])).json()
    assert body["name"] == backup.name
    assert (body["status"], body["progress"]) == ("running", 37)


def test_status_of_a_missing_backup_is_a_404_problem(staff_client):
    assert_problem(staff_client.get(reverse("backups:status", args=[999])), 404, "backup_not_found")


def test_reading_the_status_marks_a_run_whose_worker_died_failed_and_removes_its_files(staff_client, settings):
    silent_since = timezone.now() - timedelta(seconds=settings.BACKUP_STALE_SECONDS + 5)
    dead = make_row(status=Backup.Status.RUNNING, progress=12, heartbeat_at=silent_since, size_bytes=0)
    partial = store.local().staging_path(dead.name)
    partial.mkdir(parents=True)
    (partial / "workspace.tar.gz").write_bytes(b"half")
    body = staff_client.get(reverse("backups:status", args=[dead.pk])).json()
    assert body["status"] == "failed"
    assert body["message"].startswith("worker lost")
    assert not partial.exists()


def test_the_list_api_gives_monitoring_the_latest_attempt_and_the_backups(staff_client):
    make_row(minutes_ago=30)
    failed = make_row(status=Backup.Status.FAILED, minutes_ago=1, message="pg_dump failed", progress=3)
    body = staff_client.get(reverse("backups:list")).json()
    assert body["latest"]["name"] == failed.name
    assert (body["latest"]["status"], body["latest"]["message"]) == ("failed", "pg_dump failed")
    assert [b["status"] for b in body["backups"]] == ["failed", "succeeded"]
    assert set(body["backups"][1]) >= {"name", "kind", "created", "size", "db_revision", "status", "progress"}
    assert body["backups"][1]["size"] == 2_500_000
    assert body["next"] is None


def test_the_list_api_pages_and_still_names_the_latest_attempt(staff_client):
    for minutes in range(51):
        make_row(minutes_ago=minutes)
    first = staff_client.get(reverse("backups:list")).json()
    assert first["next"] == f"{reverse('backups:list')}?page=2"
    second = staff_client.get(first["next"]).json()
    assert len(second["backups"]) == 1
    assert second["latest"]["name"] == first["backups"][0]["name"]


# Download -------------------------------------------------------------------------------------


def test_download_is_a_link_on_the_page(su_client, real_backup):
    page = su_client.get(reverse("backups:index")).content.decode()
    assert f'<a href="{reverse("backups:download", args=[real_backup.pk])}" download>Download</a>' in page


def test_download_streams_a_bundle_that_verifies_and_is_audited(real_backup, superuser, tmp_path):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(superuser)
    response = browser.get(reverse("backups:download", args=[real_backup.pk]))
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "application/gzip"
    assert response["Content-Disposition"] == f'attachment; filename="{real_backup.name}.tar.gz"'
    target = tmp_path / f"{real_backup.name}.tar.gz"
    target.write_bytes(b"".join(response.streaming_content))
    with tarfile.open(target) as tar:
        assert tar.getnames()[0] == "manifest.json"
        assert len(tar.getnames()) == 3
    out = io.StringIO()
    call_command("verify_backup", str(target), stdout=out)
    assert "Backup OK" in out.getvalue()
    event = AuditEvent.objects.get(action="backup.downloaded")
    assert (event.actor, event.target) == ("root", real_backup.name)


def test_a_backup_without_files_cannot_be_downloaded(su_client):
    failed = make_row(status=Backup.Status.FAILED, message="disk full")
    assert_problem(su_client.get(reverse("backups:download", args=[failed.pk])), 409, "backup_not_downloadable")
    assert not AuditEvent.objects.exists()


def test_a_download_another_site_triggers_is_refused_and_not_audited(su_client, real_backup):
    response = su_client.get(
        reverse("backups:download", args=[real_backup.pk]), headers={"sec-fetch-site": "cross-site"}
    )
    assert_problem(response, 403, "cross_site_download")
    assert not AuditEvent.objects.filter(action="backup.downloaded").exists()


@pytest.mark.parametrize(("method", "name", "needs_pk"), [STATUS, DOWNLOAD, DELETE_PAGE])
def test_a_browser_opening_a_missing_backups_url_gets_the_admins_404_page(su_client, method, name, needs_pk):
    response = su_client.get(reverse(name, args=[999]), headers={"accept": "text/html,application/xhtml+xml"})
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "Page not found" in page
    assert "There is no backup with id 999" in page
    assert 'id="nav-sidebar"' in page


def test_the_sidebar_marks_backup_as_the_current_page(su_client):
    page = su_client.get(reverse("backups:index")).content.decode()
    assert f'<a href="{reverse("backups:index")}" aria-current="page">Backup</a>' in page


def test_the_favicon_is_a_static_file_not_a_404(client, settings):
    response = client.get("/favicon.ico")
    assert (response.status_code, response["Location"]) == (301, f"{settings.STATIC_URL}backups/favicon.ico")
    assert finders.find("backups/favicon.ico")


# Delete ---------------------------------------------------------------------------------------


def test_delete_asks_for_confirmation_before_removing_anything(su_client):
    backup = make_row()
    page = su_client.get(reverse("backups:delete", args=[backup.pk])).content.decode()
    assert f"Are you sure you want to delete the backup <strong>{backup.name}</strong>" in page
    assert "Yes, I’m sure" in page
    assert Backup.objects.filter(pk=backup.pk).exists()


def test_delete_removes_the_files_and_the_row_and_is_audited(real_backup, superuser):
    browser = Client()
    browser.force_login(superuser)
    directory = store.local().path(real_backup.name)
    assert directory.is_dir()
    response = browser.post(reverse("backups:delete", args=[real_backup.pk]), follow=True)
    assert response.redirect_chain == [(reverse("backups:index"), 302)]
    assert f"Deleted backup {real_backup.name}" in response.content.decode()
    assert not directory.exists()
    assert not Backup.objects.filter(pk=real_backup.pk).exists()
    event = AuditEvent.objects.get(action="backup.deleted")
    assert (event.actor, event.target) == ("root", real_backup.name)


def test_a_running_backup_cannot_be_deleted(su_client):
    running = make_row(status=Backup.Status.RUNNING, heartbeat_at=timezone.now(), progress=50)
    response = su_client.post(reverse("backups:delete", args=[running.pk]))
    assert response.status_code == 409
    assert "wait for it to finish" in response.content.decode()
    body = assert_problem(
        su_client.post(reverse("backups:delete", args=[running.pk]), headers={"accept": "application/json"}),
        409,
        "backup_in_use",
    )
    assert running.name in body["detail"]
    assert Backup.objects.filter(pk=running.pk).exists()


@pytest.fixture
def broker_down(monkeypatch):
    """The real Celery app, pointed at a port where no broker listens (Celery prefers the
    environment's CELERY_BROKER_URL to its configuration, so both change)."""
    from trusca.celery import app

    def repoint(url):
        monkeypatch.setenv("CELERY_BROKER_URL", url)
        app.conf.broker_url = url
        app._pool = None
        app.amqp._producer_pool = None

    previous = app.conf.broker_url
    repoint("redis://127.0.0.1:1/0")
    yield
    repoint(previous)


def test_a_broker_that_is_down_fails_the_row_frees_the_lock_and_says_so(su_client, broker_down):
    body = assert_problem(
        su_client.post(reverse("backups:run"), headers={"accept": "application/json"}), 503, "queue_unavailable"
    )
    assert "the task queue (CELERY_BROKER_URL) refused the job" in body["detail"]
    assert "Nothing was started" in body["detail"]
    row = Backup.objects.get()
    assert row.status == "failed" and "refused the job" in row.message
    assert locks.current() is None
    assert AuditEvent.objects.filter(action="backup.failed", target=row.name).exists()
    page = su_client.post(reverse("backups:run"))
    assert page.status_code == 503 and "Nothing was started" in page.content.decode()


@pytest.mark.parametrize("name", ["../outside", "../../etc", "/etc", ".partial-x", "a/b"])
def test_a_catalog_row_with_an_unsafe_name_is_never_used_as_a_path(su_client, name, caplog):
    row = Backup.objects.create(name=name, kind="manual", status="succeeded", created_at=timezone.now())
    for response in (
        su_client.get(reverse("backups:download", args=[row.pk]), headers={"accept": "application/json"}),
        su_client.post(reverse("backups:delete", args=[row.pk]), headers={"accept": "application/json"}),
    ):
        assert_problem(response, 404, "backup_not_found")
    assert Backup.objects.filter(pk=row.pk).exists()
    assert "unsafe name" in caplog.text


def test_a_server_error_is_logged_with_its_traceback(staff_client, monkeypatch, caplog):
    def broken(pk):
        raise RuntimeError("a bug nobody foresaw")

    monkeypatch.setattr(operations, "get_backup", broken)
    staff_client.raise_request_exception = False
    with caplog.at_level("ERROR", logger="django.request"):
        response = staff_client.get(reverse("backups:status", args=[1]))
    assert response.status_code == 500
    [record] = [r for r in caplog.records if r.name == "django.request"]
    assert record.exc_info and "a bug nobody foresaw" in str(record.exc_info[1])
