"""A real Celery worker on the real Redis, sharing the test's database, directories and cache.

Shared by the worker integration tests and the browser tests (each conftest imports the fixture).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.cache import cache

from tests.helpers import subprocess_env
from trusca.backups import locks, maintenance
from trusca.celery import app as celery_app

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_TIMEOUT_SECONDS = 30


@pytest.fixture
def celery_worker(transactional_db, settings, tmp_path):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    # A lock or maintenance flag left in Redis by an interrupted earlier run would refuse this one.
    cache.delete_many([locks.KEY, maintenance.KEY])

    if celery_app.conf.broker_url != REDIS_URL:
        pytest.fail(f"run the worker tests with CELERY_BROKER_URL={REDIS_URL} (scripts/test.sh does)")
    celery_app.control.purge()  # messages an interrupted earlier run left behind
    env = subprocess_env(CELERY_BROKER_URL=REDIS_URL, CACHE_URL=REDIS_URL)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "trusca", "worker"),
                *("-Q", "backups,default", "--pool=solo", "--loglevel=INFO", "-n", f"test-{os.getpid()}@%h"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_ready(worker, log_path)
        yield worker
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        cache.delete_many([locks.KEY, maintenance.KEY])


def _wait_until_ready(worker: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(f"the Celery worker exited with {worker.returncode}:\n{log_path.read_text()}")
        if " ready." in log_path.read_text():
            return
        time.sleep(0.1)
    pytest.fail(f"the Celery worker did not start in {START_TIMEOUT_SECONDS} s:\n{log_path.read_text()}")
