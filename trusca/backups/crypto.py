"""OpenPGP encryption of backup files while they stream, in the format ``gpg --decrypt`` opens.

The ``gpg`` binary does the cryptography, driven through pipes. Measured on this project's 2-core
host with 1.1 GB of gzip output (benchmarks/crypto_bench.py): gpg 2.2 spends 1.8 s of CPU per GB
to encrypt and 1.1 s to decrypt (about 600 and 900 MB/s on an idle core), in 5 MB of memory
whatever the size; our side of the pipes adds 0.45 s per GB. The maintained Python libraries
lose: pysequoia 0.1.35 encrypts at 190 MB/s holding the GIL and decrypts only into memory
(1.2 GB RSS for 1 GB); PGPy 0.6 handles whole messages in memory, at 60-70 MB/s.

Messages are AES-256 with the integrity check (an MDC packet), and uncompressed: what we encrypt
is gzip already, and gpg's default ZIP costs ten times the CPU of the encryption for nothing.
The passphrase's S2K is gpg's strongest (SHA-512, 65011712 bytes hashed: 0.2 s per message).

Each stream gets a private GNUPGHOME that holds keys only, never data; no keyring of the host is
read or touched. Secrets reach gpg on pipes: the passphrase on ``--passphrase-fd``, a private
key's passphrase preset into a gpg-agent of our own. That agent is needed only to decrypt with a
private key (gpg 2.2 cannot do it alone); we start it ourselves on a socket we bind, so that,
like gpg, it dies with us instead of lingering as a daemon.
"""

import contextlib
import fcntl
import functools
import io
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from django.core import checks

from trusca.backups import children
from trusca.backups.errors import OperationFailed

CIPHER = "AES256"
CHUNK = 1024 * 1024
# The kernel's default pipe is 64 KiB; 1 MiB (the unprivileged maximum) cuts the wake-ups per
# gigabyte sixteenfold.
_PIPE_SIZE = 1024 * 1024
_S2K = ["--s2k-mode", "3", "--s2k-digest-algo", "SHA512", "--s2k-count", "65011712"]
# gpg-agent takes at most 255 bytes when it asks for a passphrase, and gpg reads one line from
# --passphrase-fd: a longer or multi-line passphrase would be cut short without a word.
_MAX_PASSPHRASE = 255
_HOME_PREFIX = "trusca-gpg-"
_STATUS_LIMIT = 64 * 1024
_ARMOR_BLOCK = re.compile(r"-----BEGIN PGP [A-Z ]+-----.*?-----END PGP [A-Z ]+-----", re.DOTALL)
# No secret from our own environment (BACKUP_ENCRYPTION_PASSPHRASE, SECRET_KEY…) in the
# children's; C locale for gpg's messages.
_ENV = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
# No agent or keyserver started behind our back, no terminal, no prompt; status lines on stderr.
_GPG_OPTIONS = ("--batch", "--no-tty", "--no-autostart", "--no-auto-key-retrieve", "--status-fd", "2")
_INVALID_RECIPIENT = {"1": "not found", "3": "without an encryption key", "4": "revoked", "5": "expired"}


class EncryptionError(OperationFailed):
    """One line, never a secret: shown to operators as it is."""


@dataclass(frozen=True)
class _Cert:
    fingerprint: str
    secret: bool
    can_encrypt: bool
    keygrips: tuple[str, ...]


@dataclass(frozen=True)
class EncryptionKeys:
    passphrase: str | None = field(repr=False)
    recipients: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls) -> "EncryptionKeys | None":
        from django.conf import settings

        passphrase = settings.BACKUP_ENCRYPTION_PASSPHRASE or None
        text = settings.BACKUP_ENCRYPTION_RECIPIENTS.strip()
        recipients = tuple(_ARMOR_BLOCK.findall(text)) or ((text,) if text else ())
        if passphrase is None and not recipients:
            return None
        return cls(passphrase=passphrase, recipients=recipients)

    @functools.cached_property
    def _certs(self) -> tuple[tuple[_Cert, ...], ...]:
        return tuple(_inspect(block) for block in self.recipients)

    def problems(self) -> list[str]:
        """What stops these keys from encrypting, worded for BACKUP_ENCRYPTION_* settings."""
        found = []
        if self.passphrase is not None:
            found += _passphrase_problems("BACKUP_ENCRYPTION_PASSPHRASE", self.passphrase)
        for index, certs in enumerate(self._certs, 1):
            if not certs:
                found.append(f"BACKUP_ENCRYPTION_RECIPIENTS block {index} is not an OpenPGP public key")
            for cert in certs:
                if cert.secret:
                    found.append(
                        f"BACKUP_ENCRYPTION_RECIPIENTS holds the private key {cert.fingerprint}; "
                        "give only public keys (gpg --armor --export), the host must not hold what opens its backups"
                    )
                elif not cert.can_encrypt:
                    found.append(
                        f"BACKUP_ENCRYPTION_RECIPIENTS key {cert.fingerprint} cannot encrypt "
                        "(expired, revoked or without an encryption subkey)"
                    )
        return found

    @property
    def fingerprints(self) -> list[str]:
        return [cert.fingerprint for certs in self._certs for cert in certs]

    def describe(self) -> dict:
        return {
            "format": "openpgp",
            "cipher": CIPHER,
            "compression": "none",
            "passphrase": self.passphrase is not None,
            "recipients": self.fingerprints,
        }


@dataclass(frozen=True)
class DecryptionKeys:
    passphrase: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    key_passphrase: str | None = field(default=None, repr=False)


def _passphrase_problems(what: str, passphrase: str) -> list[str]:
    if any(c in passphrase for c in "\r\n\0"):
        return [f"{what} contains a line break or NUL, which gpg cannot take"]
    if len(passphrase.encode()) > _MAX_PASSPHRASE:
        return [f"{what} is longer than {_MAX_PASSPHRASE} bytes, which gpg cannot take"]
    return []


def check_encryption(app_configs=None, **kwargs):
    keys = EncryptionKeys.from_settings()
    if keys is None:
        return []
    try:
        _tool("gpg")
        problems = keys.problems()
    except EncryptionError as exc:  # gpg itself is missing
        return [checks.Error(str(exc), hint="Install GnuPG (the gpg package).", id="backups.E010")]
    return [
        checks.Error(problem, hint="Backups cannot be encrypted until this is fixed.", id="backups.E011")
        for problem in problems
    ]


# gpg children ---------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name, path=_ENV["PATH"])
    if path is None:
        raise EncryptionError(f"{name} is not installed; encrypted backups need GnuPG (gpg, gpg-agent, gpgconf)")
    return path


def _run(argv: list[str], data: bytes = b"") -> subprocess.CompletedProcess:
    proc = children.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_ENV)
    try:
        out, err = proc.communicate(data)
    except BaseException:
        children.kill(proc)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _homes_root() -> Path:
    # RAM-backed where the host has it: a private key imported for a restore never reaches a
    # disk, and a reboot clears whatever a SIGKILL left behind.
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())


def _sweep(root: Path) -> None:
    """Remove the homes of processes that were killed before they could (their children died
    with them)."""
    for home in root.glob(f"{_HOME_PREFIX}*-*"):
        pid = home.name[len(_HOME_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(home, ignore_errors=True)
        except PermissionError:
            pass  # alive, and someone else's


class _Home:
    """A private GNUPGHOME for one stream, with gpg-agent when a private key is needed."""

    def __init__(self) -> None:
        self.gpg_path = _tool("gpg")
        root = _homes_root()
        _sweep(root)
        self.path = tempfile.mkdtemp(prefix=f"{_HOME_PREFIX}{os.getpid()}-", dir=root)
        self.agent: subprocess.Popen | None = None

    def gpg(self, *args: str) -> list[str]:
        return [self.gpg_path, "--homedir", self.path, *_GPG_OPTIONS, *args]

    def import_keys(self, armored: str, *, what: str) -> None:
        result = _run(self.gpg("--import"), armored.encode())
        if result.returncode != 0:
            raise EncryptionError(f"{what} cannot be imported into gpg: {_last_gpg_line(result.stderr)}")

    def start_agent(self) -> None:
        gpgconf = _tool("gpgconf")
        socket_path = _run([gpgconf, "--homedir", self.path, "--list-dirs", "agent-socket"]).stdout.decode().strip()
        if os.path.dirname(socket_path) != self.path:
            _run([gpgconf, "--homedir", self.path, "--create-socketdir"])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(socket_path)
            listener.listen(16)
            # --supervised takes its listening socket as fd 3 (LISTEN_FDS); the shell moves it
            # there from stdin. Bound before the agent starts: no client can come too early.
            agent = [_tool("gpg-agent"), "--homedir", self.path, "--supervised", "--disable-scdaemon"]
            agent += ["--allow-preset-passphrase", "--no-allow-external-cache", "--s2k-count", "65011712"]
            self.agent = children.spawn(
                ["/bin/sh", "-c", 'exec 3<&0 0</dev/null; exec "$0" "$@"', *agent],
                stdin=listener.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**_ENV, "LISTEN_FDS": "1"},
            )

    def preset(self, keygrips: tuple[str, ...], passphrase: str) -> None:
        commands = "".join(f"PRESET_PASSPHRASE {grip} -1 {passphrase.encode().hex()}\n" for grip in keygrips)
        result = _run(
            [_tool("gpg-connect-agent"), "--homedir", self.path, "--no-autostart"], f"{commands}/bye\n".encode()
        )
        if result.returncode != 0 or b"ERR" in result.stdout:
            raise EncryptionError("gpg-agent refused the private key's passphrase")

    def close(self) -> None:
        if self.agent is not None:
            children.kill(self.agent)
            self.agent = None
        if Path(f"/run/user/{os.getuid()}").is_dir():
            # There gpg keeps a socket directory for every home it meets, ours included.
            _run([_tool("gpgconf"), "--homedir", self.path, "--remove-socketdir"])
        shutil.rmtree(self.path, ignore_errors=True)


def _inspect(armored: str) -> tuple[_Cert, ...]:
    """The keys in an armored block, read by gpg without importing them anywhere."""
    home = _Home()
    try:
        listing = home.gpg("--with-colons", "--with-keygrip", "--import-options", "show-only", "--import")
        result = _run(listing, armored.encode())
    finally:
        home.close()
    certs: list[_Cert] = []
    record: dict | None = None
    for line in result.stdout.decode(errors="replace").splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sec"):
            if record:
                certs.append(_Cert(**record))
            # An uppercase E: some valid (sub)key of this certificate can encrypt.
            usable = fields[1] not in ("e", "r", "i", "n") and "E" in fields[11]
            record = {"fingerprint": "", "secret": fields[0] == "sec", "can_encrypt": usable, "keygrips": ()}
        elif record is not None and fields[0] == "fpr" and not record["fingerprint"]:
            record["fingerprint"] = fields[9]
        elif record is not None and fields[0] == "grp":
            record["keygrips"] += (fields[9],)
    if record:
        certs.append(_Cert(**record))
    return tuple(certs)


# What gpg says about its own private home, which names a temporary path and no cause.
_HOUSEKEEPING = re.compile(r"keybox '.*' created|directory '.*' created")


def _last_gpg_line(stderr: bytes) -> str:
    lines = [
        line.removeprefix("gpg: ").strip()
        for line in stderr.decode(errors="replace").splitlines()
        if line.strip() and not line.startswith("[GNUPG:]")
    ]
    lines = [line for line in lines if not _HOUSEKEEPING.fullmatch(line)]
    return lines[-1] if lines else "no error output"


def _stream_name(stream, name: str | None) -> str:
    if name:
        return name
    named = getattr(stream, "name", None)
    return os.path.basename(named) if isinstance(named, str) else "the encrypted file"


class _GpgStream(io.RawIOBase):
    """One gpg child driven from the caller's thread alone: poll() over its stdin, stdout and
    stderr, so neither side can block the other however full a pipe is, and every read of the
    source or write to the sink happens in the caller's thread."""

    def __init__(self, home: _Home, args: list[str], passphrase: str | None, name: str) -> None:
        self._home = home
        self.name = name
        pass_fds: tuple[int, ...] = ()
        if passphrase is not None:
            read_end, write_end = os.pipe()
            # At most 256 bytes, below PIPE_BUF: written whole before gpg starts, never blocks.
            os.write(write_end, passphrase.encode() + b"\n")
            os.close(write_end)
            args = ["--passphrase-fd", str(read_end), *args]
            pass_fds = (read_end,)
        try:
            self._proc = children.spawn(
                home.gpg("--pinentry-mode", "loopback", *args),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=pass_fds,
                env=_ENV,
            )
        finally:
            for fd in pass_fds:
                os.close(fd)
        self._finished = False
        self._error: EncryptionError | None = None
        self._log = bytearray()
        self._stdin: int | None = self._proc.stdin.fileno()
        self._stdout: int | None = self._proc.stdout.fileno()
        self._stderr: int | None = self._proc.stderr.fileno()
        for fd in (self._stdin, self._stdout):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        for fd in (self._stdin, self._stdout, self._stderr):
            os.set_blocking(fd, False)

    def _usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise ValueError(f"I/O operation on the closed stream of {self.name}")

    def _fail(self, message: str) -> EncryptionError:
        self._error = EncryptionError(message)
        return self._error

    def _wait_for(self, *, write: bool, timeout: float | None = None) -> list[int]:
        """The pipes ready to use (a closed peer counts: the next read or write says so)."""
        # poll(), not select(): a worker with a thousand open files gets descriptors select
        # cannot take.
        poller = select.poll()
        for fd in (self._stdout, self._stderr):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        if write and self._stdin is not None:
            poller.register(self._stdin, select.POLLOUT)
        ready = [fd for fd, _ in poller.poll(timeout)]
        if self._stderr in ready:
            self._read_log()
        return ready

    def _read_log(self) -> None:
        try:
            data = os.read(self._stderr, 65536)
        except BlockingIOError:
            return
        if not data:
            self._stderr = None
            return
        self._log += data
        if len(self._log) > _STATUS_LIMIT:  # a hostile file must not grow our memory
            del self._log[: len(self._log) - _STATUS_LIMIT]

    def _status(self) -> dict[str, list[str]]:
        status: dict[str, list[str]] = {}
        for line in self._log.decode(errors="replace").splitlines():
            if line.startswith("[GNUPG:] "):
                keyword, _, rest = line[9:].partition(" ")
                status.setdefault(keyword, []).append(rest)
        return status

    def _close_stdin(self) -> None:
        if self._stdin is not None:
            self._stdin = None
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()

    def _exit_status(self) -> int:
        """Once gpg's output has ended: read what it still says until it exits."""
        self._close_stdin()
        while self._stderr is not None:
            self._wait_for(write=False)
        return self._proc.wait()

    def _abort(self) -> None:
        if not self._finished:
            self._finished = True
            children.kill(self._proc)
            for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()
            self._home.close()

    def _done(self) -> None:
        self._finished = True
        self._proc.stdout.close()
        self._proc.stderr.close()
        self._home.close()

    def abort(self) -> None:
        """Kill gpg, leaving the message unfinished: what reached the sink must be discarded."""
        self._abort()
        super().close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        # Never finish a message nobody closed, as IOBase's __del__ would: kill gpg instead.
        with contextlib.suppress(Exception):
            self._abort()


class _EncryptingWriter(_GpgStream):
    def __init__(self, sink: BinaryIO, home: _Home, args: list[str], passphrase: str | None, name: str) -> None:
        self._sink = sink
        super().__init__(home, args, passphrase, name)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._usable()
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                ready = self._wait_for(write=True)
                if self._stdout in ready:
                    self._drain()
                if self._stdin not in ready:
                    continue
                try:
                    view = view[os.write(self._stdin, view[:_PIPE_SIZE]) :]
                except BlockingIOError:
                    pass
                except BrokenPipeError:  # gpg is gone: its status says why
                    self._finish()
                    raise self._fail(f"gpg stopped reading {self.name} before its end")
        except BaseException:
            self._abort()
            raise
        return total

    def _drain(self) -> None:
        try:
            data = os.read(self._stdout, CHUNK)
        except BlockingIOError:
            return
        if not data:
            self._stdout = None
            return
        view = memoryview(data)
        while view:
            view = view[self._sink.write(view) :]

    def _finish(self) -> None:
        self._close_stdin()
        while self._stdout is not None:
            if self._stdout in self._wait_for(write=False):
                self._drain()
        returncode = self._exit_status()
        if returncode != 0 or "END_ENCRYPTION" not in self._status():
            raise self._fail(self._failure())
        self._done()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._finished:
                self._finish()
        except BaseException:
            self._abort()
            raise
        finally:
            super().close()

    def _failure(self) -> str:
        for invalid in self._status().get("INV_RECP", []):
            reason, _, key = invalid.partition(" ")
            return f"cannot encrypt {self.name}: recipient key {key} is {_INVALID_RECIPIENT.get(reason, 'unusable')}"
        return f"gpg could not encrypt {self.name}: {_last_gpg_line(self._log)}"


class _DecryptingReader(_GpgStream):
    def __init__(self, source: BinaryIO, home: _Home, keys: DecryptionKeys, name: str) -> None:
        self._source = source
        self._keys = keys
        self._pending = memoryview(b"")
        self._checked = False
        self._eof = False
        super().__init__(home, ["--decrypt", "--output", "-"], keys.passphrase, name)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._eof:
            return 0
        self._usable()
        out = memoryview(buffer).cast("B")
        try:
            while True:
                ready = self._wait_for(write=True)
                if self._stdin in ready:
                    self._feed()
                if self._stdout not in ready:
                    continue
                try:
                    count = os.readv(self._stdout, [out])
                except BlockingIOError:
                    continue
                if count == 0:
                    self._finish()
                    return 0
                if not self._checked:
                    self._check_encrypted()
                return count
        except BaseException:
            self._abort()
            raise

    def _feed(self) -> None:
        if not self._pending:
            data = self._source.read(CHUNK)
            if not data:
                self._close_stdin()
                return
            self._pending = memoryview(data)
        try:
            self._pending = self._pending[os.write(self._stdin, self._pending) :]
        except BlockingIOError:
            pass
        except BrokenPipeError:  # gpg stopped reading; its exit status says why
            self._pending = memoryview(b"")
            self._close_stdin()

    def _check_encrypted(self) -> None:
        # gpg writes a status line before the plaintext it announces: once plaintext is here,
        # so is BEGIN_DECRYPTION, unless the file was never encrypted at all.
        while self._stderr is not None and self._stderr in self._wait_for(write=False, timeout=0):
            pass
        if "BEGIN_DECRYPTION" not in self._status():
            raise self._fail(f"{self.name} is not an encrypted OpenPGP file")
        self._checked = True

    def _finish(self) -> None:
        self._stdout = None
        returncode = self._exit_status()
        failure = self._failure(returncode, self._status())
        if failure:
            raise self._fail(failure)
        self._eof = True
        self._done()

    def _failure(self, returncode: int, status: dict[str, list[str]]) -> str | None:
        encrypted = "BEGIN_DECRYPTION" in status
        opened = "DECRYPTION_OKAY" in status and "GOODMDC" in status
        if returncode == 0 and encrypted and opened:
            return None
        if not encrypted and "PLAINTEXT" in status:
            return f"{self.name} is not an encrypted OpenPGP file"
        if opened:
            return f"gpg could not decrypt {self.name}: {_last_gpg_line(self._log)}"
        if "BADMDC" in status or "PLAINTEXT" in status:
            return f"{self.name} was altered or truncated (integrity check failed)"
        if status.keys() & {"BEGIN_DECRYPTION", "ENC_TO", "NEED_PASSPHRASE", "NEED_PASSPHRASE_SYM", "NO_SECKEY"}:
            return self._key_failure(status)
        if "NODATA" in status:
            return f"{self.name} is not an OpenPGP file (empty, cut short or something else)"
        return f"gpg could not decrypt {self.name}, damaged or not an OpenPGP file: {_last_gpg_line(self._log)}"

    def _key_failure(self, status: dict[str, list[str]]) -> str:
        opens = []
        if "NEED_PASSPHRASE_SYM" in status:
            opens.append("its passphrase")
        key_ids = [line.split(" ")[0] for line in status.get("ENC_TO", [])]
        if key_ids:
            opens.append(f"the private key for {' or '.join(key_ids)}")
        hint = f" (it opens with {' or '.join(opens)})" if opens else ""
        if self._keys.passphrase is None and self._keys.secret_key is None:
            return f"no passphrase or key given for {self.name}{hint}"
        return f"wrong passphrase or key for {self.name}{hint}"

    def close(self) -> None:
        self._abort()  # nothing left to do once the end was reached and checked
        super().close()


def encrypting_writer(sink: BinaryIO, keys: EncryptionKeys, *, name: str | None = None) -> BinaryIO:
    """Everything written is encrypted into ``sink`` as one OpenPGP message; ``close()`` finishes
    it (``sink`` stays open), ``abort()`` or leaving a ``with`` block by an exception kills gpg
    with the message unfinished."""
    name = _stream_name(sink, name)
    problems = keys.problems()
    if problems:
        raise EncryptionError(f"cannot encrypt {name}: {problems[0]}")
    args = ["--cipher-algo", CIPHER, "--compress-algo", "none", "--output", "-"]
    if keys.passphrase is not None:
        args += ["--symmetric", *_S2K]
    home = _Home()
    try:
        if keys.recipients:
            home.import_keys("\n".join(keys.recipients), what="BACKUP_ENCRYPTION_RECIPIENTS")
            args += ["--encrypt", "--trust-model", "always"]
            for fingerprint in keys.fingerprints:
                args += ["--recipient", fingerprint]
        return _EncryptingWriter(sink, home, args, keys.passphrase, name)
    except BaseException:
        home.close()
        raise


def decrypting_reader(source: BinaryIO, keys: DecryptionKeys, *, name: str | None = None) -> BinaryIO:
    """The plaintext of ``source``. A wrong or missing passphrase or key raises EncryptionError at
    the first read, an altered or truncated file at the latest instead of the end of the stream:
    the last read never returns b"" for a message that failed its integrity check."""
    name = _stream_name(source, name)
    for what, secret in (("the passphrase", keys.passphrase), ("the private key's passphrase", keys.key_passphrase)):
        if secret is not None and (problems := _passphrase_problems(what, secret)):
            raise EncryptionError(f"cannot decrypt {name}: {problems[0]}")
    home = _Home()
    try:
        if keys.secret_key is not None:
            secret = [cert for cert in _inspect(keys.secret_key) if cert.secret]
            if not secret:
                raise EncryptionError(
                    f"cannot decrypt {name}: the decryption key holds no private key "
                    "(export it with gpg --armor --export-secret-keys)"
                )
            home.start_agent()
            home.import_keys(keys.secret_key, what="the decryption key")
            if keys.key_passphrase is not None:
                home.preset(tuple(grip for cert in secret for grip in cert.keygrips), keys.key_passphrase)
        return io.BufferedReader(_DecryptingReader(source, home, keys, name), CHUNK)
    except BaseException:
        home.close()
        raise


def probe(source: BinaryIO, keys: DecryptionKeys, *, name: str | None = None) -> None:
    """Prove that ``keys`` open ``source`` by decrypting its first bytes; reads (consumes) only the
    head of ``source``."""
    with contextlib.closing(decrypting_reader(source, keys, name=name)) as reader:
        reader.read(1)
