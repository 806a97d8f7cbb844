"""Verifying a backup: every check short of restoring it, in one read of each file."""

from dataclasses import dataclass, replace

from trusca.backups import crypto, manifest, workspace
from trusca.backups.errors import NotFound, OperationFailed
from trusca.backups.operations.sources import Source
from trusca.backups.progress import Counter, Reporter
from trusca.backups.streams import IntegrityError, check_stored


class VerifyFailed(OperationFailed):
    pass


class Untrusted(VerifyFailed):
    """The backup is whole as far as checked, but not signed with this installation's key."""


@dataclass
class VerifyReport:
    manifest: manifest.Manifest
    members: int  # workspace archive members
    signature: str
    uncompressed: dict[str, int]  # stored name -> bytes after decompression, as measured
    unchecked: list[str]  # encrypted archives whose content was not checked, for want of a key


def read_manifest(src: Source) -> manifest.Manifest:
    try:
        return manifest.parse(src.store.read_manifest(src.name))
    except NotFound:
        raise VerifyFailed(f"{manifest.MANIFEST} is missing") from None
    except manifest.ManifestError as exc:
        raise VerifyFailed(str(exc)) from None


def untrusted_message(state: str) -> str:
    return (
        f"its manifest is {state}: this installation's BACKUP_SIGNING_KEY does not vouch for it, and a backup's "
        "SQL runs with the portal's database rights. If you know where it comes from, restore it with "
        "--trust-unsigned, or vouch for it once with `manage.py verify_backup --sign`"
    )


def check_trust(document: manifest.Manifest, *, trust_unsigned: bool) -> str:
    state = document.signature_state()
    if not manifest.trusted(state) and not trust_unsigned:
        raise Untrusted(untrusted_message(state))
    return state


def backup_verify(
    src: Source,
    *,
    keys: crypto.DecryptionKeys | None = None,
    trust_unsigned: bool = False,
    reporter: Reporter | None = None,
    checkpoint=None,
) -> VerifyReport:
    """The manifest and its signature; each file's size and sha256; each gzip stream intact to
    its end and no longer than the manifest says; every workspace member safe to extract. An
    encrypted backup without its key: the ciphertexts' sizes and hashes only (``unchecked``)."""
    reporter = reporter or Reporter()
    document = read_manifest(src)
    state = check_trust(document, trust_unsigned=trust_unsigned)
    counter = Counter(sum(entry.size for entry in document.files.values()))
    members = 0
    uncompressed: dict[str, int] = {}
    unchecked: list[str] = []
    for name, entry in document.files.items():
        try:
            if keys is None and src.encrypted(name):
                unchecked.append(name)
                if name.endswith(manifest.ENCRYPTED_SUFFIX):
                    raw = src.store.open_read(src.name, name)
                    check_stored(raw, name, entry, progress=counter.add, checkpoint=checkpoint)
                continue
            with src.reader(name, entry, keys=keys, progress=counter.add, checkpoint=checkpoint) as reader:
                if manifest.archive_of(name) == manifest.WORKSPACE_ARCHIVE:
                    members = workspace.check(reader)
                reader.finish()
                uncompressed[name] = reader.uncompressed
        except NotFound:
            raise VerifyFailed(f"{name} is missing") from None
        except (IntegrityError, crypto.EncryptionError) as exc:
            raise VerifyFailed(str(exc)) from None
        except workspace.WorkspaceError as exc:
            raise VerifyFailed(f"{name}: {exc}") from None
        reporter.progress(counter.done, counter.total)
    return VerifyReport(
        manifest=document, members=members, signature=state, uncompressed=uncompressed, unchecked=unchecked
    )


def backup_sign(src: Source, *, actor: str, keys: crypto.DecryptionKeys | None = None) -> VerifyReport:
    """Vouch for a backup made before manifests were signed, or under an older key: verify it
    whole, record the uncompressed sizes it lacks, and sign its manifest with this key."""
    from trusca.portal import audit

    if src.scratch or not hasattr(src.store, "path"):
        # A bundle or a bucket's copy is read through a copy made for this run, gone afterwards.
        raise VerifyFailed("only a backup directory on this host's disk can be signed; copy or unpack it there first")
    report = backup_verify(src, keys=keys, trust_unsigned=True)
    if report.unchecked:
        raise VerifyFailed(
            f"{', '.join(report.unchecked)} cannot be checked whole without the key that opens them; "
            "give it to sign this backup"
        )
    document = report.manifest
    files = {
        name: replace(entry, uncompressed_size=report.uncompressed[name]) for name, entry in document.files.items()
    }
    signed = replace(document, files=files).signed()
    path = src.store.path(src.name) / manifest.MANIFEST
    partial = path.with_name(f".{manifest.MANIFEST}.signing")
    partial.write_bytes(signed.to_json())
    partial.replace(path)
    audit.record(actor=actor, action="backup.signed", target=src.label, detail={"was": report.signature})
    return replace(report, manifest=signed, signature=signed.signature_state())
