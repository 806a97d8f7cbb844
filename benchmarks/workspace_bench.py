"""Workspace archive and extraction against GNU tar, on the same uncompressed tar, in one run.

Extraction: ``tar -xf`` into an empty directory against ``workspace.extract()`` (and ``check()``,
which verify_backup runs); archiving: ``tar -cf`` against ``workspace.archive()``, both into a
file in /dev/shm. No compression on either side: this measures what workspace.py does per member.
Runs alternate, medians are printed. The tree (small files in nested directories, like scan
clones) is made once under --root.

    .venv/bin/python benchmarks/workspace_bench.py --files 30000 --runs 5
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trusca.backups import workspace  # noqa: E402


def make_tree(root: Path, files: int) -> None:
    marker = root / f".made-{files}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(1)
    for i in range(files):
        directory = root / f"project{i // 5000}" / f"scan{i // 500 % 10}" / "src" / f"pkg{i // 10 % 50}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(200, 8000)
        (directory / f"module_{i % 10}.py").write_bytes(rng.randbytes(size // 2).hex()[:size].encode())
    marker.touch()


def timed(action) -> float:
    os.sync()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=30000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--root", type=Path, default=Path("/tmp/trusca-workspace-bench"), help="tree and tar")
    # In memory by default: on a shared disk, writeback makes single runs vary several-fold.
    parser.add_argument("--extract-to", type=Path, default=Path("/dev/shm/trusca-workspace-bench"))
    args = parser.parse_args()
    tree, tar, out = args.root / "tree", args.root / "tree.tar", args.extract_to
    make_tree(tree, args.files)
    subprocess.run(["tar", "-C", str(tree), "-cf", str(tar), "."], check=True)
    members = workspace.check(open(tar, "rb"))

    def extract_with_tar():
        out.mkdir()
        subprocess.run(["tar", "-C", str(out), "-xf", str(tar)], check=True)

    def extract_with_ours():
        with open(tar, "rb") as fh:
            workspace.extract(fh, out)

    def check_with_ours():
        with open(tar, "rb") as fh:
            workspace.check(fh)

    # Into a file in memory: GNU tar skips reading the files when it writes to /dev/null.
    written = Path("/dev/shm/trusca-workspace-bench.tar")

    def archive_with_tar():
        subprocess.run(["tar", "-C", str(tree), "-cf", str(written), "."], check=True)

    def archive_with_ours():
        with open(written, "wb") as fh:
            workspace.archive(tree, fh, progress=lambda n: None)

    cases = {
        "tar -xf": extract_with_tar,
        "extract()": extract_with_ours,
        "check()": check_with_ours,
        "tar -cf": archive_with_tar,
        "archive()": archive_with_ours,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, action in cases.items():
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(timed(action))
    shutil.rmtree(out, ignore_errors=True)
    written.unlink()
    print(f"{members} members, {tar.stat().st_size / 1e6:.0f} MB uncompressed tar, extracted into {out}")
    print(f"{args.runs} runs, medians:")
    for name, values in times.items():
        print(f"  {name:26} {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
