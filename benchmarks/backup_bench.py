"""Backup benchmark: ``manage.py backup`` against the reference shell pipeline, same data, same run.

    .venv/bin/python benchmarks/backup_bench.py [--sizes full,many] [--runs 3]

Reference (what an operator would otherwise run by hand):

    pg_dump --clean --if-exists | gzip > postgres.sql.gz
    tar -czf workspace.tar.gz -C $WORKSPACE .

Ours: ``manage.py backup --no-prune`` as a subprocess, with DATABASE_URL, WORKSPACE_HOST_PATH and
BACKUP_ROOT pointing at the cached dataset under /work/bench-data (see dataset.py).

Page caches cannot be dropped here, so every size starts with an untimed pass that reads the whole
dataset (``pg_dump > /dev/null`` and an uncompressed ``tar``; their times are printed as the
phase diagnosis), then the two sides alternate order run by run and the median is reported.

Printed per size: wall-clock seconds, output bytes and peak memory of each run; then the ratios
against the targets (PASS/MISS). Timings are reported, never asserted.
Targets (issue 13): >= 6x faster than the reference and within 2x of the read floor (pg_dump >
/dev/null and an uncompressed tar of the workspace, both at once) on the ~1 GB dataset and on the
one of 68,000 small files; output <= 10% larger than gzip -6's; peak RSS <= 150 MB and flat.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from dataset import (
    BENCH_ROOT,
    PYTHON,
    SIZES,
    bash,
    code_dir,
    code_identity,
    cpu_split,
    dataset,
    median,
    pg_env,
    run_measured,
    snapshot_code,
)

TARGET_SPEEDUP = 6.0
TARGET_OVER_FLOOR = 2.0
TARGET_SIZE_RATIO = 1.10
TARGET_RSS_MB = 150
FLAT_TOLERANCE_MB = 10  # "flat": the full size's peak is within this of the quarter's (or within 10%)
DUMP, ARCHIVE, MANIFEST = "postgres.sql.gz", "workspace.tar.gz", "manifest.json"


def backup_path(stdout: str) -> Path:
    path = Path(stdout.strip().splitlines()[-1])
    return path if path.is_absolute() else code_dir() / path


def run_ours(ds) -> dict:
    m = run_measured([PYTHON, "manage.py", "backup", "--no-prune"], env=ds.env(), cwd=code_dir())
    m.check("manage.py backup --no-prune")
    path = backup_path(m.stdout)
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    shutil.rmtree(path)
    return {
        "side": "ours",
        "seconds": m.seconds,
        **cpu_split(m),
        "files": files,
        "bytes": sum(files.values()),
        "rss_kb": m.main_peak_kb,
        "tree_sum_kb": m.tree_sum_peak_kb,
        "tree_max_kb": m.tree_max_kb,
    }


def run_reference(ds) -> dict:
    out = ds.home / "reference"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    db = bash(f"pg_dump --clean --if-exists | gzip > '{out}/{DUMP}'", env=pg_env(ds.dbname)).check("reference dump")
    ws = bash(f"tar -czf '{out}/{ARCHIVE}' -C '{ds.workspace}' .").check("reference tar")
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    shutil.rmtree(out)
    return {
        "side": "reference",
        "seconds": db.seconds + ws.seconds,
        "db_seconds": db.seconds,
        "ws_seconds": ws.seconds,
        **cpu_split(db, ws),
        "files": files,
        "bytes": sum(files.values()),
    }


def phases(ds) -> dict:
    """Untimed warm-up that reads the whole dataset once, each half alone; then the read floor:
    both read at once, the time merely to read everything a backup reads."""
    dump = bash("pg_dump --clean --if-exists > /dev/null", env=pg_env(ds.dbname)).check("pg_dump")
    # `tar -cf /dev/null` skips reading file data (GNU tar special-cases it), hence the pipe.
    tar = bash(f"tar -cf - -C '{ds.workspace}' . | cat > /dev/null").check("tar")
    both = bash(
        f"pg_dump --clean --if-exists > /dev/null & tar -cf - -C '{ds.workspace}' . | cat > /dev/null; wait",
        env=pg_env(ds.dbname),
    ).check("read floor")
    return {"pg_dump_devnull": dump.seconds, "tar_devnull": tar.seconds, "floor": both.seconds}


def row(cells, widths) -> str:
    return "  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


COLUMNS = (
    ("run", 3),
    ("side", 9),
    ("db s", 5),
    ("ws s", 5),
    ("total s", 7),
    ("cpu s", 6),
    ("pg s", 5),
    ("other s", 7),
    (DUMP, 15),
    (ARCHIVE, 16),
    ("total bytes", 13),
    ("RSS py MB", 9),
    ("RSS sum MB", 10),
)


def print_runs(rows: list[dict]) -> None:
    widths = [w for _h, w in COLUMNS]
    print(row([h for h, _w in COLUMNS], widths))
    for r in rows:
        ours = r["side"] != "reference"
        print(
            row(
                (
                    r["run"],
                    r["side"],
                    "-" if ours else f"{r['db_seconds']:.1f}",
                    "-" if ours else f"{r['ws_seconds']:.1f}",
                    f"{r['seconds']:.1f}",
                    f"{r['cpu']:.1f}",
                    f"{r['pg_cpu']:.1f}",
                    f"{r['other_cpu']:.1f}",
                    f"{r['files'][DUMP]:,}",
                    f"{r['files'][ARCHIVE]:,}",
                    f"{r['bytes']:,}",
                    mb(r["rss_kb"]) if ours else "-",
                    mb(r["tree_sum_kb"]) if ours else "-",
                ),
                widths,
            )
        )


def bench_size(name: str, runs: int) -> dict:
    ds = dataset(name)
    ds.ensure()
    ds.migrate()
    shutil.rmtree(ds.backup_root, ignore_errors=True)
    print(f"\n== {name}: {ds.describe()}")
    ph = phases(ds)
    print(
        f"   phase floor (warm-up): pg_dump > /dev/null {ph['pg_dump_devnull']:.1f} s; "
        f"tar without compression > /dev/null {ph['tar_devnull']:.1f} s; both at once (the read floor) "
        f"{ph['floor']:.1f} s"
    )
    results = []
    for i in range(runs):
        order = ("reference", "ours") if i % 2 == 0 else ("ours", "reference")
        for side in order:
            bash("sync").check("sync")  # untimed: no run pays for the previous one's write-back
            r = run_reference(ds) if side == "reference" else run_ours(ds)
            results.append(dict(r, run=i + 1))
    print_runs(results)
    ref = [r for r in results if r["side"] == "reference"]
    ours = [r for r in results if r["side"] == "ours"]
    summary = {
        "name": name,
        "dataset": ds.info,
        "phases": ph,
        "runs": results,
        "ref_seconds": median([r["seconds"] for r in ref]),
        "ours_seconds": median([r["seconds"] for r in ours]),
        "ref_best": min(r["seconds"] for r in ref),
        "ours_best": min(r["seconds"] for r in ours),
        "ref_cpu": median([r["cpu"] for r in ref]),
        "ours_cpu": median([r["cpu"] for r in ours]),
        "ref_bytes": median([r["bytes"] for r in ref]),
        "ours_bytes": median([r["bytes"] for r in ours]),
        "rss_kb": max(r["rss_kb"] for r in ours),
        "tree_sum_kb": max(r["tree_sum_kb"] for r in ours),
    }
    summary["speedup"] = summary["ref_seconds"] / summary["ours_seconds"]
    summary["over_floor"] = summary["ours_seconds"] / ph["floor"]
    summary["size_ratio"] = summary["ours_bytes"] / summary["ref_bytes"]
    print(
        f"   median: reference {summary['ref_seconds']:.1f} s, ours {summary['ours_seconds']:.1f} s "
        f"-> reference/ours = {summary['speedup']:.2f}x (best runs: {summary['ref_best']:.1f} s / "
        f"{summary['ours_best']:.1f} s = {summary['ref_best'] / summary['ours_best']:.2f}x); "
        f"size ours/reference = {summary['size_ratio']:.3f}; our peak RSS {mb(summary['rss_kb'])} MB; "
        f"ours/read floor = {summary['over_floor']:.2f}x"
    )
    print(
        f"   CPU of the process trees (median): reference {summary['ref_cpu']:.1f} s, ours {summary['ours_cpu']:.1f} s"
    )
    return summary


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(summaries: list[dict]) -> None:
    print("\n== Summary (medians; RSS = highest of our runs)")
    widths = (8, 10, 10, 15, 15, 16, 17)
    print(
        row(
            (
                "size",
                "ref s",
                "ours s",
                "ref/ours (x)",
                "ours/ref size",
                "peak RSS py MB",
                "py+pg_dump MB",
            ),
            widths,
        )
    )
    for s in summaries:
        print(
            row(
                (
                    s["name"],
                    f"{s['ref_seconds']:.1f}",
                    f"{s['ours_seconds']:.1f}",
                    f"{s['speedup']:.2f}",
                    f"{s['size_ratio']:.3f}",
                    mb(s["rss_kb"]),
                    mb(s["tree_sum_kb"]),
                ),
                widths,
            )
        )
    print("\nTargets")
    for s in summaries:
        print(
            f"  speed, {s['name']}: reference/ours = {s['speedup']:.2f}x "
            f"(target >= {TARGET_SPEEDUP:.0f}x)  {verdict(s['speedup'] >= TARGET_SPEEDUP)}"
        )
        print(
            f"  speed, {s['name']}: ours/read floor = {s['over_floor']:.2f}x "
            f"(target <= {TARGET_OVER_FLOOR:.0f}x)  {verdict(s['over_floor'] <= TARGET_OVER_FLOOR)}"
        )
    for s in summaries:
        print(
            f"  size, {s['name']}: ours/reference = {s['size_ratio']:.3f} "
            f"(target <= {TARGET_SIZE_RATIO:.2f})  {verdict(s['size_ratio'] <= TARGET_SIZE_RATIO)}"
        )
    for s in summaries:
        peak = s["rss_kb"] / 1024
        print(
            f"  peak RSS of the manage.py Python process, {s['name']}: {peak:.1f} MB "
            f"(target <= {TARGET_RSS_MB} MB)  {verdict(peak <= TARGET_RSS_MB)}"
        )
    if len(summaries) > 1:
        peaks = [s["rss_kb"] / 1024 for s in summaries]
        spread = max(peaks) - min(peaks)
        flat = spread <= max(FLAT_TOLERANCE_MB, 0.10 * min(peaks))
        print(
            f"  peak RSS flat across sizes: {' vs '.join(f'{p:.1f}' for p in peaks)} MB, spread {spread:.1f} MB "
            f"(target: within {FLAT_TOLERANCE_MB} MB or 10%)  {verdict(flat)}"
        )
    print(
        "\ncpu s = user+system CPU of the run's process tree (ours: python + pg_dump; reference: pg_dump,\n"
        "gzip, tar); pg s = CPU of the PostgreSQL server processes meanwhile (serving the dump, mostly);\n"
        "other s = CPU used by everything else on this 2-core machine meanwhile: competing work, the noise.\n"
        "RSS py = VmHWM of the manage.py Python process (polled from /proc every 50 ms, last reading);\n"
        "py+pg_dump = highest sum of VmRSS over that process and its children (pg_dump) at one instant.\n"
        "Reference and ours read the same warm page cache; sizes are total bytes of the files written\n"
        f"({DUMP} + {ARCHIVE}, plus {MANIFEST} for ours)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="full,many", help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side and size (median reported)")
    parser.add_argument(
        "--no-snapshot", action="store_true", help="run the live working tree instead of a frozen copy of it"
    )
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    started = time.monotonic()
    print(f"Backup benchmark, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, data under {BENCH_ROOT}")
    identity = code_identity() if args.no_snapshot else snapshot_code()
    print(f"code: {identity}, run from {code_dir()}")
    summaries = [bench_size(name, args.runs) for name in sizes]
    report(summaries)
    results = BENCH_ROOT / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"backup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(summaries, indent=1, default=str))
    print(f"\nraw figures: {out}  (benchmark took {(time.monotonic() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
