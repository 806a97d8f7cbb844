"""Offload benchmark: our copy to the bucket and our restore from it, beside ``aws s3 cp --recursive``
both ways, on a fresh backup of the ~1 GB dataset, same endpoint, same run.

    .venv/bin/python benchmarks/offload_bench.py [--size full] [--runs 2] [--no-restore]

The endpoint is moto's standalone server with IAM authentication on (tests/s3server.py), started
once. The backup is a fresh ``manage.py backup --no-offload`` of the cached dataset (dataset.py).
Per run, the sides alternate order:

- up, ours: ``manage.py offload NAME --no-prune``, the command an operator runs (Django's start-up
  included; the backup is deleted from the bucket first, untimed);
- up, ours-started: the copy as the product makes it after every backup, ``offload_backup`` in a
  process already started (the worker's, or ``manage.py backup``'s), its boto3 client made by the
  copy as the worker's task makes it, timed from the call ("calls");
- up, aws: ``aws s3 cp --recursive BACKUP_DIR s3://…/reference/NAME/ --storage-class STANDARD_IA``
  (the CLI sends a CRC32 of every part); up, aws-sha256: the same with ``--checksum-algorithm
  SHA256``, the integrity work ours does;
- down, ours: what a restore from the bucket does before its preflight: ``open_source`` of
  ``s3://…/backups/NAME`` in a Python process with Django set up, which downloads every file into
  the hidden staging directory, checking each object's sha256 on the way (the process also removes
  the download on its way out; the store's calls alone are printed as "calls");
- down, aws: ``aws s3 cp --recursive s3://…/reference/NAME/ DIR``.

Then, unless --no-restore, once each: ``manage.py restore s3://…/backups/NAME --yes
--no-safety-backup`` (the whole restore from the bucket) and ``manage.py restore BACKUP_DIR …`` of
the same backup from the disk, both into a separate target (database trusca_bench_offload, its own
workspace): their difference is what the bucket costs a restore.

Printed per run: seconds, MB/s, peak RSS (VmHWM) of our Python process, CPU of the client and of
the moto server meanwhile, then medians, ratios (aws/ours: above 1.00 means ours is faster) and our
peak RSS. Timings are reported, never asserted. moto answers every ranged GET by reading the whole
object, so downloads are bound by the server's CPU, whichever client asks: the server CPU column
says how much.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from dataset import (
    BENCH_ROOT,
    PYTHON,
    REPO,
    SIZES,
    Dataset,
    bash,
    code_dir,
    code_identity,
    dataset,
    db_exists,
    median,
    pg_env,
    run_measured,
    snapshot_code,
)

TARGET_RSS_MB = 150
# The copy as the product makes it after every backup: in a process already started (the worker,
# or manage.py backup) with the modules imported; each copy makes its own boto3 client, as the
# worker's task does. Timed from the call.
UP_CHILD = """
import sys, time
import django
django.setup()
import trusca.backups.store.s3
from trusca.backups.operations.offload import offload_backup
started = time.monotonic()
offload_backup(name=sys.argv[1], actor="bench")
print(f"transfer {time.monotonic() - started:.3f}", flush=True)
"""
DOWN_CHILD = """
import sys, time
import django
django.setup()
from trusca.backups.operations.sources import open_source
started = time.monotonic()
with open_source(sys.argv[1]) as source:
    print(f"transfer {time.monotonic() - started:.3f}", flush=True)
"""


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def measured(server, cmd: list[str], env: dict, what: str) -> dict:
    before = cpu_ticks(server.process.pid)
    m = run_measured(cmd, env=env, cwd=code_dir()).check(what)
    said = [line.split()[1] for line in m.stdout.splitlines() if line.startswith("transfer ")]
    return {
        "seconds": m.seconds,
        "calls_seconds": float(said[0]) if said else None,
        "rss_kb": m.main_peak_kb,
        "cpu": m.cpu_seconds,
        "server_cpu": (cpu_ticks(server.process.pid) - before) / os.sysconf("SC_CLK_TCK"),
        "other_cpu": m.other_cpu,
        "stdout": m.stdout,
    }


def empty_prefix(server, prefix: str) -> None:
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=server.bucket, Delete={"Objects": keys})


def run_side(side: str, direction: str, server, ds: Dataset, source: Path, env: dict) -> dict:
    name = source.name
    aws = str(Path(PYTHON).parent / "aws")
    common = ["--endpoint-url", server.endpoint_url, "--only-show-errors"]
    reference = f"s3://{server.bucket}/reference/{name}/"
    downloads = BENCH_ROOT / "offload" / "aws-download"
    shutil.rmtree(downloads, ignore_errors=True)
    if (side, direction) == ("ours", "up"):
        empty_prefix(server, f"backups/{name}/")
        cmd = [PYTHON, "manage.py", "offload", name, "--no-prune"]
    elif side == "ours-started":
        empty_prefix(server, f"backups/{name}/")
        cmd = [PYTHON, "-c", UP_CHILD, name]
    elif direction == "up":
        empty_prefix(server, f"reference/{name}/")
        cmd = [aws, "s3", "cp", "--recursive", str(source), reference, "--storage-class", "STANDARD_IA", *common]
        if side == "aws-sha256":  # the integrity work ours does: a SHA-256 of every part, not a CRC32
            cmd += ["--checksum-algorithm", "SHA256"]
    elif side == "ours":
        cmd = [PYTHON, "-c", DOWN_CHILD, f"s3://{server.bucket}/backups/{name}"]
    else:
        cmd = [aws, "s3", "cp", "--recursive", reference, str(downloads), *common]
    result = measured(server, cmd, env, f"{side} {direction}")
    if (side, direction) == ("aws", "down"):
        for path in source.iterdir():
            if (downloads / path.name).stat().st_size != path.stat().st_size:
                raise SystemExit(f"aws downloaded {path.name} with another size")
        shutil.rmtree(downloads)
    return {"side": side, "direction": direction, **result}


def target_for(ds: Dataset) -> Dataset:
    target = Dataset("offload-target", {}, dbname="trusca_bench_offload")
    if not db_exists(target.dbname):
        bash(f"createdb '{target.dbname}'", env=pg_env("postgres")).check("createdb")
    shutil.rmtree(target.workspace, ignore_errors=True)
    shutil.rmtree(target.backup_root, ignore_errors=True)
    target.workspace.mkdir(parents=True)
    target.backup_root.mkdir(parents=True)
    target.migrate()
    return target


def mbps(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=list(SIZES))
    parser.add_argument("--runs", type=int, default=2, help="timed runs per side and direction (median reported)")
    parser.add_argument("--no-restore", action="store_true", help="skip the two whole restores")
    parser.add_argument("--no-snapshot", action="store_true", help="run the live working tree, not a frozen copy")
    args = parser.parse_args()
    started = time.monotonic()
    sys.path.insert(0, str(REPO))
    from tests import s3server  # the same endpoint the tests use

    print(f"Offload benchmark, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, data under {BENCH_ROOT}")
    identity = code_identity() if args.no_snapshot else snapshot_code()
    print(f"code: {identity}, run from {code_dir()}")
    ds = dataset(args.size)
    ds.ensure()
    ds.migrate()
    shutil.rmtree(ds.backup_root, ignore_errors=True)
    made = run_measured([PYTHON, "manage.py", "backup", "--no-prune", "--no-offload"], env=ds.env(), cwd=code_dir())
    made.check("manage.py backup")
    source = Path(made.stdout.strip().splitlines()[-1])
    source = source if source.is_absolute() else code_dir() / source
    files = {p.name: p.stat().st_size for p in sorted(source.iterdir())}
    size = sum(files.values())
    print(f"\n== source: {source}, {size / 1e6:,.0f} MB ({', '.join(f'{k} {v:,} B' for k, v in files.items())})")

    (BENCH_ROOT / "offload").mkdir(parents=True, exist_ok=True)
    server = s3server.start(BENCH_ROOT / "offload" / "moto.log")
    rows, restores = [], []
    try:
        server.bucket = "trusca-offload-bench"
        server.client().create_bucket(Bucket=server.bucket)
        env = {**ds.env(), **server.env()}
        bash(f"cat '{source}'/* > /dev/null").check("warm-up read")
        for run in range(args.runs):
            for direction in ("up", "down"):
                sides = ("ours", "ours-started", "aws", "aws-sha256") if direction == "up" else ("ours", "aws")
                for side in sides if run % 2 == 0 else reversed(sides):
                    row = run_side(side, direction, server, ds, source, env)
                    row["run"] = run + 1
                    rows.append(row)
                    calls = f"(calls {row['calls_seconds']:6.1f} s)" if row["calls_seconds"] else " " * 17
                    print(
                        f"run {run + 1}  {side:<12} {direction:<4}  {row['seconds']:6.1f} s {calls}  "
                        f"{mbps(size, row['seconds']):6.1f} MB/s  RSS {row['rss_kb'] / 1024:6.1f} MB  "
                        f"cpu {row['cpu']:5.1f} s  server cpu {row['server_cpu']:6.1f} s  "
                        f"other {row['other_cpu']:4.1f} s",
                        flush=True,
                    )
        if not args.no_restore:
            target = target_for(ds)
            restore_env = {**target.env(), **server.env()}
            for label, where in (
                ("from the bucket", f"s3://{server.bucket}/backups/{source.name}"),
                ("from the disk", str(source)),
            ):
                cmd = [PYTHON, "manage.py", "restore", where, "--yes", "--no-safety-backup"]
                bash("sync").check("sync")
                r = measured(server, cmd, restore_env, f"restore {label}")
                r["side"] = f"restore {label}"
                restores.append(r)
                print(
                    f"restore {label:<16} {r['seconds']:6.1f} s  RSS {r['rss_kb'] / 1024:6.1f} MB  "
                    f"cpu {r['cpu']:5.1f} s  server cpu {r['server_cpu']:6.1f} s  other {r['other_cpu']:4.1f} s",
                    flush=True,
                )
    finally:
        s3server.children.kill(server.process)

    print("\n== Medians (aws/ours: above 1.00 means ours is faster)")
    for direction in ("up", "down"):
        ours = median([r["seconds"] for r in rows if (r["side"], r["direction"]) == ("ours", direction)])
        server_ours = median([r["server_cpu"] for r in rows if (r["side"], r["direction"]) == ("ours", direction)])
        calls = [r["calls_seconds"] for r in rows if (r["side"], r["direction"]) == ("ours", direction)]
        said = f", the store's calls alone {median(calls):.1f} s" if all(calls) else ""
        print(f"  {direction:<4} ours {ours:6.1f} s ({mbps(size, ours):5.1f} MB/s{said}), moto's CPU {server_ours:.1f}")
        if direction == "up":
            started_copy = median([r["calls_seconds"] for r in rows if r["side"] == "ours-started"])
            print(f"       ours, the copy in a started process (the worker's, after a backup) {started_copy:.1f} s")
        for side in ("aws", "aws-sha256") if direction == "up" else ("aws",):
            theirs = median([r["seconds"] for r in rows if (r["side"], r["direction"]) == (side, direction)])
            server = median([r["server_cpu"] for r in rows if (r["side"], r["direction"]) == (side, direction)])
            print(
                f"       {side:<10} {theirs:6.1f} s ({mbps(size, theirs):5.1f} MB/s)   {side}/ours "
                f"{theirs / ours:4.2f}   moto's CPU {server:.1f}"
            )
            if direction == "up":
                print(f"{'':18}{side}/ours in a started process {theirs / started_copy:4.2f}")
    peak = max(r["rss_kb"] for r in rows if r["side"].startswith("ours")) / 1024
    print(f"  peak RSS of our Python process: {peak:.1f} MB (target <= {TARGET_RSS_MB} MB)")
    if restores:
        bucket, disk = restores
        print(
            f"  whole restore: from the bucket {bucket['seconds']:.1f} s, from the disk {disk['seconds']:.1f} s "
            f"(the bucket adds {bucket['seconds'] - disk['seconds']:+.1f} s); peak RSS {bucket['rss_kb'] / 1024:.1f} MB"
        )
    out = BENCH_ROOT / "results" / f"offload-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows + restores:
        r.pop("stdout", None)
    out.write_text(json.dumps({"source": str(source), "files": files, "runs": rows, "restores": restores}, indent=1))
    shutil.rmtree(ds.backup_root, ignore_errors=True)
    print(f"\nraw figures: {out}  (benchmark took {(time.monotonic() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
