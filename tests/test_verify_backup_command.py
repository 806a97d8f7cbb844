import io
import json

import pytest
from django.core.management import CommandError, call_command

from tests.helpers import backup_dirs, rewrite_manifest, sha256_of


def verify(path) -> list[str]:
    out = io.StringIO()
    call_command("verify_backup", str(path), stdout=out)
    return out.getvalue().splitlines()


@pytest.fixture
def backup(demo):
    call_command("backup", "--no-prune", "--bundle", stdout=io.StringIO())
    [directory] = backup_dirs()
    return directory


def dump_of(backup):
    return next(p for p in backup.iterdir() if p.name in ("postgres.sql.gz", "sqlite.db.gz"))


def test_a_good_backup_passes_as_a_directory_and_as_a_bundle(backup):
    assert verify(backup)[-1].startswith("Backup OK: ")
    assert verify(backup.with_name(f"{backup.name}.tar.gz"))[-1].startswith("Backup OK: ")


def test_it_accepts_the_ui_naming_format(backup):
    renamed = backup.rename(backup.with_name("manual-20260509T030000Z"))
    assert verify(renamed)[-1].startswith("Backup OK: ")


def test_it_catches_a_flipped_byte(backup):
    dump = dump_of(backup)
    data = bytearray(dump.read_bytes())
    data[len(data) // 3] ^= 0x80
    dump.write_bytes(bytes(data))
    with pytest.raises(CommandError, match=f"{dump.name} does not match its sha256"):
        verify(backup)


def test_it_catches_a_truncated_archive(backup):
    archive = backup / "workspace.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-64])
    with pytest.raises(CommandError, match=r"workspace.tar.gz is \d+ bytes; the manifest says \d+ \(truncated"):
        verify(backup)


def test_it_catches_a_truncated_archive_whose_manifest_was_rewritten_and_signed_to_match(backup):
    archive = backup / "workspace.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-64])
    entry = {"size": archive.stat().st_size, "sha256": sha256_of(archive)}
    rewrite_manifest(backup, lambda manifest: manifest["files"].__setitem__("workspace.tar.gz", entry))
    with pytest.raises(CommandError, match="workspace.tar.gz is not an intact gzip stream"):
        verify(backup)


def test_it_catches_a_missing_file(backup):
    (backup / "workspace.tar.gz").unlink()
    with pytest.raises(CommandError, match="workspace.tar.gz is missing"):
        verify(backup)


def test_it_catches_a_wrong_checksum_in_a_signed_manifest(backup):
    name = dump_of(backup).name
    rewrite_manifest(backup, lambda manifest: manifest["files"][name].__setitem__("sha256", "0" * 64))
    with pytest.raises(CommandError, match=f"{name} does not match its sha256"):
        verify(backup)


def test_it_refuses_a_manifest_altered_after_it_was_signed(backup):
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["files"][dump_of(backup).name]["sha256"] = "0" * 64
    (backup / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CommandError, match="its manifest is altered after it was signed.*--trust-unsigned"):
        verify(backup)


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        (b"{not json", "does not decode as JSON"),
        (b"[1, 2]", "is not a JSON object"),
        (json.dumps({"format": 1}).encode(), "lacks timestamp, kind, engine"),
    ],
)
def test_it_catches_a_broken_manifest(backup, content, fault):
    (backup / "manifest.json").write_bytes(content)
    with pytest.raises(CommandError, match=fault):
        verify(backup)


def test_it_reads_a_legacy_manifest_with_alembic_head_only(backup):
    manifest = json.loads((backup / "manifest.json").read_text())
    revision = manifest.pop("db_revision")
    (backup / "manifest.json").write_text(json.dumps(manifest))
    assert any(f"db revision {revision}" in line for line in verify(backup))


def test_it_catches_a_corrupt_bundle(backup):
    bundle = backup.with_name(f"{backup.name}.tar.gz")
    bundle.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    with pytest.raises(CommandError, match="the bundle does not read as a .tar.gz"):
        verify(bundle)


def test_it_refuses_a_bundle_with_foreign_members(backup, tmp_path):
    import tarfile

    foreign = tmp_path / "foreign.tar.gz"
    (tmp_path / "evil.sh").write_text("#!/bin/sh\n")
    with tarfile.open(foreign, "w:gz") as tar:
        tar.add(backup / "manifest.json", arcname="manifest.json")
        tar.add(tmp_path / "evil.sh", arcname="../evil.sh")
    with pytest.raises(CommandError, match="unexpected member '../evil.sh'"):
        verify(foreign)


def test_it_says_what_a_path_that_is_no_backup_is(tmp_path, transactional_db):
    with pytest.raises(CommandError, match="is not a backup directory, a bundle file, or the name of a stored backup"):
        verify(tmp_path / "nothing-here")


def flipped(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0x55
    return bytes(damaged)


def inflate_fails(data: bytes) -> bool:
    """Whether inflating stops with ISA-L's own error (not an OSError) before any checksum."""
    from trusca.backups import gz

    try:
        with gz.decompressing_reader(io.BytesIO(data)) as reader:
            while reader.read(1 << 20):
                pass
    except gz.InflateError:
        return True
    except (OSError, EOFError):
        pass
    return False


def test_rot_anywhere_in_a_compressed_archive_is_refused_in_one_line(backup):
    """Flipped bytes in deflate data stop inflating in several ways (a bad CRC, a truncated
    stream, ISA-L's own "invalid lookback distance"): each is the damage the checksum names."""
    archive = backup / "workspace.tar.gz"
    good = archive.read_bytes()
    positions = range(10, len(good) - 8, max(1, (len(good) - 18) // 60))
    raised_by_inflate = 0
    for at in positions:
        damaged = flipped(good, at)
        raised_by_inflate += inflate_fails(damaged)
        archive.write_bytes(damaged)
        with pytest.raises(CommandError, match="workspace.tar.gz does not match its sha256") as refused:
            verify(backup)
        assert "\n" not in str(refused.value)
    archive.write_bytes(good)
    assert raised_by_inflate, "no flip reached ISA-L's own inflate error: the test needs other positions"


def test_rot_in_a_bundle_compressed_by_hand_is_refused_in_one_line(backup, tmp_path):
    import tarfile

    made_by_hand = tmp_path / "by-hand.tar.gz"
    with tarfile.open(made_by_hand, "w:gz") as tar:  # zlib's Huffman-coded deflate, not stored blocks
        for member in sorted(backup.iterdir()):
            tar.add(member, arcname=member.name)
    good = made_by_hand.read_bytes()
    raised_by_inflate = 0
    start = 10 + len("by-hand.tar\0")  # past the gzip header and the file name it records
    for at in range(start, len(good) - 8, max(1, (len(good) - start - 8) // 40)):
        damaged = flipped(good, at)
        raised_by_inflate += inflate_fails(damaged)
        made_by_hand.write_bytes(damaged)
        with pytest.raises(CommandError) as refused:
            verify(made_by_hand)
        message = str(refused.value)
        assert "\n" not in message and ("the bundle does not read as a .tar.gz" in message or "sha256" in message)
    assert raised_by_inflate, "no flip reached ISA-L's own inflate error: the test needs other positions"


def test_a_bundle_with_data_past_its_end_is_refused(backup, tmp_path):
    import gzip

    bundle = backup.with_name(f"{backup.name}.tar.gz")
    padded = tmp_path / "padded.tar.gz"
    padded.write_bytes(gzip.compress(gzip.decompress(bundle.read_bytes()) + bytes(2 << 20), compresslevel=1))
    with pytest.raises(CommandError, match="the bundle holds data after its end"):
        verify(padded)
