from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from trusca.backups.models import Backup
from trusca.backups.naming import format_name


def add_backups(count: int, *, first: int = 0) -> None:
    start = timezone.now().replace(microsecond=0) - timedelta(days=400)
    Backup.objects.bulk_create(
        (
            Backup(
                name=format_name("auto" if i % 2 else "manual", start + timedelta(minutes=i)),
                kind="auto" if i % 2 else "manual",
                status=Backup.Status.SUCCEEDED,
                created_at=start + timedelta(minutes=i),
                size_bytes=1_000_000 + i,
                db_revision="0123456789ab",
                progress=100,
                manifest={"files": {"workspace.tar.gz": {"size": i, "sha256": "0" * 64}}},
            )
            for i in range(first, first + count)
        ),
        batch_size=2000,
    )


def queries_for(client, path: str) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path)
        assert response.status_code == 200
    return [q["sql"] for q in captured.captured_queries]


@pytest.mark.parametrize("name", ["backups:index", "backups:list"])
def test_ten_thousand_backups_cost_the_same_queries_as_ten(su_client, name):
    add_backups(10)
    few = queries_for(su_client, reverse(name))
    add_backups(10_000 - 10, first=10)
    many = queries_for(su_client, reverse(name))
    assert len(many) == len(few)
    assert not [sql for sql in many if "COUNT(" in sql.upper()]


def test_an_old_page_of_ten_thousand_backups_is_as_cheap_as_the_first(su_client):
    add_backups(10_000)
    first = queries_for(su_client, reverse("backups:index"))
    last = queries_for(su_client, f"{reverse('backups:index')}?page=200")
    assert len(last) == len(first)
