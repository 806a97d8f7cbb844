import getpass
import sys
import time

from django.core.management.base import CommandError
from django.utils import timezone
from django.utils.timesince import timesince

from trusca.backups import locks, operations
from trusca.backups.management.base import OperationCommand, add_decryption_options, decryption_keys
from trusca.backups.terminal import LiveLine, display_path


class StepLines(LiveLine):
    """The ✓ lines; with -v 2, each also says how long it took since the one before (where a
    restore spends its time, for operators and benchmarks/restore_bench.py)."""

    def __init__(self, command, *, timed: bool = False):
        super().__init__(label="restoring")
        self.command = command
        self.timed = timed
        self._last = time.monotonic()

    def step(self, text: str, ok: bool = True) -> None:
        self.clear()
        now = time.monotonic()
        took = f" [{now - self._last:.2f} s]" if self.timed else ""
        self._last = now
        self.command.stdout.write(f"{'✓' if ok else '!'} {text}{took}")


class Command(OperationCommand):
    help = (
        "Restore the database and the workspace from SOURCE: a backup directory (either naming "
        "format), a bundle .tar.gz, a backup's name (in BACKUP_ROOT, else in the bucket BACKUP_S3_BUCKET), "
        "or s3://BUCKET/PREFIX/NAME; one in a bucket is first downloaded, its checksums checked on the way. "
        "Everything is checked before anything "
        "changes; the portal goes into maintenance mode and a safety backup of the current state is "
        "taken first; the database is restored in one transaction and the workspace swapped in, so a "
        "failure or a crash leaves the portal as it was, or finishes the restore at the next start."
    )
    action = "Restore"

    def add_arguments(self, parser):
        parser.add_argument(
            "source", nargs="?", help="backup directory, bundle file, backup name, or s3://BUCKET/PREFIX/NAME"
        )
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation (automation)")
        parser.add_argument(
            "--no-safety-backup",
            action="store_true",
            help="skip the backup of the current state taken before replacing it (no way back)",
        )
        parser.add_argument(
            "--trust-unsigned",
            action="store_true",
            help=(
                "restore a backup not signed with this installation's BACKUP_SIGNING_KEY (its SQL runs with the "
                "portal's database rights: only for a backup whose origin you know)"
            ),
        )
        add_decryption_options(parser)
        parser.add_argument(
            "--resume",
            action="store_true",
            help="finish (or undo) a restore that was killed; every other command does this too when it starts",
        )

    def handle(self, *args, source, yes, no_safety_backup, trust_unsigned, resume, **options):
        if resume:
            self._resume()
            return
        if not source:
            raise CommandError("name the backup to restore: manage.py restore SOURCE (see --help)")
        reporter = StepLines(self, timed=options["verbosity"] >= 2)
        download = LiveLine(label="downloading")
        try:
            with operations.restore_prepare(
                source=source,
                keys=decryption_keys(options),
                trust_unsigned=trust_unsigned,
                safety_backup=not no_safety_backup,
                reporter=download,
            ) as plan:
                download.clear()
                if plan.source.downloaded_from:
                    reporter.step(f"downloaded {plan.source.downloaded_from}")
                if plan.members is None:
                    reporter.step(
                        "preflight: signature, checksums, keys, migrations and free space "
                        "(every archive and member is checked again as it loads)"
                    )
                else:
                    reporter.step("preflight: manifest, signature, checksums, archives and every workspace member")
                self._describe(plan)
                if not yes:
                    self._confirm()
                try:
                    outcome = operations.restore_run(
                        plan=plan,
                        actor=f"cli:{getpass.getuser()}",
                        safety_backup=not no_safety_backup,
                        reporter=reporter,
                    )
                finally:
                    reporter.clear()
        except locks.Busy as exc:
            raise CommandError(f"{exc}; nothing was changed. Wait for it to finish, then restore again.") from None
        except operations.OperationFailed as exc:
            raise CommandError(f"Restore failed: {exc}") from None
        finally:
            download.clear()
        expected = plan.manifest.db_revision
        if outcome.revision_after == expected:
            self.stdout.write(f"✓ db revision matches manifest ({expected})")
        else:
            self.stdout.write(f"! db revision mismatch. expected={expected} current={outcome.revision_after}")
        if plan.behind:
            self.stdout.write(f"! the backup predates migrations of this code ({', '.join(plan.behind)})")
        if plan.behind or outcome.revision_after != expected:
            self.stdout.write("! Run: python manage.py migrate")
        self.stdout.write("Restore complete")

    def _resume(self) -> None:
        try:
            done = operations.restore_recover(reporter=StepLines(self))
        except operations.OperationFailed as exc:
            raise CommandError(f"Resume failed: {exc}") from None
        if done is None:
            self.stdout.write("No interrupted restore to finish (or it is still running).")
        else:
            self.stdout.write(f"✓ {done}")

    def _describe(self, plan) -> None:
        write = self.stdout.write
        taken = plan.taken_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        age = timezone.now() - plan.taken_at
        ago = "just now" if age.total_seconds() < 60 else f"{timesince(plan.taken_at, timezone.now())} ago"
        document = plan.manifest
        write(f"About to restore from {plan.source.label}")
        write(f"  taken {taken} ({ago}), kind {document.kind}, TRUSCA {document.app_version}, {plan.signature}")
        write(f"  db revision: backup {document.db_revision}, live {plan.live_revision}")
        write("! This will:")
        write("! - REPLACE the current database content")
        workspace = display_path(plan.workspace_path)
        if plan.has_workspace:
            write(f"! - REPLACE {workspace} (if workspace.tar.gz present)")
        else:
            write(f"! - keep {workspace} as it is: this backup holds no workspace.tar.gz")
        write(f"! - LOSE everything written since {taken}")
        write("! - sign everyone out")
        if plan.behind:
            write(f"! The backup is older than this code ({', '.join(plan.behind)}): run migrate afterwards.")

    def _confirm(self) -> None:
        if not sys.stdin.isatty():
            raise CommandError(
                "Refusing to restore: there is no terminal to ask for confirmation on. "
                "Pass --yes to restore without asking. Nothing was changed."
            )
        self.stdout.write("Continue? [y/N] ", ending="")
        self.stdout.flush()
        answer = sys.stdin.readline()
        if answer.strip().lower() not in ("y", "yes"):
            raise CommandError("Restore cancelled. Nothing was changed.")
