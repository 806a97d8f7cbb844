"""Restore benchmark: ``manage.py restore`` as operators run it against the bare shell restore, same backup,
same run, on the real disk.

    .venv/bin/python benchmarks/restore_bench.py [--sizes full,triple] [--runs 3]

The source is a fresh ``manage.py backup`` of a cached dataset (see dataset.py: ~1 GB, ~3 GB); every
side restores that same backup into a separate target (the database trusca_bench_restore and the
workspace BENCH_ROOT/restore/workspace), which before each run holds a full workspace again (a
hard-linked copy of the dataset's, untimed) and the ~1 GB (or ~3 GB) database of the previous run.

The bare reference (what an operator would otherwise run by hand, the portal manual's restore):

    gunzip -c postgres.sql.gz | psql --single-transaction -v ON_ERROR_STOP=1
    rm -rf $WORKSPACE && mkdir $WORKSPACE && tar -xzf workspace.tar.gz -C $WORKSPACE

Ours, two ways: ``manage.py restore --yes -v 2 <backup>`` as operators run it (every check and the
safety backup), and with ``--no-safety-backup``. ``-v 2`` makes it print how long each step took,
from which the phases are read: preflight, the safety dump, staging and load, swap, afterwards, and
the safety backup's workspace archived once the portal is back online. "Downtime" is the time from
maintenance mode on to the portal back online: what operators feel.

Targets (issue 13): ours as operators run it at most 1.0x the reference; peak RSS <= 150 MB.
Reported, never asserted.
"""

import argparse
import json
import re
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
    cpu_split,
    dataset,
    db_exists,
    median,
    pg_env,
    psql_value,
    run_measured,
    snapshot_code,
)

TARGET_RATIO = 1.0
TARGET_RSS_MB = 150
DUMP, ARCHIVE = "postgres.sql.gz", "workspace.tar.gz"


def backup_path(stdout: str) -> Path:
    path = Path(stdout.strip().splitlines()[-1])
    return path if path.is_absolute() else code_dir() / path


def take_backup(ds: Dataset, what: str):
    m = run_measured([PYTHON, "manage.py", "backup", "--no-prune"], env=ds.env(), cwd=code_dir()).check(what)
    return m, backup_path(m.stdout)


def primed(target: Dataset) -> bool:
    if not db_exists(target.dbname):
        return False
    sql = "SELECT count(*) FROM pg_tables WHERE tablename = 'portal_auditevent'"
    return psql_value(target.dbname, sql) == "1"


def run_reference(source: Path, target: Dataset) -> dict:
    db = bash(
        f"gunzip -c '{source}/{DUMP}' | psql --single-transaction -v ON_ERROR_STOP=1 > /dev/null",
        env=pg_env(target.dbname),
    ).check("reference database restore")
    live = target.workspace
    ws = bash(f"rm -rf '{live}' && mkdir '{live}' && tar -xzf '{source}/{ARCHIVE}' -C '{live}'").check(
        "reference workspace restore"
    )
    return {
        "side": "reference",
        "seconds": db.seconds + ws.seconds,
        "downtime": db.seconds + ws.seconds,
        "db_seconds": db.seconds,
        "ws_seconds": ws.seconds,
        **cpu_split(db, ws),
    }


def settle(target: Dataset) -> None:
    """Untimed: flush dirty pages and checkpoint, so a run does not pay for the previous one's writes."""
    bash("sync").check("sync")
    bash("psql --no-psqlrc -q -c CHECKPOINT", env=pg_env(target.dbname)).check("CHECKPOINT")
    bash("sync").check("sync")


def full_live_workspace(ds: Dataset, target: Dataset) -> None:
    """Untimed: the target's live workspace holds the dataset's files again (hard links: fast, and
    each side still has every file to read, move and remove)."""
    shutil.rmtree(target.workspace, ignore_errors=True)
    bash(f"cp -al '{ds.workspace}' '{target.workspace}'").check("cp -al")
    shutil.rmtree(target.backup_root, ignore_errors=True)
    target.backup_root.mkdir(parents=True)


STEP = re.compile(r"^[✓!] (?P<text>.*) \[(?P<seconds>[0-9.]+) s\]$")
PHASES = (
    ("preflight", ("preflight",)),
    ("safety db", ("safety backup of the database",)),
    ("stage+load", ("workspace extracted into staging", "database restored")),
    ("swap", ("workspace restored",)),
    ("after", ("sessions flushed", "portal back online")),
    ("safety ws", ("safety backup →",)),
)


def phases(stdout: str) -> dict:
    """Seconds per phase and the downtime (maintenance on to the portal back online), from the
    step lines ``-v 2`` prints with the time each step took."""
    steps = [(m["text"], float(m["seconds"])) for line in stdout.splitlines() if (m := STEP.match(line))]
    found = {name: sum(s for text, s in steps if text.startswith(starts)) for name, starts in PHASES}
    down, counting = 0.0, False
    for text, seconds in steps:
        if counting:
            down += seconds
        if text.startswith("maintenance mode on"):
            counting = True
        if text.startswith("portal back online"):
            break
    found["downtime"] = down
    return found


def run_ours(source: Path, target: Dataset, *, safety: bool) -> dict:
    cmd = [PYTHON, "manage.py", "restore", "--yes", "-v", "2", str(source)]
    if not safety:
        cmd.insert(4, "--no-safety-backup")
    m = run_measured(cmd, env=target.env(), cwd=code_dir()).check("manage.py restore")
    found = phases(m.stdout)
    return {
        "side": "ours" if safety else "ours-nosafe",
        "seconds": m.seconds,
        "downtime": found.pop("downtime"),
        "phases": found,
        "rss_kb": m.main_peak_kb,
        "tree_sum_kb": m.tree_sum_peak_kb,
        **cpu_split(m),
        "stdout": m.stdout,
    }


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def bench_size(name: str, runs: int) -> dict:
    ds = dataset(name)
    ds.ensure()
    ds.migrate()
    target = Dataset("restore", {}, dbname="trusca_bench_restore")
    print(f"\n== {name}: {ds.describe()}; restoring into the database {target.dbname} and {target.workspace}")
    shutil.rmtree(ds.backup_root, ignore_errors=True)
    made, source = take_backup(ds, "manage.py backup of the dataset")
    files = {p.name: p.stat().st_size for p in source.iterdir()}
    print(f"   source: {source} ({', '.join(f'{k} {v:,} B' for k, v in sorted(files.items()))})")
    bash(f"dropdb --if-exists '{target.dbname}' && createdb '{target.dbname}'", env=pg_env("postgres")).check(
        "createdb"
    )
    target.workspace.parent.mkdir(parents=True, exist_ok=True)
    full_live_workspace(ds, target)
    print("   priming the target database with the dataset (untimed reference restore)")
    run_reference(source, target)
    assert primed(target)

    results = []
    sides = ("reference", "ours", "ours-nosafe")
    for i in range(runs):
        for side in sides[i % 3 :] + sides[: i % 3]:  # each side first once in three runs
            full_live_workspace(ds, target)
            settle(target)
            if side == "reference":
                r = run_reference(source, target)
            else:
                r = run_ours(source, target, safety=side == "ours")
            r.update(run=i + 1)
            results.append(r)
    print_runs(results)
    summary = {"name": name, "dataset": ds.info, "source_files": files, "runs": results}
    for side in sides:
        mine = [r for r in results if r["side"] == side]
        summary[side] = {
            "seconds": median([r["seconds"] for r in mine]),
            "downtime": median([r["downtime"] for r in mine]),
            "rss_kb": max(r.get("rss_kb", 0) for r in mine),
        }
    ref = summary["reference"]["seconds"]
    for side in ("ours", "ours-nosafe"):
        summary[side]["ratio"] = summary[side]["seconds"] / ref
        summary[side]["downtime_ratio"] = summary[side]["downtime"] / ref
    return summary


def print_runs(results: list[dict]) -> None:
    heads = ("run", "side", "total s", "down s", *(p for p, _ in PHASES), "cpu s", "sys s", "pg s", "other s", "RSS MB")
    print("   " + "  ".join(f"{h:>10}" for h in heads))
    for r in results:
        cells = [str(r["run"]), r["side"], f"{r['seconds']:.1f}", f"{r['downtime']:.1f}"]
        cells += [f"{r['phases'][p]:.1f}" if "phases" in r else "-" for p, _ in PHASES]
        cells += [f"{r['cpu']:.1f}", f"{r['sys']:.1f}", f"{r['pg_cpu']:.1f}", f"{r['other_cpu']:.1f}"]
        cells.append(mb(r["rss_kb"]) if "rss_kb" in r else "-")
        print("   " + "  ".join(f"{c:>10}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="full", help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument(
        "--no-snapshot", action="store_true", help="run the live working tree instead of a frozen copy of it"
    )
    args = parser.parse_args()
    started = time.monotonic()
    print(f"Restore benchmark, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, data under {BENCH_ROOT}")
    identity = code_identity() if args.no_snapshot else snapshot_code()
    print(f"code: {identity}, run from {code_dir()}")
    summaries = [bench_size(name, args.runs) for name in args.sizes.split(",") if name]
    print(f"\n== Summary (medians of {args.runs} runs; ratios against the reference's total time)")
    for s in summaries:
        ref = s["reference"]["seconds"]
        print(f"  {s['name']}: reference {ref:.1f} s")
        for side, label in (("ours", "ours as operators run it"), ("ours-nosafe", "ours --no-safety-backup")):
            o = s[side]
            print(
                f"    {label}: {o['seconds']:.1f} s = {o['ratio']:.2f}x "
                f"(target <= {TARGET_RATIO:.1f}x) {verdict(o['ratio'] <= TARGET_RATIO)}; "
                f"downtime {o['downtime']:.1f} s = {o['downtime_ratio']:.2f}x "
                f"{verdict(o['downtime_ratio'] <= TARGET_RATIO)}; peak RSS {mb(o['rss_kb'])} MB "
                f"{verdict(o['rss_kb'] / 1024 <= TARGET_RSS_MB)}"
            )
    print(
        "\nBefore every run (untimed): the live workspace is a full copy again, sync, CHECKPOINT.\n"
        "total s = the whole command; down s = maintenance on to the portal back online (the reference\n"
        "is down all along). Phases from -v 2: preflight (with Python's start), safety db (the live\n"
        "database dumped into the safety backup while the new workspace stages), stage+load, swap,\n"
        "after (sessions, catalog, audit), safety ws (the replaced workspace archived, portal online).\n"
        "cpu s = CPU of the command's process tree; sys s its kernel part; pg s = PostgreSQL server CPU\n"
        "meanwhile; other s = everything else on the machine (noise)."
    )
    last = next((r for s in summaries for r in reversed(s["runs"]) if r["side"] == "ours"), None)
    if last:
        print("\nour last run printed:\n" + "\n".join(f"  | {x}" for x in last["stdout"].splitlines()))
    for s in summaries:
        for r in s["runs"]:
            r.pop("stdout", None)
    out = BENCH_ROOT / "results" / f"restore-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summaries, indent=1, default=str))
    print(f"\nraw figures: {out}  (benchmark took {(time.monotonic() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
