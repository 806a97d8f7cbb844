import getpass
import sys

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.timesince import timesince

from trusca.backups import locks, operations
from trusca.backups.terminal import LiveLine, display_path


class StepLines(LiveLine):
    def __init__(self, command):
        super().__init__(label="restoring")
        self.command = command

    def step(self, text: str, ok: bool = True) -> None:
        self.clear()
        self.command.stdout.write(f"{'✓' if ok else '!'} {text}")


class Command(BaseCommand):
    help = (
        "Restore the database and the workspace from SOURCE: a backup directory (either naming "
        "format), a bundle .tar.gz, or a backup's name. Everything is checked before anything "
        "changes; a safety backup of the current state is taken first; the database is restored "
        "in one transaction, so a failure leaves the portal exactly as it was."
    )

    def add_arguments(self, parser):
        parser.add_argument("source", help="backup directory, bundle file, or backup name")
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation (automation)")
        parser.add_argument(
            "--no-safety-backup",
            action="store_true",
            help="skip the backup of the current state taken before replacing it",
        )

    def handle(self, *args, source, yes, no_safety_backup, **options):
        try:
            path = operations.resolve_source(source)
        except operations.OperationFailed as exc:
            raise CommandError(str(exc)) from None
        if not yes and not sys.stdin.isatty():
            raise CommandError(
                "Refusing to restore: there is no terminal to ask for confirmation on. "
                "Pass --yes to restore without asking. Nothing was changed."
            )
        try:
            with operations.restore_prepare(source=path) as plan:
                self.stdout.write("✓ preflight: manifest, checksums, archives and every workspace member check out")
                self._describe(plan)
                if not yes and not self._confirmed():
                    raise CommandError("Restore cancelled. Nothing was changed.")
                reporter = StepLines(self)
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
        expected = plan.manifest["db_revision"]
        if outcome.revision_after == expected:
            self.stdout.write(f"✓ db revision matches manifest ({expected})")
        else:
            self.stdout.write(f"! db revision mismatch. expected={expected} current={outcome.revision_after}")
        if plan.behind:
            self.stdout.write(f"! the backup predates migrations of this code ({', '.join(plan.behind)})")
        if plan.behind or outcome.revision_after != expected:
            self.stdout.write("! Run: python manage.py migrate")
        self.stdout.write("Restore complete")

    def _describe(self, plan) -> None:
        write = self.stdout.write
        taken = plan.taken_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        write(f"About to restore from {display_path(plan.source)}")
        write(
            f"  taken {taken} ({timesince(plan.taken_at, timezone.now())} ago), kind {plan.manifest['kind']}, "
            f"TRUSCA {plan.manifest['app_version']}"
        )
        write(f"  db revision: backup {plan.manifest['db_revision']}, live {plan.live_revision}")
        write("! This will:")
        write("! - REPLACE the current database content")
        if plan.has_workspace:
            write(f"! - REPLACE {plan.workspace_path} (if workspace.tar.gz present)")
        else:
            write(f"! - keep {plan.workspace_path} as it is: this backup holds no workspace.tar.gz")
        write(f"! - LOSE everything written since {taken}")
        if plan.behind:
            write(f"! The backup is older than this code ({', '.join(plan.behind)}): run migrate afterwards.")

    def _confirmed(self) -> bool:
        self.stdout.write("Continue? [y/N] ", ending="")
        self.stdout.flush()
        answer = sys.stdin.readline()
        return answer.strip().lower() in ("y", "yes")
