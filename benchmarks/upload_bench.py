"""Upload benchmark: a generated multi-GB bundle uploaded with ``curl`` to "Upload and restore"
through ``scripts/run.sh``'s gunicorn on loopback, beside ``cat`` copying the same file on the
same disk.

    .venv/bin/python benchmarks/upload_bench.py [--gb 3] [--runs 1]

The instance lives under BENCH_ROOT/upload/ (its own var/, SQLite database, workspace and backup
root, on the embedded defaults run.sh uses). The bundle is made once with ``manage.py backup
--bundle`` from a workspace of incompressible files and cached with the instance's signing key,
so it is accepted as this installation's own.

Per run: the bundle is read once untimed (page cache), then ``cat bundle > copy`` is timed on the
same filesystem, with and without a final ``sync`` (the upload fsyncs each file it writes). The
upload is ``curl -T bundle -X POST`` with the session, the CSRF token and X-Confirm-Restore, and
is timed in two phases: receiving (until the server's hidden unpack directory holds the whole
bundle, unpacked) and the preflight that follows before the 202. Meanwhile the gunicorn workers'
memory is sampled every 50 ms. The queued restore then runs in run.sh's worker and is timed too.

Targets: receiving at least half of cat's MB/s; the gunicorn worker's peak RSS at most 150 MB
and flat (no growth with the bundle's size). Printed, never asserted.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset import BENCH_ROOT, PYTHON, REPO, _machine_ticks, code_identity  # noqa: E402

ROOT = BENCH_ROOT / "upload"
BUNDLE = ROOT / "bundle.tar.gz"
MARKER = ROOT / "bundle.json"
FILE_MB = 64
MB = 1024 * 1024
TARGET_RATIO = 0.5
TARGET_RSS_MB = 150


def instance_env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "CELERY_", "CACHE_URL"))}
    env.update(
        TRUSCA_VAR_DIR=str(ROOT / "var"),
        WORKSPACE_HOST_PATH=str(ROOT / "workspace"),
        BACKUP_ROOT=str(ROOT / "backups"),
        PORT=str(port),
        WEB_CONCURRENCY="2",
    )
    return env


def manage(*args: str, env: dict) -> str:
    return subprocess.run(
        [PYTHON, "manage.py", *args], cwd=REPO, env=env, check=True, capture_output=True, text=True
    ).stdout


# As run.sh's first start does it: the password is generated and written inside Python, never on
# a command line.
ADMIN = """
import os, secrets
from django.conf import settings
from django.contrib.auth import get_user_model
password_file = settings.VAR_DIR / "admin-password"
password = secrets.token_urlsafe(18)
password_file.unlink(missing_ok=True)
with os.fdopen(os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
    fh.write(password + "\\n")
User = get_user_model()
User.objects.filter(username="admin").delete()
User.objects.create_superuser("admin", email="", password=password)
"""


def make_bundle(gb: float, env: dict) -> None:
    """A backup of a workspace of incompressible files, as one bundle; cached with its size."""
    key = ROOT / "var" / "backup_signing_key"
    if MARKER.exists() and BUNDLE.exists() and key.exists():
        marker = json.loads(MARKER.read_text())
        if marker == {"gb": gb, "size": BUNDLE.stat().st_size, "admin": True}:
            return
    print(f"making a {gb} GB bundle (once; cached in {BUNDLE})", flush=True)
    for name in ("workspace", "backups"):
        shutil.rmtree(ROOT / name, ignore_errors=True)
        (ROOT / name).mkdir(parents=True)
    manage("migrate", "--noinput", env=env)
    # The admin login inside the bundle, with the password run.sh will find in var/: each run's
    # restore brings back the bundle's users, and the next run signs in as that admin.
    manage("shell", "--no-imports", "-c", ADMIN, env=env)
    files = int(gb * 1024 / FILE_MB)
    for i in range(files):
        directory = ROOT / "workspace" / f"scan-{i // 8}"
        directory.mkdir(exist_ok=True)
        with open(directory / f"blob-{i:04}.bin", "wb") as fh:
            for _ in range(FILE_MB):
                fh.write(os.urandom(MB))
    out = manage("backup", "--bundle", "--no-prune", env=env)
    made = Path(re.findall(r"✓ wrote (\S+\.tar\.gz)", out)[-1])  # the bundle comes after the backup's files
    made = made if made.is_absolute() else REPO / made
    os.replace(made, BUNDLE)
    shutil.rmtree(ROOT / "backups")
    shutil.rmtree(ROOT / "workspace")
    (ROOT / "workspace").mkdir()
    MARKER.write_text(json.dumps({"gb": gb, "size": BUNDLE.stat().st_size, "admin": True}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"scripts/run.sh exited with {proc.returncode}; see {ROOT / 'run.log'}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise SystemExit(f"scripts/run.sh did not answer on port {port}; see {ROOT / 'run.log'}")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int, *, system_only: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[12]) + (0 if system_only else int(fields[11]))) / os.sysconf("SC_CLK_TCK")


def gunicorn_workers(run_pid: int) -> list[int]:
    """The gunicorn worker processes (children of the master, which names the app)."""
    masters = [p for p in descendants(run_pid) if "gunicorn" in cmdline(p) and "trusca.wsgi" in cmdline(p)]
    return [w for m in masters for w in children(m) if "gunicorn" in cmdline(w)]


def curl(*args: str) -> str:
    return subprocess.run(["curl", "-sS", *args], check=True, capture_output=True, text=True).stdout


def sign_in(base: str, jar: Path) -> str:
    password = (ROOT / "var" / "admin-password").read_text().strip()
    curl("-c", str(jar), "-b", str(jar), "-o", "/dev/null", f"{base}/admin/login/")
    token = csrf(jar)
    curl(
        *("-c", str(jar), "-b", str(jar), "-o", "/dev/null", "-e", f"{base}/admin/login/"),
        *("--data-urlencode", f"csrfmiddlewaretoken={token}", "--data-urlencode", "username=admin"),
        *("--data-urlencode", f"password={password}", f"{base}/admin/login/?next=/admin/"),
    )
    if "sessionid" not in jar.read_text():
        raise SystemExit("could not sign in as admin with the password run.sh keeps in var/admin-password")
    return csrf(jar)


def csrf(jar: Path) -> str:
    return re.search(r"csrftoken\s+(\S+)", jar.read_text()).group(1)


def timed_cat(size: int) -> tuple[float, float]:
    """Seconds for ``cat bundle > copy`` on the same filesystem, without and with a final sync."""
    copy = ROOT / "copy.tar.gz"
    with open(os.devnull, "wb") as sink:
        subprocess.run(["cat", str(BUNDLE)], stdout=sink, check=True)
    results = []
    for then_sync in (False, True):
        copy.unlink(missing_ok=True)
        subprocess.run(["sync"], check=True)
        started = time.monotonic()
        with open(copy, "wb") as out:
            subprocess.run(["cat", str(BUNDLE)], stdout=out, check=True)
        if then_sync:
            subprocess.run(["sync"], check=True)
        results.append(time.monotonic() - started)
        copy.unlink()
    return results[0], results[1]


def one_run(base: str, jar: Path, run_pid: int) -> dict:
    token = csrf(jar)
    size = BUNDLE.stat().st_size
    workers = gunicorn_workers(run_pid)
    rss_before = {w: status_kb(w, "VmRSS") for w in workers}
    cpu_before = {w: cpu_seconds(w) for w in workers}
    sys_before = {w: cpu_seconds(w, system_only=True) for w in workers}
    peaks = dict.fromkeys(workers, 0)
    received_at: list[float] = []
    received_cpu: dict[int, float] = {}
    received_sys: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        backups = ROOT / "backups"
        while not done.is_set():
            for w in workers:
                peaks[w] = max(peaks[w], status_kb(w, "VmRSS"))
            if not received_at and any((p / "bundle").is_dir() for p in backups.glob(".partial-unpack-*")):
                received_at.append(time.monotonic())
                received_cpu.update({w: cpu_seconds(w) for w in workers})
                received_sys.update({w: cpu_seconds(w, system_only=True) for w in workers})
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    subprocess.run(["sync"], check=True)
    ticks_before = _machine_ticks()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    sampler.start()
    out = curl(
        *("-b", str(jar), "-X", "POST", "-T", str(BUNDLE), "-H", "Expect:"),
        *("-H", f"X-CSRFToken: {token}", "-H", "X-Confirm-Restore: yes", "-H", "Accept: application/json"),
        *("-H", "Content-Type: application/octet-stream", "-o", str(ROOT / "response.json")),
        *("-w", "%{http_code} %{speed_upload} %{time_total}"),
        f"{base}/admin/backup/restore?confirmation=restore&filename=bundle.tar.gz",
    )
    answered = time.monotonic()
    ticks_after = _machine_ticks()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    done.set()
    sampler.join()
    code, curl_speed, curl_total = out.split()
    if code != "202":
        raise SystemExit(f"the upload was answered {code}: {(ROOT / 'response.json').read_text()}")
    job = json.loads((ROOT / "response.json").read_text())
    receive = (received_at[0] if received_at else answered) - started
    restore_started = time.monotonic()
    while True:
        state = json.loads(curl("-b", str(jar), f"{base}{job['status_url']}"))
        if state["state"] in ("succeeded", "failed"):
            break
        time.sleep(1)
    restore_seconds = time.monotonic() - restore_started
    served = max(workers, key=lambda w: cpu_seconds(w) - cpu_before[w])
    tick = os.sysconf("SC_CLK_TCK")
    busy = ((ticks_after[0] - ticks_after[1]) - (ticks_before[0] - ticks_before[1])) / tick
    curl_cpu = sum(getattr(children_after, f) - getattr(children_before, f) for f in ("ru_utime", "ru_stime"))
    worker_cpu = cpu_seconds(served) - cpu_before[served]
    return {
        "size": size,
        "receive_s": receive,
        "check_s": answered - started - receive,
        "to_202_s": answered - started,
        "curl_MBps": float(curl_speed) / 1e6,
        "curl_total_s": float(curl_total),
        "worker_cpu_s": worker_cpu,
        "receive_cpu_s": received_cpu.get(served, cpu_seconds(served)) - cpu_before[served],
        "receive_sys_s": received_sys.get(served, cpu_seconds(served, system_only=True)) - sys_before[served],
        "curl_cpu_s": curl_cpu,
        "other_cpu_s": busy - worker_cpu - curl_cpu,
        "cores_s": (answered - started) * os.cpu_count(),
        "rss_before_mb": rss_before[served] / 1024,
        "rss_peak_mb": peaks[served] / 1024,
        "hwm_mb": status_kb(served, "VmHWM") / 1024,
        "restore": state["state"],
        "restore_error": state["error"],
        "restore_s": restore_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=3.0, help="size of the generated bundle (default 3)")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = instance_env(port)
    make_bundle(args.gb, env)
    size = BUNDLE.stat().st_size
    print(f"code: {code_identity()}")
    print(f"bundle: {BUNDLE} ({size / 1e9:.2f} GB), filesystem of {ROOT}")

    # Each run starts from an empty workspace (a restore leaves the bundle's 3 GB there), so its
    # safety backup costs the same every time.
    for name in ("backups", "workspace"):
        shutil.rmtree(ROOT / name, ignore_errors=True)
    (ROOT / "workspace").mkdir()
    with open(ROOT / "run.log", "w") as log:
        run = subprocess.Popen(
            ["bash", "scripts/run.sh"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_port(port, run)
        time.sleep(2)  # the worker and beat finish starting
        base = f"http://127.0.0.1:{port}"
        jar = ROOT / "cookies.txt"
        jar.unlink(missing_ok=True)
        sign_in(base, jar)
        results = []
        for number in range(args.runs):
            cat_s, cat_sync_s = timed_cat(size)
            result = one_run(base, jar, run.pid)
            result.update(cat_s=cat_s, cat_sync_s=cat_sync_s)
            results.append(result)
            rounded = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
            print(f"run {number + 1}: {json.dumps(rounded)}", flush=True)
            sign_in(base, jar)  # the restore ended every session
            shutil.rmtree(ROOT / "workspace")
            (ROOT / "workspace").mkdir()
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        try:
            run.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for name in ("backups", "workspace"):
            shutil.rmtree(ROOT / name, ignore_errors=True)

    mb = size / 1e6
    print()
    print(f"{'':28}{'seconds':>10}{'MB/s':>10}")
    for r in results:
        print(f"{'cat bundle > copy':28}{r['cat_s']:>10.2f}{mb / r['cat_s']:>10.0f}")
        print(f"{'cat bundle > copy; sync':28}{r['cat_sync_s']:>10.2f}{mb / r['cat_sync_s']:>10.0f}")
        print(f"{'upload: receive + unpack':28}{r['receive_s']:>10.2f}{mb / r['receive_s']:>10.0f}")
        print(f"{'upload: preflight':28}{r['check_s']:>10.2f}")
        until = f"{'upload: until the 202':28}{r['to_202_s']:>10.2f}{mb / r['to_202_s']:>10.0f}"
        print(f"{until}   (curl's average: {r['curl_MBps']:.0f})")
        print(f"{'queued restore (worker)':28}{r['restore_s']:>10.2f}   {r['restore']} {r['restore_error']}")
        print(
            f"receiving cost the gunicorn worker {r['receive_cpu_s']:.1f} CPU-s ({r['receive_sys_s']:.1f} in the "
            f"kernel; {mb / r['receive_cpu_s']:.0f} MB per CPU-s), curl {r['curl_cpu_s']:.1f}; other work on the "
            f"machine took {r['other_cpu_s']:.1f} of the "
            f"{r['cores_s']:.0f} CPU-s the {os.cpu_count()} cores had until the 202"
        )
        ratio = (mb / r["receive_s"]) / (mb / r["cat_s"])
        print(
            f"receive/cat: {ratio:.2f} (target >= {TARGET_RATIO}: {'PASS' if ratio >= TARGET_RATIO else 'MISS'}); "
            f"with cat's sync: {r['cat_sync_s'] / r['receive_s']:.2f}"
        )
        verdict = "PASS" if r["rss_peak_mb"] <= TARGET_RSS_MB else "MISS"
        print(
            f"gunicorn worker RSS: {r['rss_before_mb']:.0f} MB before, {r['rss_peak_mb']:.0f} MB peak sampled "
            f"(+{r['rss_peak_mb'] - r['rss_before_mb']:.0f} MB), VmHWM {r['hwm_mb']:.0f} MB "
            f"(target <= {TARGET_RSS_MB}: {verdict}); worker CPU {r['worker_cpu_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
