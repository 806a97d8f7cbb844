"""Benchmark datasets and the measuring harness shared by the backup and restore benchmarks.

A dataset is a dedicated PostgreSQL database plus a workspace directory, both made once with
``manage.py seed_demo`` and cached under BENCH_ROOT (default /work/bench-data, outside the repo).
A marker file records the seed options and the measured sizes; a dataset whose marker, database
and workspace all agree with the wanted options is reused, anything else is rebuilt.

Run it alone to build (or check) the datasets: ``.venv/bin/python benchmarks/dataset.py``.
"""

import argparse
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
BENCH_ROOT = Path(os.environ.get("TRUSCA_BENCH_ROOT", "/work/bench-data"))
PG_HOST = os.environ.get("TRUSCA_BENCH_PGHOST", "127.0.0.1")
PG_PORT = os.environ.get("TRUSCA_BENCH_PGPORT", "5432")
PG_USER = os.environ.get("TRUSCA_BENCH_PGUSER", "postgres")

# Measured on this machine: one scan (750 files of ~26 KiB, 43,000 findings) is ~25 MB of database
# and ~21 MB of workspace, so 40 scans make ~1 GB of database and ~800 MB / 30,000 files.
SIZES = {
    "quarter": {"projects": 2, "scans": 5, "files": 750, "file_kb": 26, "findings": 43000, "audit_events": 2000},
    "full": {"projects": 8, "scans": 5, "files": 750, "file_kb": 26, "findings": 43000, "audit_events": 8000},
    # The same ~1 GB database beside 68,000 small files (~750 MB): where walking the tree costs
    # more than compressing it.
    "many": {"projects": 8, "scans": 5, "files": 1700, "file_kb": 11, "findings": 43000, "audit_events": 8000},
    # Three times "full": ~3 GB of database and ~2.4 GB of workspace in 90,000 files.
    "triple": {"projects": 24, "scans": 5, "files": 750, "file_kb": 26, "findings": 43000, "audit_events": 24000},
}

MB = 1024 * 1024
_CODE = {"dir": REPO}
# manage.py wants one; a fresh one per benchmark run, since nothing here signs in.
SECRET_KEY = secrets.token_urlsafe(32)


def code_dir() -> Path:
    """Where manage.py runs: the repo, or the frozen copy made by snapshot_code()."""
    return _CODE["dir"]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def code_identity() -> str:
    """The commit, and a fingerprint of the uncommitted changes, of the code being measured."""
    outside = [".", ":(exclude)benchmarks"]
    head = _git("rev-parse", "--short", "HEAD").strip()
    diff = _git("diff", "HEAD", "--", *outside)
    untracked = [f for f in _git("ls-files", "-o", "--exclude-standard", "--", *outside).splitlines() if f]
    if not diff and not untracked:
        return f"HEAD {head}, clean"
    digest = hashlib.sha1(diff.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"HEAD {head} + uncommitted changes (diff sha1 {digest}, {len(untracked)} untracked files)"


def snapshot_code() -> str:
    """Freeze the working tree as it is now (others edit it while benchmarks run) under
    BENCH_ROOT/code/ and run manage.py from there, so every run of a benchmark measures the same
    code. Returns the code's identity."""
    identity = code_identity()
    files = [f for f in _git("ls-files", "-co", "--exclude-standard").splitlines() if f]
    parent = BENCH_ROOT / "code"
    shutil.rmtree(parent, ignore_errors=True)
    dest = parent / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in files:
        if name.startswith(("benchmarks/", "tests/")) or not (REPO / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    _CODE["dir"] = dest
    return identity


def pg_env(dbname: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=PG_HOST, PGPORT=PG_PORT, PGUSER=PG_USER, PGDATABASE=dbname)
    return env


def psql_value(dbname: str, sql: str) -> str:
    out = subprocess.run(
        ["psql", "--no-psqlrc", "-At", "-c", sql], env=pg_env(dbname), capture_output=True, text=True, check=True
    ).stdout
    return out.strip()


def db_exists(dbname: str) -> bool:
    # The names are this module's own constants, never input.
    return psql_value("postgres", f"SELECT count(*) FROM pg_database WHERE datname = '{dbname}'") == "1"  # noqa: S608


def db_size(dbname: str) -> int:
    return int(psql_value("postgres", f"SELECT pg_database_size('{dbname}')"))


def tree_stats(root: Path) -> tuple[int, int]:
    """(bytes of regular files, number of regular files) under root."""
    total = count = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
            count += 1
    return total, count


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass
class Dataset:
    name: str
    options: dict
    dbname: str = ""
    home: Path = field(default=Path())
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dbname = self.dbname or f"trusca_bench_{self.name}"
        self.home = BENCH_ROOT / self.name

    @property
    def workspace(self) -> Path:
        return self.home / "workspace"

    @property
    def backup_root(self) -> Path:
        return self.home / "backups"

    @property
    def marker(self) -> Path:
        return self.home / "dataset.json"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment manage.py runs in: this dataset's database, workspace and backup root."""
        env = pg_env(self.dbname)
        for key in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
            env.pop(key)
        env.update(
            DATABASE_URL=f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.dbname}",
            WORKSPACE_HOST_PATH=str(self.workspace),
            BACKUP_ROOT=str(self.backup_root),
            # The operation lock, the maintenance flag and the file cache live here: nothing is
            # shared with the developers' own var/ directory.
            TRUSCA_VAR_DIR=str(BENCH_ROOT / "var"),
            SECRET_KEY=SECRET_KEY,
            DEBUG="False",
        )
        env.update(extra)
        return env

    def manage(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=code_dir(),
            env=self.env(**extra),
            capture_output=True,
            text=True,
            check=False,
        )

    def cached(self) -> bool:
        try:
            info = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        if info.get("options") != self.options or not db_exists(self.dbname) or not self.workspace.is_dir():
            return False
        _bytes, files = tree_stats(self.workspace)
        if files != info.get("workspace_files"):
            return False
        self.info = info
        return True

    def ensure(self, log=print) -> dict:
        if self.cached():
            log(f"dataset {self.name}: cached ({self.describe()})")
            return self.info
        log(f"dataset {self.name}: building {self.dbname} and {self.workspace} with seed_demo {self.seed_args()}")
        started = time.monotonic()
        self.marker.unlink(missing_ok=True)
        subprocess.run(["dropdb", "--if-exists", self.dbname], env=pg_env("postgres"), check=True)
        subprocess.run(["createdb", self.dbname], env=pg_env("postgres"), check=True)
        shutil.rmtree(self.workspace, ignore_errors=True)
        shutil.rmtree(self.backup_root, ignore_errors=True)
        self.workspace.mkdir(parents=True)
        for args in (["migrate", "-v0", "--skip-checks"], ["seed_demo", "--skip-checks", *self.seed_args()]):
            result = self.manage(*args)
            if result.returncode != 0:
                raise SystemExit(f"manage.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        subprocess.run(["psql", "--no-psqlrc", "-q", "-c", "VACUUM ANALYZE"], env=pg_env(self.dbname), check=True)
        ws_bytes, ws_files = tree_stats(self.workspace)
        self.info = {
            "options": self.options,
            "db_size": db_size(self.dbname),
            "workspace_bytes": ws_bytes,
            "workspace_files": ws_files,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        self.marker.write_text(json.dumps(self.info, indent=1))
        log(f"dataset {self.name}: built in {self.info['build_seconds']} s ({self.describe()})")
        return self.info

    def migrate(self) -> None:
        """Bring a cached dataset's schema up to the code being measured (a no-op when it is)."""
        result = self.manage("migrate", "-v0", "--skip-checks")
        if result.returncode != 0:
            raise SystemExit(f"manage.py migrate failed:\n{result.stdout}{result.stderr}")

    def seed_args(self) -> list[str]:
        return [f"--{key.replace('_', '-')}={value}" for key, value in self.options.items()]

    def describe(self) -> str:
        i = self.info
        return (
            f"database {human(i['db_size'])} (pg_database_size), "
            f"workspace {human(i['workspace_bytes'])} in {i['workspace_files']:,} files"
        )


def dataset(name: str) -> Dataset:
    return Dataset(name, SIZES[name])


# Measuring -----------------------------------------------------------------------------------


def _read_status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return values


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids.extend(int(k) for k in fh.read().split())
    except (OSError, ValueError):
        pass
    return kids


HZ = os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, idle + iowait ticks) of the machine so far."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    return sum(values), values[3] + values[4]


def _process_cpu() -> dict[int, tuple[str, int]]:
    """pid -> (name, user + system ticks of all its threads) for every process on the machine."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        close = stat.rindex(")")
        fields = stat[close + 2 :].split()
        found[int(entry.name)] = (stat[stat.index("(") + 1 : close], int(fields[11]) + int(fields[12]))
    return found


@dataclass
class Measured:
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    main_peak_kb: int = 0  # VmHWM of the process started (the Python process for manage.py)
    tree_sum_peak_kb: int = 0  # highest sum of VmRSS over the process and all its descendants
    tree_max_kb: int = 0  # ru_maxrss from wait4: the largest single process of the tree
    cpu_seconds: float = 0.0  # user + system CPU of the tree (not the PostgreSQL server's own work)
    sys_seconds: float = 0.0  # the system (kernel) part of it: file creation, pipes, page cache
    pg_server_cpu: float = 0.0  # CPU of the machine's postgres processes meanwhile (the server's share)
    other_cpu: float = 0.0  # CPU of everything else on the machine meanwhile: competing work, noise

    def check(self, what: str) -> "Measured":
        if self.returncode != 0:
            raise SystemExit(f"{what} failed (exit {self.returncode}):\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}")
        return self


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, poll: float = 0.05) -> Measured:
    """Run cmd to completion; wall-clock time and memory of the process and its descendants.

    The started process's own peak RSS is its kernel high-water mark (VmHWM), read from /proc every
    ``poll`` seconds until it exits; the last reading is taken as its peak. The machine's other CPU
    use meanwhile is told apart: PostgreSQL's processes (the server working for us, mostly) and
    everything else (other work competing for the two cores: the noise in the timing)."""
    out_path = BENCH_ROOT / "tmp" / f"out-{os.getpid()}-{time.monotonic_ns()}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path.with_suffix(".stdout"), "w+") as out, open(out_path.with_suffix(".stderr"), "w+") as err:
        census_first = _process_cpu()
        census_last = dict(census_first)
        machine_first = _machine_ticks()
        harness_first = time.process_time()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        peaks = {"main": 0, "sum": 0}
        done = threading.Event()
        tree: set[int] = {proc.pid}

        def watch() -> None:
            next_census = 0.0
            while not done.is_set():
                if time.monotonic() >= next_census:
                    census_last.update(_process_cpu())
                    next_census = time.monotonic() + 0.5
                main = _read_status(proc.pid)
                peaks["main"] = max(peaks["main"], main.get("VmHWM", 0))
                total, todo, seen = 0, [proc.pid], set()
                while todo:
                    pid = todo.pop()
                    if pid in seen:
                        continue
                    seen.add(pid)
                    tree.add(pid)
                    total += _read_status(pid).get("VmRSS", 0)
                    todo.extend(_children(pid))
                peaks["sum"] = max(peaks["sum"], total)
                done.wait(poll)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        machine_last = _machine_ticks()
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        watcher.join()
        census_last.update(_process_cpu())
        harness = time.process_time() - harness_first
        out.seek(0)
        err.seek(0)
        result = Measured(seconds, proc.returncode, out.read(), err.read())
    out_path.with_suffix(".stdout").unlink()
    out_path.with_suffix(".stderr").unlink()
    result.main_peak_kb = peaks["main"]
    result.tree_sum_peak_kb = peaks["sum"]
    result.tree_max_kb = usage.ru_maxrss
    result.cpu_seconds = usage.ru_utime + usage.ru_stime
    result.sys_seconds = usage.ru_stime
    busy = (machine_last[0] - machine_first[0]) - (machine_last[1] - machine_first[1])
    server = other = 0
    for pid, (name, ticks) in census_last.items():
        if pid in tree or pid == os.getpid():
            continue
        delta = ticks - census_first.get(pid, (name, 0))[1]
        if name == "postgres":
            server += delta
        else:
            other += delta
    result.pg_server_cpu = server / HZ
    # Whatever else kept the machine busy (the census misses short-lived processes): other work.
    residual = busy / HZ - result.cpu_seconds - result.pg_server_cpu - harness
    result.other_cpu = max(other / HZ, residual, 0.0)
    return result


def cpu_split(*measured: Measured) -> dict[str, float]:
    """CPU seconds of the runs' own process trees, of PostgreSQL meanwhile, and of other work."""
    return {
        "cpu": sum(m.cpu_seconds for m in measured),
        "sys": sum(m.sys_seconds for m in measured),
        "pg_cpu": sum(m.pg_server_cpu for m in measured),
        "other_cpu": sum(m.other_cpu for m in measured),
    }


def bash(script: str, *, env: dict | None = None) -> Measured:
    return run_measured(["bash", "-c", f"set -euo pipefail\n{script}"], env=env)


def median(values: list[float]) -> float:
    return statistics.median(values)


def files_size(*paths: Path) -> int:
    return sum(p.stat().st_size for path in paths for p in ([path] if path.is_file() else path.iterdir()))


def drop_outputs(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    args = parser.parse_args()
    for name in args.sizes.split(","):
        dataset(name).ensure()


if __name__ == "__main__":
    main()
