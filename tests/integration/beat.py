"""A real Celery beat with django-celery-beat's DatabaseScheduler, on the test's database and the
real Redis, beside the worker of tests/integration/worker.py (whose fixture it needs)."""

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from tests.helpers import subprocess_env
from tests.integration.worker import REDIS_URL
from trusca.backups.schedule import DAILY

START_TIMEOUT_SECONDS = 30


@contextlib.contextmanager
def running_beat(log_path: Path, **env: str) -> Iterator[subprocess.Popen]:
    # A one-second loop instead of five: the test sees a changed schedule within a second.
    with open(log_path, "ab") as log:
        beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "trusca", "beat", "--loglevel=INFO", "--max-interval=1"],
            cwd=settings.BASE_DIR,
            env=subprocess_env(CELERY_BROKER_URL=REDIS_URL, CACHE_URL=REDIS_URL, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        # Past the start-up hook (schedule.at_beat_start), which changes the schedule itself: a
        # test that changes it meanwhile races beat's own re-reads.
        while f"beat: {DAILY} is " not in log_path.read_text():
            if beat.poll() is not None:
                pytest.fail(f"celery beat exited with {beat.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"celery beat did not start in {START_TIMEOUT_SECONDS} s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield beat
    finally:
        beat.terminate()
        try:
            beat.wait(timeout=10)
        except subprocess.TimeoutExpired:
            beat.kill()
            beat.wait()
