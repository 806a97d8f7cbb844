"""Encryption benchmark: an encrypted backup and restore against a plain one, same data, same run.

    .venv/bin/python benchmarks/encryption_bench.py [--size full] [--runs 3]

Both sides run ``manage.py backup --no-prune`` of the cached dataset (see dataset.py), one with
BACKUP_ENCRYPTION_PASSPHRASE set, then ``manage.py restore --yes --no-safety-backup`` of what they
wrote into the restore benchmark's target (database trusca_bench_restore, workspace
BENCH_ROOT/restore/workspace); the sides alternate order run by run and medians are compared.

Target (issue 12): encryption adds at most 15% to the time of a backup and of a restore; peak RSS
of the Python process stays <= 150 MB. Reported, never asserted.
"""

import argparse
import secrets
import shutil
import time
from pathlib import Path

from dataset import (
    BENCH_ROOT,
    PYTHON,
    SIZES,
    Dataset,
    bash,
    code_dir,
    code_identity,
    dataset,
    median,
    pg_env,
    run_measured,
    snapshot_code,
)

TARGET_OVERHEAD = 0.15
TARGET_RSS_MB = 150
# A throwaway passphrase per run, given through the environment as in production.
PASSPHRASE = secrets.token_urlsafe(24)


def backup(ds: Dataset, *, encrypted: bool) -> tuple[dict, Path]:
    extra = {"BACKUP_ENCRYPTION_PASSPHRASE": PASSPHRASE} if encrypted else {}
    m = run_measured([PYTHON, "manage.py", "backup", "--no-prune"], env=ds.env(**extra), cwd=code_dir())
    m.check("manage.py backup")
    path = Path(m.stdout.strip().splitlines()[-1])
    path = path if path.is_absolute() else code_dir() / path
    size = sum(p.stat().st_size for p in path.iterdir())
    return {"seconds": m.seconds, "rss_kb": m.main_peak_kb, "bytes": size}, path


def restore(source: Path, target: Dataset, *, encrypted: bool) -> dict:
    extra = {"BACKUP_ENCRYPTION_PASSPHRASE": PASSPHRASE} if encrypted else {}
    cmd = [PYTHON, "manage.py", "restore", "--yes", "--no-safety-backup", str(source)]
    m = run_measured(cmd, env=target.env(**extra), cwd=code_dir()).check("manage.py restore")
    return {"seconds": m.seconds, "rss_kb": m.main_peak_kb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=list(SIZES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-snapshot", action="store_true", help="run the live working tree")
    args = parser.parse_args()
    started = time.monotonic()
    print(f"Encryption benchmark, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, data under {BENCH_ROOT}")
    identity = code_identity() if args.no_snapshot else snapshot_code()
    print(f"code: {identity}, run from {code_dir()}")
    ds = dataset(args.size)
    ds.ensure()
    ds.migrate()
    target = Dataset("restore", {}, dbname="trusca_bench_restore")
    bash(f"dropdb --if-exists '{target.dbname}' && createdb '{target.dbname}'", env=pg_env("postgres")).check("db")
    target.migrate()  # a restore goes into a portal's database, as on a new host after `migrate`
    target.workspace.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ds.backup_root, ignore_errors=True)
    rows = []
    for i in range(args.runs):
        for encrypted in (False, True) if i % 2 == 0 else (True, False):
            bash("sync").check("sync")
            made, path = backup(ds, encrypted=encrypted)
            shutil.rmtree(target.backup_root, ignore_errors=True)
            target.backup_root.mkdir(parents=True)
            bash("sync").check("sync")
            back = restore(path, target, encrypted=encrypted)
            shutil.rmtree(path)
            rows.append({"run": i + 1, "encrypted": encrypted, "backup": made, "restore": back})
            print(
                f"  run {i + 1} {'encrypted' if encrypted else 'plain    '}: backup {made['seconds']:.1f} s "
                f"({made['bytes']:,} B, RSS {made['rss_kb'] / 1024:.0f} MB), restore {back['seconds']:.1f} s "
                f"(RSS {back['rss_kb'] / 1024:.0f} MB)",
                flush=True,
            )
    print("\n== Summary (medians)")
    for phase in ("backup", "restore"):
        plain = median([r[phase]["seconds"] for r in rows if not r["encrypted"]])
        sealed = median([r[phase]["seconds"] for r in rows if r["encrypted"]])
        rss = max(r[phase]["rss_kb"] for r in rows if r["encrypted"]) / 1024
        overhead = sealed / plain - 1
        print(
            f"  {phase}: plain {plain:.1f} s, encrypted {sealed:.1f} s -> overhead {overhead:+.1%} "
            f"(target <= {TARGET_OVERHEAD:.0%}) {'PASS' if overhead <= TARGET_OVERHEAD else 'MISS'}; "
            f"peak RSS encrypted {rss:.0f} MB {'PASS' if rss <= TARGET_RSS_MB else 'MISS'}"
        )
    print(f"\n(benchmark took {(time.monotonic() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
