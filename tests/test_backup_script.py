"""scripts/backup.sh, as cron runs it: from any directory, without a terminal."""

import os
import subprocess
from pathlib import Path

from django.conf import settings
from django.db import connection

from tests.helpers import backup_dirs


def env_for_subprocess() -> dict[str, str]:
    db = settings.DATABASES["default"]
    if connection.vendor == "postgresql":
        url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    else:
        url = f"sqlite:///{db['NAME']}"
    return {
        **os.environ,
        "DATABASE_URL": url,
        "WORKSPACE_HOST_PATH": str(settings.WORKSPACE_HOST_PATH),
        "BACKUP_ROOT": str(settings.BACKUP_ROOT),
        "TRUSCA_VAR_DIR": str(settings.VAR_DIR),
    }


def test_it_works_from_another_directory_and_prints_only_the_plain_lines(demo):
    script = Path(settings.BASE_DIR) / "scripts" / "backup.sh"
    result = subprocess.run(
        [str(script), "--no-prune"],
        cwd="/",
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    [directory] = backup_dirs()
    lines = result.stdout.splitlines()
    assert lines[0] == f"Backup → {directory}"
    assert lines[-2:] == ["Backup complete", str(directory)]
    assert result.stderr == ""  # no TTY: no progress line


def test_on_a_terminal_it_shows_live_progress_on_stderr(demo):
    import pty

    (settings.WORKSPACE_HOST_PATH / "big.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    leader, follower = pty.openpty()
    script = Path(settings.BASE_DIR) / "scripts" / "backup.sh"
    proc = subprocess.Popen(
        [str(script), "--no-prune"],
        env=env_for_subprocess(),
        stdout=subprocess.PIPE,
        stderr=follower,
        stdin=subprocess.DEVNULL,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    stdout, _ = proc.communicate()
    os.close(leader)
    assert proc.returncode == 0
    assert b"backing up [" in seen and b"%" in seen
    assert b"backing up" not in stdout
