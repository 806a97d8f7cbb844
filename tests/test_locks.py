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


def test_a_holder_that_lost_the_lock_can_neither_refresh_nor_release_its_successors(backend, settings):
    first = locks.OperationLock("a backup that stalled").acquire()
    # Its lock lapses (as after BACKUP_STALE_SECONDS of silence) and another process takes it.
    if backend == "file":
        (settings.VAR_DIR / "operation.lock").unlink()
    else:
        locks._backend().client.delete(locks._backend().key)
    second = locks.OperationLock("a restore").acquire()
    assert first.heartbeat() is False
    first.release()
    assert locks.current()["owner"] == second.owner
    assert second.heartbeat() is True
    second.release()
    assert locks.current() is None


def test_a_holder_whose_process_died_on_this_host_frees_the_lock_at_once(backend, settings):
    import subprocess
    import sys

    from tests.helpers import subprocess_env

    env = subprocess_env()
    if backend == "redis":
        env["CACHE_URL"] = os.environ["TEST_REDIS_URL"]
    script = (
        "import django, os; django.setup()\n"
        "from django.conf import settings\n"
        f"settings.CACHES['default']['KEY_PREFIX'] = {settings.CACHES['default'].get('KEY_PREFIX', '')!r}\n"
        "from trusca.backups import locks\n"
        "locks.OperationLock('a backup killed with SIGKILL').acquire()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script], env={**env, "DJANGO_SETTINGS_MODULE": "trusca.settings"}, cwd=settings.BASE_DIR
    )
    assert killed.returncode == -9
    with locks.OperationLock("the next backup"):
        assert locks.current()["what"] == "the next backup"


def test_a_queued_jobs_lock_does_not_die_with_the_process_that_queued_it(backend):
    queued = locks.OperationLock("a manual backup", owner="backup:x", this_process=False).acquire()
    assert "pid" not in locks.current()
    assert locks.adopt("backup:x").heartbeat() is True
    assert locks.current()["pid"] == os.getpid()
    queued.release()  # the queuing process lets go of what it no longer holds: nothing happens
    assert locks.current()["owner"] == "backup:x"
