"""Encryption cost: the OpenPGP layer (trusca/backups/crypto.py) against the same streams in the
clear, same data, same run.

    .venv/bin/python benchmarks/crypto_bench.py [--runs 3]

Data, made once under BENCH_ROOT/crypto (outside the repo): ``usr.tar``, 2.5 GiB of a tar of
/usr, and ``usr.tar.gz``, the same through the backup's own compressor (trusca/backups/gz.py).

Cases, each in a fresh subprocess so that its CPU time and peak RSS are its own:
- copy / encrypt / decrypt: the gzip file read in 1 MiB chunks into /dev/null, plain or through
  encrypting_writer (passphrase) / decrypting_reader; gpg-encrypt / gpg-decrypt: the gpg command
  line alone with the same options, the floor for the layer;
- backup / backup-encrypted: the tar through gz.py's parallel compressor into a hashed file on
  disk, as a backup writes an archive, plain or with encrypting_writer between the two;
- restore / restore-encrypted: that file hashed, decompressed and discarded, as a restore reads
  it, plain or with decrypting_reader first.
The median of the runs is printed with MB/s (of the gzip bytes), CPU seconds (ours plus our
children's) and peak RSS; then the overhead of each encrypted case against its plain one. Timings
are reported, never asserted. Target (issue 12): at most 15% more time, RSS <= 150 MB.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BENCH_ROOT = Path(os.environ.get("TRUSCA_BENCH_ROOT", "/work/bench-data"))
DATA = BENCH_ROOT / "crypto"
TAR = DATA / "usr.tar"
GZ = DATA / "usr.tar.gz"
TAR_SIZE = 2560 * 1024 * 1024
PASSPHRASE = "benchmark passphrase"  # noqa: S105 (a benchmark's throwaway)
MB = 1_000_000
CASES = ["copy", "encrypt", "gpg-encrypt", "decrypt", "gpg-decrypt"]
PIPELINES = ["backup", "backup-encrypted", "restore", "restore-encrypted"]
GPG_OPTIONS = ["--cipher-algo", "AES256", "--compress-algo", "none", "--s2k-mode", "3"]
GPG_OPTIONS += ["--s2k-digest-algo", "SHA512", "--s2k-count", "65011712"]


def prepare() -> None:
    from trusca.backups import gz

    DATA.mkdir(parents=True, exist_ok=True)
    if not TAR.exists() or TAR.stat().st_size != TAR_SIZE:
        with open(TAR, "wb") as out:
            tar = subprocess.Popen(["tar", "-cf", "-", "/usr"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            while out.tell() < TAR_SIZE and (chunk := tar.stdout.read(min(1 << 20, TAR_SIZE - out.tell()))):
                out.write(chunk)
            tar.kill()
            tar.wait()
    if not GZ.exists():
        GZ.with_suffix(".tmp").unlink(missing_ok=True)
        with open(TAR, "rb") as source, gz.GzipFileWriter(GZ.with_suffix(".tmp")) as out:
            while chunk := source.read(gz.CHUNK):
                out.write(chunk)
        GZ.with_suffix(".tmp").rename(GZ)
    encrypted = GZ.with_suffix(".gz.gpg")
    if not encrypted.exists():
        run_case("encrypt-to-disk")


def _keys():
    from trusca.backups import crypto

    return crypto.EncryptionKeys(passphrase=PASSPHRASE), crypto.DecryptionKeys(passphrase=PASSPHRASE)


class _Chain:
    """Closing the encrypting writer finishes the message; the file under it closes after."""

    def __init__(self, top, bottom):
        self.top, self.bottom = top, bottom

    def write(self, data) -> int:
        return self.top.write(data)

    def close(self) -> None:
        self.top.close()
        self.bottom.close()


def case(name: str, scratch: Path) -> None:
    from trusca.backups import crypto, gz

    encrypt_keys, decrypt_keys = _keys()
    gpg = ["gpg", "--homedir", str(scratch), "--batch", "--no-autostart", "--pinentry-mode", "loopback"]
    if name == "copy":
        with open(GZ, "rb") as source, open(os.devnull, "wb") as sink:
            while chunk := source.read(crypto.CHUNK):
                sink.write(chunk)
    elif name in ("encrypt", "encrypt-to-disk"):
        target = GZ.with_suffix(".gz.gpg") if name == "encrypt-to-disk" else Path(os.devnull)
        with open(GZ, "rb") as source, open(target, "wb") as sink, crypto.encrypting_writer(sink, encrypt_keys) as w:
            while chunk := source.read(crypto.CHUNK):
                w.write(chunk)
    elif name == "decrypt":
        with open(GZ.with_suffix(".gz.gpg"), "rb") as source, crypto.decrypting_reader(source, decrypt_keys) as reader:
            while reader.read(crypto.CHUNK):
                pass
    elif name.startswith("gpg-"):
        fd = _passphrase_fd()
        command = [*GPG_OPTIONS, "--symmetric"] if name == "gpg-encrypt" else ["--decrypt"]
        with open(GZ if name == "gpg-encrypt" else GZ.with_suffix(".gz.gpg"), "rb") as source:
            subprocess.run(
                [*gpg, "--passphrase-fd", str(fd), *command, "--output", "-"],
                stdin=source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, pass_fds=(fd,),
            )  # fmt: skip
    elif name.startswith("backup"):
        target = scratch / "archive"
        hashed = gz.HashingWriter(target)
        raw = _Chain(crypto.encrypting_writer(hashed, encrypt_keys), hashed) if name.endswith("encrypted") else hashed
        with open(TAR, "rb") as source, _GzipInto(raw) as out:
            while chunk := source.read(gz.CHUNK):
                out.write(chunk)
    elif name.startswith("restore"):
        encrypted = name.endswith("encrypted")
        reader = gz.HashingReader(GZ.with_suffix(".gz.gpg") if encrypted else GZ)
        source = crypto.decrypting_reader(reader, decrypt_keys) if encrypted else reader
        with gz.open_read(source) as plain:
            while plain.read(gz.CHUNK):
                pass
    else:
        raise SystemExit(f"unknown case {name}")


def _passphrase_fd() -> int:
    read_end, write_end = os.pipe()
    os.write(write_end, PASSPHRASE.encode() + b"\n")
    os.close(write_end)
    return read_end


class _GzipInto:
    """gz.GzipFileWriter's blocks, written to any file object instead of a path of its own."""

    def __new__(cls, raw):
        from trusca.backups import gz

        writer = gz.GzipFileWriter.__new__(gz.GzipFileWriter)
        writer.raw, writer._buffer, writer._pending, writer._blocks = raw, bytearray(), deque(), 0
        return writer


def run_case(name: str) -> dict:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, __file__, "--case", name],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {"wall": wall, **measured}


def child_main(name: str) -> None:
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="crypto-bench-", dir=DATA))
    try:
        case(name, scratch)
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=True)
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "cpu": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
                "cpu_children": kids.ru_utime + kids.ru_stime,
                "rss_mb": own.ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--case")
    args = parser.parse_args()
    if args.case:
        return child_main(args.case)
    prepare()
    size = GZ.stat().st_size
    print(f"data: {TAR.stat().st_size / MB:,.0f} MB tar, {size / MB:,.0f} MB gzip; {os.cpu_count()} cores")
    results: dict[str, list[dict]] = {name: [] for name in CASES + PIPELINES}
    for _ in range(args.runs):
        for name in results:
            results[name].append(run_case(name))
    medians = {}
    print(f"{'case':<20}{'wall s':>8}{'MB/s':>8}{'CPU s':>8}{'gpg CPU s':>10}{'RSS MB':>8}")
    for name, runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        medians[name] = median
        print(
            f"{name:<20}{median['wall']:>8.2f}{size / MB / median['wall']:>8.0f}{median['cpu']:>8.2f}"
            f"{median['cpu_children']:>10.2f}{median['rss_mb']:>8.0f}"
        )
    for plain, encrypted in (("backup", "backup-encrypted"), ("restore", "restore-encrypted")):
        extra = medians[encrypted]["wall"] / medians[plain]["wall"] - 1
        verdict = "PASS" if extra <= 0.15 and medians[encrypted]["rss_mb"] <= 150 else "MISS"
        print(f"{encrypted}: {extra:+.1%} time against {plain} (target <= +15%) {verdict}")
    out = BENCH_ROOT / "results" / f"crypto-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": size, "runs": results}, indent=1))
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
