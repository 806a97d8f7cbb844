"""OpenPGP test keys, made by the real gpg at session start (about a second): what the tests
run against is what an operator's gpg makes, and no private key sits in the repository for
secret scanners to flag. Shared by every test that encrypts (fixtures exported in conftest)."""

import secrets
import subprocess
from dataclasses import dataclass

import pytest

from trusca.backups import crypto
from trusca.backups.crypto import DecryptionKeys

FIXTURE_AGENTS: set[int] = set()


@dataclass(frozen=True)
class Key:
    public: str
    secret: str
    passphrase: str
    fingerprint: str

    def opens(self, passphrase: str | None = None) -> DecryptionKeys:
        return DecryptionKeys(secret_key=self.secret, key_passphrase=self.passphrase, passphrase=passphrase)


def gpg(home, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    result = subprocess.run(home.gpg(*args), input=stdin, capture_output=True, env=crypto._ENV)
    assert result.returncode == 0, result.stderr.decode()
    return result


@pytest.fixture(scope="session")
def hand():
    """A gpg home as an operator has one: the real gpg, with an agent of ours that dies with us."""
    home = crypto._Home()
    home.start_agent()
    FIXTURE_AGENTS.add(home.agent.pid)
    yield home
    home.close()


def make_key(hand, name: str, passphrase: str, *, expires: str = "never", at: str | None = None) -> Key:
    uid = f"{name} <{name}@example.org>"
    clock = ["--faked-system-time", at] if at else []
    loopback = ["--pinentry-mode", "loopback", "--passphrase-fd", "0"]
    gpg(
        hand,
        *clock,
        *loopback,
        "--quick-gen-key",
        uid,
        "future-default",
        "default",
        expires,
        stdin=b"%s\n" % passphrase.encode(),
    )
    listing = gpg(hand, "--with-colons", "--list-keys", uid).stdout.decode()
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    public = gpg(hand, "--armor", "--export", fingerprint).stdout.decode()
    secret = gpg(hand, *loopback, "--armor", "--export-secret-keys", fingerprint, stdin=passphrase.encode()).stdout
    return Key(public, secret.decode(), passphrase, fingerprint)


@pytest.fixture(scope="session")
def alice(hand):
    return make_key(hand, "alice", "alice-" + secrets.token_hex(8))


@pytest.fixture(scope="session")
def bob(hand):
    return make_key(hand, "bob", "bob-" + secrets.token_hex(8))
