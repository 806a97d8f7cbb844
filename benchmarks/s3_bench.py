"""S3 benchmark: our store's upload and download against ``aws s3 cp`` (pip's awscli), same file,
same loopback endpoint, same run.

    .venv/bin/python benchmarks/s3_bench.py [--sizes 256,1024] [--runs 3]

The endpoint is moto's standalone server with IAM authentication on (tests/s3server.py), started
once for the run. Per size (MiB of random bytes, cached under BENCH_ROOT/s3/), the sides alternate
order run by run and medians are compared:

- ours up: a Python process with Django set up copies the file into ``S3Store.open_write`` in
  1 MiB writes (sha256 given, as a copy of a finished backup gives it) and publishes a manifest;
- ours down: another reads it back through ``S3Store.open_read`` into a file;
- reference: ``aws s3 cp FILE s3://… --storage-class STANDARD_IA`` and ``aws s3 cp s3://… FILE``.

Printed: seconds and MB/s of each run (for ours also the store's calls alone, without the
start-up of Python and Django that a worker has behind it; the CLI's always include its own), peak
RSS (VmHWM) of our Python process, CPU of the client process and of the moto server meanwhile (on
two cores, the server is the other half of the work), then the ratios against the targets
(PASS/MISS): ours no slower than the AWS CLI both ways, peak RSS <= 150 MB and flat across sizes.
Timings are reported, never asserted.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from dataset import BENCH_ROOT, PYTHON, REPO, code_dir, code_identity, median, run_measured, snapshot_code

TARGET_RSS_MB = 150
FLAT_TOLERANCE_MB = 10
NAME = "manual-20260101T000000Z"
MEMBER = "workspace.tar.gz"
CHILD = """
import hashlib, os, sys, time
from datetime import UTC, datetime
import django
django.setup()
from trusca.backups import manifest
from trusca.backups.store.s3 import configured
store = configured()
direction, path, sha256, name = sys.argv[1:5]
started = time.monotonic()
if direction == "up":
    with open(path, "rb") as source, store.open_write(name, "workspace.tar.gz", sha256=sha256) as upload:
        while block := source.read(1 << 20):
            upload.write(block)
    empty = hashlib.sha256(b"").hexdigest()  # a manifest lists a dump too
    with store.open_write(name, "sqlite.db.gz", sha256=empty):
        pass
    files = {"workspace.tar.gz": manifest.FileEntry(os.path.getsize(path), sha256),
             "sqlite.db.gz": manifest.FileEntry(0, empty)}
    document = manifest.Manifest(timestamp=datetime.now(UTC), kind="manual", engine="sqlite", db_revision="0" * 12,
        migrations={}, db_size=0, workspace_path="/", app_version="bench", files=files)
    store.publish(name, document.to_json())
else:
    with store.open_read(name, "workspace.tar.gz") as source, open(path, "wb") as out:
        while block := source.read(1 << 20):
            out.write(block)
print(f"transfer {time.monotonic() - started:.3f}")
"""


def blob(size_mib: int) -> tuple[Path, str]:
    path = BENCH_ROOT / "s3" / f"blob-{size_mib}m"
    marker = path.with_suffix(".sha256")
    if not (path.exists() and marker.exists() and path.stat().st_size == size_mib << 20):
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(path, "wb") as out:
            for _ in range(size_mib):
                block = os.urandom(1 << 20)  # archives are incompressible: so is this
                digest.update(block)
                out.write(block)
        marker.write_text(digest.hexdigest())
    return path, marker.read_text().strip()


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def measured(server, cmd: list[str], env: dict) -> dict:
    before = cpu_ticks(server.process.pid)
    m = run_measured(cmd, env=env, cwd=code_dir()).check(" ".join(cmd[:4]))
    # Ours also says how long the store's calls took, without the start-up of Python and Django
    # (a worker has them loaded already); the CLI's time always includes its own start-up.
    said = [line.split()[1] for line in m.stdout.splitlines() if line.startswith("transfer ")]
    return {
        "seconds": m.seconds,
        "transfer_seconds": float(said[0]) if said else m.seconds,
        "rss_kb": m.main_peak_kb,
        "cpu": m.cpu_seconds,
        "server_cpu": (cpu_ticks(server.process.pid) - before) / os.sysconf("SC_CLK_TCK"),
        "other_cpu": m.other_cpu,
    }


def run_side(side: str, direction: str, server, path: Path, sha256: str, size_mib: int) -> dict:
    env = {**os.environ, **server.env(), "DJANGO_SETTINGS_MODULE": "trusca.settings", "PYTHONPATH": str(code_dir())}
    env["TRUSCA_VAR_DIR"] = str(BENCH_ROOT / "s3" / "var")
    out = BENCH_ROOT / "s3" / f"download-{side}"
    out.unlink(missing_ok=True)
    if side == "ours":
        if direction == "up":  # untimed: the name is published again
            listed = server.client().list_objects_v2(Bucket=server.bucket, Prefix="backups/").get("Contents", [])
            for obj in listed:
                server.client().delete_object(Bucket=server.bucket, Key=obj["Key"])
        target = str(path) if direction == "up" else str(out)
        cmd = [PYTHON, "-c", CHILD, direction, target, sha256, NAME]
    else:
        cli = str(Path(PYTHON).parent / "aws")
        url = f"s3://{server.bucket}/reference/{MEMBER}"
        common = ["--endpoint-url", server.endpoint_url, "--only-show-errors"]
        if direction == "up":
            cmd = [cli, "s3", "cp", str(path), url, "--storage-class", "STANDARD_IA", *common]
        else:
            cmd = [cli, "s3", "cp", url, str(out), *common]
    result = measured(server, cmd, env)
    if direction == "down":
        digest = hashlib.sha256()
        with open(out, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        out.unlink()
        if digest.hexdigest() != sha256:
            raise SystemExit(f"{side} downloaded other bytes than it uploaded")
    return {"side": side, "direction": direction, "size_mib": size_mib, **result}


def bench_size(server, size_mib: int, runs: int) -> list[dict]:
    path, sha256 = blob(size_mib)
    rows = []
    for run in range(runs):
        order = ("ours", "aws") if run % 2 == 0 else ("aws", "ours")
        for direction in ("up", "down"):
            for side in order:
                row = run_side(side, direction, server, path, sha256, size_mib)
                row["run"] = run + 1
                rows.append(row)
                print(
                    f"{size_mib:>5} MiB  run {run + 1}  {side:<4}  {direction:<4}  {row['seconds']:6.2f} s  "
                    f"(calls {row['transfer_seconds']:6.2f} s)  "
                    f"{size_mib * 1.048576 / row['seconds']:6.1f} MB/s  RSS {row['rss_kb'] / 1024:6.1f} MB  "
                    f"cpu {row['cpu']:5.1f} s  server cpu {row['server_cpu']:5.1f} s  other {row['other_cpu']:4.1f} s",
                    flush=True,
                )
    return rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median_of(rows: list[dict], size: int, direction: str, side: str, key: str) -> float:
    return median([r[key] for r in rows if (r["size_mib"], r["direction"], r["side"]) == (size, direction, side)])


def report(rows: list[dict]) -> None:
    print("\nMedians (seconds) and ratios (aws / ours: above 1.00 means ours is faster)")
    sizes = sorted({r["size_mib"] for r in rows})
    peaks = {}
    for size in sizes:
        for direction in ("up", "down"):
            ours = median_of(rows, size, direction, "ours", "seconds")
            calls = median_of(rows, size, direction, "ours", "transfer_seconds")
            aws = median_of(rows, size, direction, "aws", "seconds")
            print(
                f"  {size:>5} MiB {direction:<4}  ours {ours:6.2f} s ({size * 1.048576 / ours:6.1f} MB/s)   "
                f"aws {aws:6.2f} s ({size * 1.048576 / aws:6.1f} MB/s)   "
                f"ratio {aws / ours:4.2f}  {verdict(ours <= aws)}   "
                f"(the store's calls alone: {calls:6.2f} s, ratio {aws / calls:4.2f})"
            )
        peaks[size] = max(r["rss_kb"] for r in rows if r["size_mib"] == size and r["side"] == "ours") / 1024
    for size, peak in peaks.items():
        ok = verdict(peak <= TARGET_RSS_MB)
        print(f"  peak RSS of ours at {size} MiB: {peak:.1f} MB  {ok} (target {TARGET_RSS_MB})")
    if len(peaks) > 1:
        low, high = peaks[sizes[0]], peaks[sizes[-1]]
        flat = high - low <= max(FLAT_TOLERANCE_MB, low * 0.1)
        print(f"  flat: {low:.1f} MB at {sizes[0]} MiB, {high:.1f} MB at {sizes[-1]} MiB  {verdict(flat)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="comma-separated sizes in MiB")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side, direction and size")
    parser.add_argument("--no-snapshot", action="store_true", help="run the live working tree, not a frozen copy")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests import s3server  # the same endpoint the tests use

    print(f"S3 benchmark, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, data under {BENCH_ROOT}/s3")
    identity = code_identity() if args.no_snapshot else snapshot_code()
    print(f"code: {identity}, run from {code_dir()}")
    (BENCH_ROOT / "s3").mkdir(parents=True, exist_ok=True)
    server = s3server.start(BENCH_ROOT / "s3" / "moto.log")
    try:
        server.bucket = "trusca-bench"
        server.client().create_bucket(Bucket=server.bucket)
        rows = []
        for size in [int(s) for s in args.sizes.split(",") if s]:
            rows += bench_size(server, size, args.runs)
            server.empty(server.bucket)
    finally:
        s3server.children.kill(server.process)
    report(rows)
    results = BENCH_ROOT / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"s3-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nraw figures: {out}")


if __name__ == "__main__":
    main()
