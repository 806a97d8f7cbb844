"""scripts/run.sh, the README's start command, on the embedded defaults: no database or broker
server, a first start in empty state directories, a working login, and a backup run through the
web by the worker it started."""

import http.client
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
    banner = output.index("TRUSCA is running")
    assert output.index(" ready.") < banner, "the worker's start-up banner comes before the sign-in banner"
    assert output.index("beat: Starting") < banner
    password_file = root / "var" / "admin-password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text().strip()
    assert f"password:  {password}" in output and "user:      admin" in output

    browser, jar = sign_in(base, password)
    assert "Run manual backup now" in browser.open(f"{base}/admin/backup/").read().decode()

    state = backup_through_the_web(base, browser, jar)
    assert state["status"] == "succeeded", state["message"]
    assert (root / "backups" / state["name"] / "manifest.json").is_file()
    assert any((root / "workspace").iterdir()), "the first start seeds demo scans with workspace files"


def sign_in(base: str, password: str):
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login_page = browser.open(f"{base}/admin/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page).group(1)
    form = urllib.parse.urlencode(
        {"csrfmiddlewaretoken": token, "username": "admin", "password": password, "next": "/admin/"}
    ).encode()
    request = urllib.request.Request(f"{base}/admin/login/", data=form, headers={"Referer": f"{base}/admin/login/"})
    assert "Site administration" in browser.open(request).read().decode()
    return browser, jar


def backup_through_the_web(base: str, browser, jar) -> dict:
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
    return {**state, "status_url": status_url}


def upload_request(path: str, jar, length: int) -> tuple[str, dict]:
    cookies = {c.name: c.value for c in jar}
    return f"{path}?confirmation=restore&filename=bundle.tar.gz", {
        "Cookie": f"sessionid={cookies['sessionid']}; csrftoken={cookies['csrftoken']}",
        "X-CSRFToken": cookies["csrftoken"],
        "X-Confirm-Restore": "yes",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(length),
        "Accept": "application/json",
    }


def hidden_unpacks(root) -> list[str]:
    return [p.name for p in (root / "backups").iterdir() if p.name.startswith(".partial-unpack-")]


def test_an_upload_through_gunicorn_goes_straight_from_its_socket_and_the_connection_stays_usable(portal):
    """run.sh's gunicorn hands the upload's socket to the view: a client gone half-way leaves
    nothing, a whole upload is restored, and gunicorn reads the connection's next request as a
    request, not as what it took for the rest of the body."""
    base, root = portal
    password = (root / "var" / "admin-password").read_text().strip()
    browser, jar = sign_in(base, password)
    state = backup_through_the_web(base, browser, jar)
    pk = state["status_url"].split("/")[-2]
    bundle = browser.open(f"{base}/admin/backup/{pk}/download").read()
    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    target, headers = upload_request("/admin/backup/restore", jar, len(bundle))

    with socket.create_connection((host, int(port))) as half:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        half.sendall(f"POST {target} HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode() + bundle[: len(bundle) // 2])
        deadline = time.monotonic() + 30
        while not hidden_unpacks(root):
            assert time.monotonic() < deadline, "the server did not start receiving"
            time.sleep(0.1)
    deadline = time.monotonic() + 30
    while hidden_unpacks(root):
        assert time.monotonic() < deadline, "the partial upload was not removed"
        time.sleep(0.1)

    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", target, body=bundle, headers=headers)
    accepted = connection.getresponse()
    job = json.loads(accepted.read())
    assert accepted.status == 202, job  # the lock the cut-off upload held is free again
    connection.request("GET", job["status_url"], headers={"Cookie": headers["Cookie"]})
    followed = connection.getresponse()  # on the same connection, within its timeout
    assert followed.status == 200 and json.loads(followed.read())["id"] == job["id"]
    deadline = time.monotonic() + 90
    while (job := json.loads(urllib.request.urlopen(f"{base}{job['status_url']}").read()))["state"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "succeeded", job["error"]
    connection.close()


def test_ctrl_c_on_a_piped_run_stops_every_child(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")}
    env.update(
        PORT=str(port),
        TRUSCA_VAR_DIR=str(tmp_path / "var"),
        WORKSPACE_HOST_PATH=str(tmp_path / "workspace"),
        BACKUP_ROOT=str(tmp_path / "backups"),
    )
    seen = tmp_path / "seen.log"
    # The reader at the end of the pipe dies with Ctrl-C too, as grep or tail on a terminal do.
    shell = subprocess.Popen(
        ["bash", "-c", f"{settings.BASE_DIR}/scripts/run.sh 2>&1 | grep --line-buffered 'TRUSCA is running' > {seen}"],
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while b"TRUSCA is running" not in (seen.read_bytes() if seen.exists() else b""):
        assert shell.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    # The reader goes first (head that has seen enough, a grep killed), then the script is
    # interrupted: its children must not outlive it, whatever happens to its output.
    [reader] = [pid for pid, cmd in _processes_of(tmp_path, with_pids=True) if cmd.startswith("grep")]
    os.kill(reader, signal.SIGKILL)
    [script] = [pid for pid, cmd in _processes_of(tmp_path, with_pids=True) if cmd.endswith("scripts/run.sh ")]
    os.kill(script, signal.SIGINT)
    shell.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _processes_of(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_of(tmp_path) == []
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "nothing listens on the port any more"


def _processes_of(root, *, with_pids: bool = False) -> list:
    """Command lines (and pids) of the processes whose environment names this run's var directory."""
    found = []
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            with open(f"/proc/{proc}/environ", "rb") as fh:
                if f"TRUSCA_VAR_DIR={root / 'var'}".encode() not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{proc}/cmdline", "rb") as fh:
                command = fh.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found.append((int(proc), command) if with_pids else command)
    return found
