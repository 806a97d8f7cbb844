import getpass

from django.core.management.base import CommandError

from trusca.backups import operations
from trusca.backups.management.base import OperationCommand, add_decryption_options, decryption_keys
from trusca.backups.terminal import LiveLine


class Command(OperationCommand):
    help = (
        "Check a backup without restoring it. SOURCE is a backup directory (either naming format), "
        "a bundle .tar.gz, a backup's name in BACKUP_ROOT (else in the bucket), or s3://BUCKET/PREFIX/NAME "
        "(downloaded first). The manifest must be signed with this "
        "installation's key, each file's size and sha256 must match, each gzip stream must be intact "
        "to its end and no longer than recorded, and every workspace member safe to extract. Exits 0 "
        "when all hold, 1 naming the first fault otherwise."
    )
    action = "Verify"

    def add_arguments(self, parser):
        parser.add_argument(
            "source",
            help="backup directory, bundle file (.tar.gz or .tar.gz.gpg), backup name, or s3://BUCKET/PREFIX/NAME",
        )
        parser.add_argument(
            "--trust-unsigned",
            action="store_true",
            help="check a backup that is not signed with this installation's BACKUP_SIGNING_KEY",
        )
        parser.add_argument(
            "--sign",
            action="store_true",
            help=(
                "vouch for a backup on this host's disk that is whole but unsigned (made before signing existed, "
                "or under a rotated key): verify it, then sign its manifest with this installation's key"
            ),
        )

        add_decryption_options(parser)

    def handle(self, *args, source, trust_unsigned, sign, **options):
        keys = decryption_keys(options)
        download = LiveLine(label="downloading")
        try:
            with operations.open_source(source, keys=keys, reporter=download) as src:
                download.clear()
                if sign:
                    report = operations.backup_sign(src, actor=f"cli:{getpass.getuser()}", keys=keys)
                else:
                    report = operations.backup_verify(src, keys=keys, trust_unsigned=trust_unsigned)
        except operations.OperationFailed as exc:
            raise CommandError(f"{source} is not a good backup: {exc}") from None
        finally:
            download.clear()
        document = report.manifest
        for name, entry in document.files.items():
            if name in report.unchecked:
                self.stdout.write(
                    f"! {name}: encrypted; {'ciphertext sha256 matches, ' if name.endswith('.gpg') else ''}"
                    "its content is checked only with the key that opens it"
                )
            else:
                self.stdout.write(f"✓ {name}: {entry.size} bytes, sha256 matches, gzip stream intact")
        if document.workspace and document.workspace not in report.unchecked:
            self.stdout.write(f"✓ {document.workspace} lists {report.members} members, all safe to extract")
        self.stdout.write(
            f"✓ manifest: {document.kind} backup of {document.timestamp.isoformat()}, "
            f"db revision {document.db_revision}, {report.signature}"
        )
        if sign:
            self.stdout.write("✓ signed with this installation's BACKUP_SIGNING_KEY")
        self.stdout.write(f"Backup OK: {source}")
