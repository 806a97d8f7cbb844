import os
import time

import pytest

from trusca.backups import locks


@pytest.fixture(params=["file", "redis"])
def backend(request, settings):
    if request.param == "redis":
        url = os.environ.get("TEST_REDIS_URL")
        if not url:
            pytest.skip("TEST_REDIS_URL is not set")
        settings.CACHES = {
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": url,
                "KEY_PREFIX": f"test-{os.getpid()}-{time.time_ns()}",
            }
        }
    return request.param


def test_only_one_holder_at_a_time(backend):
    with (
        locks.OperationLock("a manual backup"),
        pytest.raises(locks.Busy, match="a manual backup is already running"),
    ):
        locks.OperationLock("a restore").acquire()
    with locks.OperationLock("a restore"):
        assert locks.current()["what"] == "a restore"
    assert locks.current() is None


def test_a_lock_can_be_adopted_by_the_worker_that_runs_the_job(backend):
    queued = locks.OperationLock("a manual backup", owner="backup:x").acquire()
    adopted = locks.adopt("backup:x")
    assert adopted is not None and locks.adopt("backup:other") is None
    adopted.release()
    assert locks.current() is None
    queued.release()


def test_a_holder_that_fell_silent_no_longer_blocks(backend, settings):
    settings.BACKUP_STALE_SECONDS = 2
    locks.OperationLock("a backup whose worker died").acquire()
    if backend == "file":
        past = time.time() - 3
        os.utime(settings.VAR_DIR / "operation.lock", (past, past))
    else:
        time.sleep(2.2)
    with locks.OperationLock("a restore"):
        assert locks.current()["what"] == "a restore"


def test_release_by_a_stranger_does_nothing(backend):
    mine = locks.OperationLock("a restore").acquire()
    locks.OperationLock("a restore", owner="someone-else").release()
    assert locks.current()["owner"] == mine.owner
    mine.release()
