"""The OpenPGP layer, against the real gpg binary: what it writes, gpg opens by hand, and what gpg
writes by hand, it opens; a wrong key, an altered file or a killed process never gets through.
The keys come from tests/gpgkeys.py."""

import gzip
import io
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from trusca.backups import crypto
from trusca.backups.crypto import DecryptionKeys, EncryptionError, EncryptionKeys

from .gpgkeys import FIXTURE_AGENTS, gpg, make_key
from .test_settings import start

PLAIN = secrets.token_bytes(64) * 40_000  # 2.5 MB: several pipe-fulls, gpg buffers and chunks
KEY_FILES = ("pubring.kbx", "pubring.kbx~", "trustdb.gpg", "private-keys-v1.d", "random_seed")


def encrypt(keys: EncryptionKeys, data: bytes = PLAIN, step: int = 99_991) -> bytes:
    sink = io.BytesIO()
    with crypto.encrypting_writer(sink, keys, name="workspace.tar.gz.gpg") as writer:
        for start_at in range(0, len(data), step):
            writer.write(data[start_at : start_at + step])
    assert not sink.closed
    return sink.getvalue()


def decrypt(blob: bytes, keys: DecryptionKeys) -> bytes:
    with crypto.decrypting_reader(io.BytesIO(blob), keys, name="workspace.tar.gz.gpg") as reader:
        return reader.read()


def refusal(blob: bytes, keys: DecryptionKeys) -> tuple[str, list[bytes]]:
    """Read to the end in chunks; the error, and every chunk read before it."""
    chunks = []
    reader = crypto.decrypting_reader(io.BytesIO(blob), keys, name="workspace.tar.gz.gpg")
    with pytest.raises(EncryptionError) as caught, reader:
        while True:
            chunks.append(reader.read(65536))
            if not chunks[-1]:
                break
    message = str(caught.value)
    assert "\n" not in message
    return message, chunks


def gpg_children() -> dict[int, str]:
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.with_name("comm").read_text().strip()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if int(fields[1]) == os.getpid() and name.startswith("gpg") and pid not in FIXTURE_AGENTS:
            found[pid] = name
    return found


def test_it_round_trips_with_a_passphrase():
    blob = encrypt(EncryptionKeys(passphrase="correct horse"))
    assert PLAIN[:4096] not in blob
    assert decrypt(blob, DecryptionKeys(passphrase="correct horse")) == PLAIN


def test_it_round_trips_an_empty_stream_and_the_longest_passphrase():
    longest = "é" * 127 + "!"  # 255 bytes, the most gpg takes
    assert decrypt(encrypt(EncryptionKeys(passphrase=longest), b""), DecryptionKeys(passphrase=longest)) == b""


def test_it_round_trips_to_a_recipient_key(alice):
    blob = encrypt(EncryptionKeys(passphrase=None, recipients=(alice.public,)))
    assert decrypt(blob, alice.opens()) == PLAIN


def test_with_both_a_passphrase_and_keys_either_opens_it(alice, bob):
    blob = encrypt(EncryptionKeys(passphrase="shared", recipients=(alice.public, bob.public)))
    assert decrypt(blob, DecryptionKeys(passphrase="shared")) == PLAIN
    assert decrypt(blob, alice.opens()) == PLAIN
    assert decrypt(blob, bob.opens(passphrase="not the passphrase")) == PLAIN
    assert decrypt(blob, DecryptionKeys(passphrase="shared", secret_key=bob.secret, key_passphrase="no")) == PLAIN


def test_several_keys_in_one_recipients_file_each_open_it(settings, alice, bob, tmp_path):
    settings.BACKUP_ENCRYPTION_PASSPHRASE = ""
    settings.BACKUP_ENCRYPTION_RECIPIENTS = alice.public + "\n" + bob.public
    keys = EncryptionKeys.from_settings()
    assert keys.describe() == {
        "format": "openpgp",
        "cipher": "AES256",
        "compression": "none",
        "passphrase": False,
        "recipients": [alice.fingerprint, bob.fingerprint],
    }
    blob = encrypt(keys)
    assert decrypt(blob, alice.opens()) == decrypt(blob, bob.opens()) == PLAIN


def test_without_either_setting_there_is_nothing_to_encrypt_with(settings):
    settings.BACKUP_ENCRYPTION_PASSPHRASE = settings.BACKUP_ENCRYPTION_RECIPIENTS = ""
    assert EncryptionKeys.from_settings() is None


def test_gpg_opens_our_output_by_hand(hand, alice, tmp_path):
    loopback = ["--pinentry-mode", "loopback", "--passphrase-fd", "0"]
    blob = encrypt(EncryptionKeys(passphrase="by hand", recipients=(alice.public,)))
    packets = gpg(hand, *loopback, "--list-packets", stdin=b"by hand\n" + blob).stdout.decode()
    assert "cipher 9" in packets and "mdc_method: 2" in packets and "compressed packet" not in packets
    (tmp_path / "backup.gpg").write_bytes(blob)
    assert gpg(hand, *loopback, "--decrypt", str(tmp_path / "backup.gpg"), stdin=b"by hand\n").stdout == PLAIN
    # The hand's home made alice's key: it holds her private key, as her own machine would.
    (tmp_path / "for-alice.gpg").write_bytes(encrypt(EncryptionKeys(passphrase=None, recipients=(alice.public,))))
    opened = gpg(hand, *loopback, "--decrypt", str(tmp_path / "for-alice.gpg"), stdin=alice.passphrase.encode())
    assert opened.stdout == PLAIN


def test_a_file_encrypted_the_manuals_way_opens(hand, tmp_path):
    archive = tmp_path / "workspace.tar.gz"
    archive.write_bytes(PLAIN)
    # The manual's `gpg --symmetric --cipher-algo AES256 FILE`, with the passphrase on a pipe
    # instead of the prompt; gpg's defaults otherwise, so the message is compressed inside.
    loopback = ["--pinentry-mode", "loopback", "--passphrase-fd", "0"]
    gpg(hand, *loopback, "--symmetric", "--cipher-algo", "AES256", str(archive), stdin=b"manual\n")
    blob = (tmp_path / "workspace.tar.gz.gpg").read_bytes()
    assert "compressed packet" in gpg(hand, *loopback, "--list-packets", stdin=b"manual\n" + blob).stdout.decode()
    assert decrypt(blob, DecryptionKeys(passphrase="manual")) == PLAIN


def test_a_wrong_passphrase_is_refused_at_the_first_read():
    blob = encrypt(EncryptionKeys(passphrase="right-" + secrets.token_hex(4)))
    wrong = "wrong-" + secrets.token_hex(4)
    message, chunks = refusal(blob, DecryptionKeys(passphrase=wrong))
    assert chunks == []
    assert message == "wrong passphrase or key for workspace.tar.gz.gpg (it opens with its passphrase)"


def test_a_missing_key_is_refused_saying_what_opens_it(alice):
    blob = encrypt(EncryptionKeys(passphrase=None, recipients=(alice.public,)))
    message, chunks = refusal(blob, DecryptionKeys())
    assert chunks == [] and message.startswith("no passphrase or key given for workspace.tar.gz.gpg (it opens with")
    message, chunks = refusal(blob, DecryptionKeys(passphrase="a passphrase is not the key"))
    assert chunks == [] and message.startswith("wrong passphrase or key for workspace.tar.gz.gpg")


def test_a_wrong_key_or_a_wrong_key_passphrase_is_refused(alice, bob):
    blob = encrypt(EncryptionKeys(passphrase=None, recipients=(alice.public,)))
    for keys in (
        bob.opens(),
        DecryptionKeys(secret_key=alice.secret, key_passphrase=bob.passphrase),
        DecryptionKeys(secret_key=alice.secret),
    ):
        message, chunks = refusal(blob, keys)
        assert chunks == [] and message.startswith("wrong passphrase or key for workspace.tar.gz.gpg")
        assert alice.passphrase not in message and bob.passphrase not in message


def test_a_public_key_given_for_decryption_is_refused(alice):
    with pytest.raises(EncryptionError, match="the decryption key holds no private key"):
        crypto.decrypting_reader(io.BytesIO(b""), DecryptionKeys(secret_key=alice.public))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda blob: blob[: len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 1]) + blob[len(blob) // 2 + 1 :],
            id="flipped",
        ),
        pytest.param(lambda blob: blob[: len(blob) * 2 // 3], id="truncated"),
        pytest.param(lambda blob: blob[:-1], id="last-byte-cut"),
        pytest.param(lambda blob: blob + b"appended", id="appended"),
    ],
)
def test_an_altered_file_is_refused_before_its_end(damage):
    blob = damage(encrypt(EncryptionKeys(passphrase="pw")))
    message, chunks = refusal(blob, DecryptionKeys(passphrase="pw"))
    assert b"" not in chunks  # the end of the stream was never reported
    assert message == "workspace.tar.gz.gpg was altered or truncated (integrity check failed)"


def test_an_altered_header_is_refused_as_a_wrong_key():
    blob = bytearray(encrypt(EncryptionKeys(passphrase="pw")))
    blob[8] ^= 0xFF  # inside the salt: another key comes out of the passphrase
    message, chunks = refusal(bytes(blob), DecryptionKeys(passphrase="pw"))
    assert chunks == [] and message.startswith("wrong passphrase or key")


def test_a_file_that_was_never_encrypted_is_refused(hand):
    literal = gpg(hand, "--store", stdin=PLAIN).stdout  # a valid OpenPGP message, in the clear
    message, chunks = refusal(literal, DecryptionKeys(passphrase="pw"))
    assert chunks == [] and message == "workspace.tar.gz.gpg is not an encrypted OpenPGP file"
    # A plain archive renamed .gpg. Not random bytes: one in fifty starts like an OpenPGP packet
    # asking for a passphrase, and gpg then reports a wrong passphrase, as we do.
    for junk in (b"", gzip.compress(PLAIN[:100_000])):
        message, _ = refusal(junk, DecryptionKeys(passphrase="pw"))
        assert message.startswith("workspace.tar.gz.gpg is not an OpenPGP file")


def test_probe_reads_only_the_head_and_refuses_a_wrong_key():
    blob = encrypt(EncryptionKeys(passphrase="pw"))
    source = io.BytesIO(blob)
    crypto.probe(source, DecryptionKeys(passphrase="pw"))
    assert source.tell() <= 2 * crypto.CHUNK < len(blob)
    assert gpg_children() == {}
    with pytest.raises(EncryptionError, match="wrong passphrase or key"):
        crypto.probe(io.BytesIO(blob), DecryptionKeys(passphrase="other"))


def test_it_works_in_a_process_holding_more_than_a_thousand_files(alice):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        blob = encrypt(EncryptionKeys(passphrase="pw", recipients=(alice.public,)))
        assert decrypt(blob, alice.opens()) == PLAIN
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_exception_while_writing_kills_gpg_and_leaves_the_message_unfinished():
    sink = io.BytesIO()
    with pytest.raises(RuntimeError), crypto.encrypting_writer(sink, EncryptionKeys(passphrase="pw")) as writer:
        writer.write(PLAIN)
        raise RuntimeError("the dump failed")
    assert gpg_children() == {}
    message, _ = refusal(sink.getvalue(), DecryptionKeys(passphrase="pw"))
    assert "integrity check failed" in message or "not an OpenPGP file" in message


def test_a_failing_sink_stops_the_writer_with_its_own_error():
    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(28, "No space left on device")

    writer = crypto.encrypting_writer(Full(), EncryptionKeys(passphrase="pw"))
    with pytest.raises(OSError, match="No space left"), writer:
        for _ in range(20):
            writer.write(PLAIN)
    assert gpg_children() == {}


def test_no_secret_reaches_a_command_line_or_an_environment_and_no_plaintext_a_disk(monkeypatch, hand, alice):
    passphrase = "pass-" + secrets.token_hex(12)
    monkeypatch.setenv("BACKUP_ENCRYPTION_PASSPHRASE", passphrase)
    marker = secrets.token_bytes(48)
    plain = marker * 50_000
    secrets_ = [passphrase.encode(), alice.passphrase.encode(), alice.passphrase.encode().hex().encode()]

    seen = set()

    def inspect_children_and_disk() -> None:
        for pid, name in gpg_children().items():
            for what in ("cmdline", "environ"):
                try:
                    exposed = Path(f"/proc/{pid}/{what}").read_bytes()
                except (ProcessLookupError, FileNotFoundError):
                    continue  # gpg has just finished
                assert not any(secret in exposed for secret in secrets_), what
                seen.add(name)
        homes = [
            home
            for home in crypto._homes_root().glob(f"{crypto._HOME_PREFIX}{os.getpid()}-*")
            if str(home) != hand.path
        ]
        assert homes
        for home in homes:
            for path in home.rglob("*"):
                if path.is_file():
                    assert marker not in path.read_bytes(), path
                    top = path.parts[len(home.parts)]
                    assert top in KEY_FILES or top.startswith(".#lk"), path  # keys, and gpg's lock files

    sink = io.BytesIO()
    with crypto.encrypting_writer(sink, EncryptionKeys(passphrase=passphrase, recipients=(alice.public,))) as writer:
        for offset in range(0, len(plain), 500_000):
            writer.write(plain[offset : offset + 500_000])
            inspect_children_and_disk()
    keys = DecryptionKeys(passphrase=passphrase, secret_key=alice.secret, key_passphrase=alice.passphrase)
    with crypto.decrypting_reader(io.BytesIO(sink.getvalue()), keys) as reader:
        while reader.read(300_000):
            inspect_children_and_disk()
    assert seen == {"gpg", "gpg-agent"}
    assert gpg_children() == {}


KILLED = """
import io, os, sys, time
sys.path.insert(0, {repo!r})
from trusca.backups import crypto
keys = crypto.DecryptionKeys(secret_key=open({secret!r}).read(), key_passphrase="x")
reader = crypto.decrypting_reader(io.BytesIO(b"never read"), keys)
writer = crypto.encrypting_writer(open(os.devnull, "wb"), crypto.EncryptionKeys(passphrase="pw"))
writer.write(b"x" * 5_000_000)
print(os.getpid(), flush=True)
time.sleep(60)
"""


def test_a_killed_parent_leaves_no_gpg_and_its_home_is_swept_next_time(alice, tmp_path):
    secret = tmp_path / "key.asc"
    secret.write_text(alice.secret)
    script = KILLED.format(repo=str(settings.BASE_DIR), secret=str(secret))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    orphans = [
        int(stat.parent.name)
        for stat in Path("/proc").glob("[0-9]*/stat")
        if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid)
    ]
    assert len(orphans) == 3  # the reader's gpg and agent, the writer's gpg
    homes = list(crypto._homes_root().glob(f"{crypto._HOME_PREFIX}{pid}-*"))
    assert len(homes) == 2
    os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while any(alive(child) for child in orphans) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(child) for child in orphans)
    encrypt(EncryptionKeys(passphrase="pw"), b"next run")
    assert not any(home.exists() for home in homes)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


MEMORY = """
import io, os, resource, sys
sys.path.insert(0, {repo!r})
from trusca.backups import crypto
block = os.urandom(1024 * 1024)
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
with open({path!r}, "wb") as sink, crypto.encrypting_writer(sink, crypto.EncryptionKeys(passphrase="pw")) as w:
    w.write(block)
    before = rss()
    for _ in range(300):
        w.write(block)
with open({path!r}, "rb") as source, crypto.decrypting_reader(source, crypto.DecryptionKeys(passphrase="pw")) as r:
    total = 0
    while chunk := r.read(crypto.CHUNK):
        total += len(chunk)
print(before, rss(), total)
"""


def test_memory_stays_flat_through_300_mb(tmp_path):
    script = MEMORY.format(repo=str(settings.BASE_DIR), path=str(tmp_path / "big.gpg"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after, total = map(int, result.stdout.split())
    assert total == 301 * 1024 * 1024
    assert after - before < 20, (before, after)


def test_a_recipient_key_that_cannot_encrypt_is_refused_before_anything_is_written(hand):
    expired = make_key(hand, "expired", "", expires="2020-06-01", at="20200101T000000!")
    sink = io.BytesIO()
    with pytest.raises(EncryptionError, match=f"key {expired.fingerprint} cannot encrypt"):
        crypto.encrypting_writer(sink, EncryptionKeys(passphrase=None, recipients=(expired.public,)))
    assert sink.getvalue() == b""


@pytest.mark.parametrize(
    ("passphrase", "recipients", "problem"),
    [
        ("two\nlines", "", "BACKUP_ENCRYPTION_PASSPHRASE contains a line break"),
        ("x" * 256, "", "BACKUP_ENCRYPTION_PASSPHRASE is longer than 255 bytes"),
        ("", "not a key at all", "BACKUP_ENCRYPTION_RECIPIENTS block 1 is not an OpenPGP public key"),
        ("", "SECRET", "BACKUP_ENCRYPTION_RECIPIENTS holds the private key"),
    ],
)
def test_the_system_check_refuses_bad_encryption_settings(settings, alice, passphrase, recipients, problem):
    settings.BACKUP_ENCRYPTION_PASSPHRASE = passphrase
    settings.BACKUP_ENCRYPTION_RECIPIENTS = alice.secret if recipients == "SECRET" else recipients
    errors = crypto.check_encryption()
    assert [error.id for error in errors] == ["backups.E011"]
    assert errors[0].msg.startswith(problem)
    assert "x" * 20 not in errors[0].msg and "two" not in errors[0].msg


def test_good_encryption_settings_pass_the_check_and_keys_never_show_their_secrets(settings, alice):
    settings.BACKUP_ENCRYPTION_PASSPHRASE = "a fine passphrase"
    settings.BACKUP_ENCRYPTION_RECIPIENTS = alice.public
    assert crypto.check_encryption() == []
    keys = EncryptionKeys.from_settings()
    assert "a fine passphrase" not in repr(keys) and alice.passphrase not in repr(alice.opens())
    assert "a fine passphrase" not in str(keys.describe()) and "BEGIN PGP" not in str(keys.describe())


def test_without_gpg_the_check_says_to_install_it(settings, monkeypatch, tmp_path):
    settings.BACKUP_ENCRYPTION_PASSPHRASE = "a fine passphrase"
    monkeypatch.setitem(crypto._ENV, "PATH", str(tmp_path))
    assert [(error.id, error.msg) for error in crypto.check_encryption()] == [
        ("backups.E010", "gpg is not installed; encrypted backups need GnuPG (gpg, gpg-agent, gpgconf)")
    ]


def test_a_recipients_file_holding_a_private_key_stops_the_start(tmp_path, alice):
    key_file = tmp_path / "recipients.asc"
    key_file.write_text(alice.secret)
    result = start(tmp_path, BACKUP_ENCRYPTION_RECIPIENTS_FILE=str(key_file))
    assert result.returncode != 0 and "backups.E011" in result.stderr
    assert f"holds the private key {alice.fingerprint}" in result.stderr
