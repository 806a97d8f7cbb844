"""What every backup command shares: it first finishes what killed runs left (a restore's
journal, partial files), and prints one line with the right exit code for an interruption or an
unreachable service, never a traceback for what an operator can fix."""

import getpass
import logging
import sys
from pathlib import Path

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, OutputWrapper
from django.db import DatabaseError as DjangoDatabaseError

from trusca.backups import operations
from trusca.backups.errors import Interrupted
from trusca.backups.operations.lifecycle import interruptible
from trusca.backups.terminal import human_size


class OperationCommand(BaseCommand):
    # What the command does, for its interruption line: "Backup interrupted: …".
    action = "Operation"
    # What an interruption leaves, for that line.
    interrupted_leaves = "nothing was changed"

    def execute(self, *args, **options):
        # The command prints its own lines; the outcome lines are for the worker's log.
        quiet = options["verbosity"] < 2
        logging.getLogger("trusca.backups.outcome").setLevel(logging.CRITICAL if quiet else logging.INFO)
        if options.get("stdout"):
            self.stdout = OutputWrapper(options["stdout"])
        try:
            with interruptible():
                if not options.get("resume"):
                    for line in operations.sweep():
                        self.stdout.write(f"! {line}")
                return super().execute(*args, **options)
        except Interrupted as exc:
            sys.stderr.write(f"\n{self.action} interrupted: {self.interrupted_leaves}.\n")
            raise SystemExit(exc.exit_code) from None
        except redis.exceptions.ConnectionError as exc:
            raise CommandError(
                f"Redis (CACHE_URL) cannot be reached: {exc}. Start it or fix CACHE_URL; nothing was changed."
            ) from None
        except DjangoDatabaseError as exc:
            if _never_migrated(exc):
                raise CommandError(
                    "the database (DATABASE_URL) holds no TRUSCA tables yet: run `manage.py migrate` first, then "
                    "this command again (a restore replaces what migrate made). Nothing was changed."
                ) from None
            first = str(exc).strip().split("\n")[0]
            raise CommandError(f"the database (DATABASE_URL) cannot be used: {first}. Nothing was changed.") from None


def _never_migrated(exc: DjangoDatabaseError) -> bool:
    """A fresh database, as on a new host in the disaster-recovery runbook: the catalog's table,
    which every command reads first, is missing."""
    cause = exc.__cause__
    missing = getattr(cause, "sqlstate", None) == "42P01" or str(exc).startswith("no such table")
    return missing and "backups_backup" in str(exc)


def add_decryption_options(parser) -> None:
    parser.add_argument(
        "--decryption-key",
        metavar="FILE",
        help=(
            "an armored OpenPGP private key that opens a backup encrypted to BACKUP_ENCRYPTION_RECIPIENTS; its "
            "passphrase comes from BACKUP_DECRYPTION_KEY_PASSPHRASE(_FILE) or is asked for on the terminal"
        ),
    )


def decryption_keys(options):
    """The keys for this run: the installation's passphrase, plus the private key given."""
    path = options.get("decryption_key")
    if not path:
        return operations.decryption_keys()
    try:
        secret_key = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"--decryption-key {path} cannot be read ({exc}). Nothing was changed.") from None
    key_passphrase = settings.BACKUP_DECRYPTION_KEY_PASSPHRASE or None
    if key_passphrase is None and sys.stdin.isatty():
        key_passphrase = getpass.getpass(f"Passphrase of the private key in {path} (empty if none): ") or None
    return operations.decryption_keys(secret_key=secret_key, key_passphrase=key_passphrase)


def report_offload(command, report) -> None:
    """The lines of a copy run (operations.OffloadReport): the copies on stdout, the failures on
    stderr, which cron mails, though a failed copy does not fail the backup before it."""
    for copy in report.copied:
        how = "already there" if copy.already else f"{human_size(copy.size)} in {copy.seconds:.1f} s"
        command.stdout.write(f"✓ copied {copy.name} to {copy.url} ({how})")
    for name, why in report.failed.items():
        command.stderr.write(f"! copy to S3 failed{f' for {name}' if name else ''}: {why}")
    if report.failed:
        command.stderr.write(
            "! The backups themselves are good. `manage.py offload --missing` copies what the bucket lacks once "
            "that is fixed; the next backup tries again too."
        )
    for name in report.pruned:
        command.stdout.write(
            f"✓ pruned {name} from the bucket (older than {settings.BACKUP_S3_RETENTION_DAYS} days, "
            "BACKUP_S3_RETENTION_DAYS)"
        )
    if report.prune_error:
        command.stderr.write(f"! the bucket's retention did not run: {report.prune_error}")
