import time

import pytest
from django.urls import reverse

from tests.helpers import fill_workspace
from trusca.backups import store
from trusca.backups.models import Backup
from trusca.portal.models import AuditEvent

pytestmark = pytest.mark.integration

RUN_TIMEOUT_SECONDS = 60


def test_a_manual_backup_queued_from_the_admin_runs_on_the_worker_to_succeeded(celery_worker, su_client):
    fill_workspace(megabytes=200)
    response = su_client.post(reverse("backups:run"), headers={"accept": "application/json"})
    assert response.status_code == 202
    status_url = response.json()["status_url"]

    seen: list[int] = []
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        state = su_client.get(status_url).json()
        seen.append(state["progress"])
        if state["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert state["status"] == "succeeded", state["message"]
    assert seen == sorted(seen), "progress never goes backwards"
    assert [p for p in seen if 0 < p < 100], f"no progress between 0 and 100 was observed: {seen}"
    assert seen[-1] == 100

    backup = Backup.objects.get(name=state["name"])
    assert backup.kind == "manual"
    assert backup.size_bytes > 0
    assert len(backup.db_revision) == 12
    assert sorted(p.name for p in store.local().path(backup.name).iterdir())[0] == "manifest.json"
    assert not store.local().partial_names()
    assert AuditEvent.objects.filter(action="backup.created", target=backup.name, actor="root").exists()


def test_a_second_run_while_the_worker_is_busy_gets_409(celery_worker, su_client):
    fill_workspace(megabytes=30)
    first = su_client.post(reverse("backups:run"), headers={"accept": "application/json"})
    second = su_client.post(reverse("backups:run"), headers={"accept": "application/json"})
    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["type"] == "urn:trustedoss:problem:operation_in_progress"
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while su_client.get(first.json()["status_url"]).json()["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, "the first backup did not finish"
        time.sleep(0.2)
    assert Backup.objects.get().status == "succeeded"
