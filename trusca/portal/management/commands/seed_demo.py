import json
import random
from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone

from trusca.portal.models import AuditEvent, LicenseFinding, Project, Scan

LICENSES = [
    "mit",
    "apache-2.0",
    "bsd-3-clause",
    "gpl-2.0",
    "gpl-3.0",
    "lgpl-2.1",
    "mpl-2.0",
    "isc",
    "bsd-2-clause",
    "agpl-3.0",
    "epl-2.0",
    "unlicense",
    "cc0-1.0",
    "zlib",
    "python",
]
WORDS = (
    "the of and to in is for that with as on license copyright software without any warranty "
    "permission granted free charge person obtaining copy rights use modify merge publish "
    "distribute sublicense sell def return class import from self if else elif for while try "
    "except raise yield lambda none true false int str dict list len range print open read "
    "write path file data value key items error result config request response user project "
    "scan sbom component version package dependency hash sha256 purl name type"
).split()
EXTENSIONS = [".py", ".js", ".go", ".c", ".h", ".java", ".rs", ".md", ".txt", ".json", ".yaml"]


class TextPool:
    """A few MB of word salad; files are slices of it at random offsets. Slices far apart defeat
    gzip's 32 KiB window, so the data compresses like source code, not like repeated text."""

    def __init__(self, rng: random.Random, size: int = 8 * 1024 * 1024):
        out, length = [], 0
        while length < size:
            line = " ".join(rng.choices(WORDS, k=rng.randint(3, 14)))
            token = f"{rng.choice(WORDS)}_{rng.randrange(1 << 24):x} = {rng.random():.6f}"
            piece = f"{'    ' * rng.randint(0, 3)}{line} {token}\n"
            out.append(piece)
            length += len(piece)
        self.data = "".join(out).encode()
        self.rng = rng

    def take(self, size: int) -> bytes:
        size = min(size, len(self.data))
        start = self.rng.randrange(len(self.data) - size + 1)
        return self.data[start : start + size]


class Command(BaseCommand):
    help = (
        "Create demo projects, scans with their workspace files (source/, scancode/scancode.json, "
        "cdxgen/bom.json under WORKSPACE_HOST_PATH/<scan id>/), license findings and audit events. "
        "The defaults make a small demo; raise the options for a benchmark-sized dataset "
        "(e.g. --projects 8 --scans 5 --files 750 --file-kb 26 --findings 50000 is about "
        "1 GB of database and 800 MB of workspace)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--projects", type=int, default=3)
        parser.add_argument("--scans", type=int, default=2, help="scans per project")
        parser.add_argument("--files", type=int, default=20, help="source files per scan")
        parser.add_argument("--file-kb", type=int, default=4, help="average source file size in KiB")
        parser.add_argument("--findings", type=int, default=50, help="license findings per scan")
        parser.add_argument("--audit-events", type=int, default=25)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--if-empty", action="store_true", help="do nothing when projects already exist")

    def handle(self, *args, **opts):
        for key in ("projects", "scans", "files", "file_kb", "findings", "audit_events"):
            if opts[key] < 0:
                raise CommandError(f"--{key.replace('_', '-')} must not be negative")
        if opts["if_empty"] and Project.objects.exists():
            self.stdout.write("Demo data already present; nothing to do")
            return
        rng = random.Random(opts["seed"])
        pool = TextPool(rng)
        settings.WORKSPACE_HOST_PATH.mkdir(parents=True, exist_ok=True)
        start = Project.objects.count()
        files = findings = 0
        for p in range(start, start + opts["projects"]):
            with transaction.atomic():
                project = Project.objects.create(
                    name=f"demo-project-{p + 1:03d}",
                    repository_url=f"https://git.example.org/demo/project-{p + 1:03d}.git",
                    description=pool.take(200).decode(),
                )
                for _ in range(opts["scans"]):
                    scan = Scan.objects.create(
                        project=project,
                        revision=f"{rng.getrandbits(160):040x}",
                        status=Scan.Status.SUCCEEDED,
                        file_count=opts["files"],
                    )
                    paths = self._write_workspace(scan, pool, rng, opts["files"], opts["file_kb"])
                    files += len(paths)
                    findings += self._write_findings(scan, pool, rng, paths, opts["findings"])
        now = timezone.now()
        AuditEvent.objects.bulk_create(
            AuditEvent(
                actor=rng.choice(["alice", "bob", "carol", "system"]),
                action=rng.choice(["scan.started", "scan.finished", "project.created", "sbom.exported"]),
                target=f"demo-project-{rng.randint(1, max(opts['projects'], 1)):03d}",
                detail={"demo": True},
                ip="127.0.0.1",
                timestamp=now - timedelta(minutes=i),
            )
            for i in range(opts["audit_events"])
        )
        self.stdout.write(
            f"Seeded {opts['projects']} projects, {opts['projects'] * opts['scans']} scans, "
            f"{files} workspace files and {findings} license findings"
        )

    def _write_workspace(self, scan, pool, rng, count, file_kb):
        base = scan.workspace_dir
        paths = []
        for i in range(count):
            rel = f"src/module_{i % 37:02d}/pkg_{i % 5}/file_{i:05d}{rng.choice(EXTENSIONS)}"
            target = base / "source" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(pool.take(max(1, int(rng.uniform(0.25, 1.75) * file_kb * 1024))))
            paths.append(rel)
        (base / "scancode").mkdir(parents=True, exist_ok=True)
        (base / "scancode" / "scancode.json").write_text(
            json.dumps(
                {
                    "headers": [{"tool_name": "scancode-toolkit", "tool_version": "32.2.0"}],
                    "files": [
                        {
                            "path": p,
                            "type": "file",
                            "licenses": [{"key": rng.choice(LICENSES), "score": round(rng.uniform(50, 100), 2)}],
                        }
                        for p in paths
                    ],
                },
                indent=1,
            )
        )
        (base / "cdxgen").mkdir(parents=True, exist_ok=True)
        (base / "cdxgen" / "bom.json").write_text(
            json.dumps(
                {
                    "bomFormat": "CycloneDX",
                    "specVersion": "1.6",
                    "components": [
                        {
                            "type": "library",
                            "name": f"lib-{rng.choice(WORDS)}-{n}",
                            "version": f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
                            "licenses": [{"license": {"id": rng.choice(LICENSES)}}],
                        }
                        for n in range(count // 4 + 1)
                    ],
                },
                indent=1,
            )
        )
        return paths

    def _write_findings(self, scan, pool, rng, paths, count):
        if not count:
            return 0
        rows = (
            (
                scan.pk,
                rng.choice(paths) if paths else "README",
                rng.choice(LICENSES),
                round(rng.uniform(50, 100), 2),
                line,
                line + rng.randint(1, 40),
                pool.take(rng.randint(200, 700)).decode(),
            )
            for line in (rng.randint(1, 2000) for _ in range(count))
        )
        if connection.vendor == "postgresql":
            # COPY is an order of magnitude faster than INSERTs for the benchmark-sized dataset.
            with connection.cursor() as cursor:
                columns = "scan_id, path, license_key, score, start_line, end_line, matched_text"
                with cursor.cursor.copy(f"COPY portal_licensefinding ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            return count
        batch = []
        for scan_id, path, key, score, first, last, text in rows:
            batch.append(
                LicenseFinding(
                    scan_id=scan_id,
                    path=path,
                    license_key=key,
                    score=score,
                    start_line=first,
                    end_line=last,
                    matched_text=text,
                )
            )
            if len(batch) == 5000:
                LicenseFinding.objects.bulk_create(batch)
                batch = []
        LicenseFinding.objects.bulk_create(batch)
        return count
