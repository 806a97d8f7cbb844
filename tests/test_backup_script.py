"""scripts/backup.sh, as cron runs it: from any directory, without a terminal."""

import os
import subprocess
from pathlib import Path

from django.conf import settings

from tests.helpers import backup_dirs, fill_workspace, subprocess_env


def test_it_works_from_another_directory_and_prints_only_the_plain_lines(demo):
    script = Path(settings.BASE_DIR) / "scripts" / "backup.sh"
    result = subprocess.run(
        [str(script), "--no-prune"],
        cwd="/",
        env=subprocess_env(),
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

    fill_workspace(megabytes=150)  # enough text that the backup outlasts a few progress ticks
    leader, follower = pty.openpty()
    script = Path(settings.BASE_DIR) / "scripts" / "backup.sh"
    proc = subprocess.Popen(
        [str(script), "--no-prune"],
        env=subprocess_env(),
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
