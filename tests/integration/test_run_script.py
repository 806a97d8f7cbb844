"""scripts/run.sh, the README's start command, on the embedded defaults: no database or broker
server, a first start in empty state directories, a working login, and a backup run through the
web by the worker it started."""

import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from django.conf import settings

pytestmark = pytest.mark.integration

START_TIMEOUT_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def portal(tmp_path):
    repo_entries = set(settings.BASE_DIR.iterdir())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")}
    env.update(
        PORT=str(port),
        TRUSCA_VAR_DIR=str(tmp_path / "var"),
        WORKSPACE_HOST_PATH=str(tmp_path / "workspace"),
        BACKUP_ROOT=str(tmp_path / "backups"),
    )
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(
        [str(settings.BASE_DIR / "scripts" / "run.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while b"TRUSCA is running" not in (tmp_path / "run.log").read_bytes():
        assert proc.poll() is None, (tmp_path / "run.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
        time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}", tmp_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    # All state goes to the directories the environment names, none into the checkout.
    assert set(settings.BASE_DIR.iterdir()) == repo_entries


def test_the_start_command_brings_up_a_working_admin_with_a_worker(portal):
    base, root = portal
    output = (root / "run.log").read_text()
    password_file = root / "var" / "admin-password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text().strip()
    assert f"password:  {password}" in output and "user:      admin" in output

    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login_page = browser.open(f"{base}/admin/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page).group(1)
    form = urllib.parse.urlencode(
        {"csrfmiddlewaretoken": token, "username": "admin", "password": password, "next": "/admin/"}
    ).encode()
    request = urllib.request.Request(f"{base}/admin/login/", data=form, headers={"Referer": f"{base}/admin/login/"})
    assert "Site administration" in browser.open(request).read().decode()
    assert "Run manual backup now" in browser.open(f"{base}/admin/backup/").read().decode()

    csrf = next(c.value for c in jar if c.name == "csrftoken")
    run = urllib.request.Request(
        f"{base}/admin/backup/run",
        data=b"",
        method="POST",
        headers={"X-CSRFToken": csrf, "Accept": "application/json", "Referer": f"{base}/admin/backup/"},
    )
    status_url = json.loads(browser.open(run).read())["status_url"]
    deadline = time.monotonic() + 60
    while (state := json.loads(browser.open(f"{base}{status_url}").read()))["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state["status"] == "succeeded", state["message"]
    assert (root / "backups" / state["name"] / "manifest.json").is_file()
    assert any((root / "workspace").iterdir()), "the first start seeds demo scans with workspace files"
