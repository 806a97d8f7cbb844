"""Backups in an S3 bucket or an S3-compatible store: ``<prefix><name>/<member>``, the layout that
``aws s3 sync`` of the backup directory gives, so the manual's runbook still reads it.

django-storages' S3Storage does the configuration (session, endpoint, region, client settings),
the key naming, the listing and the deletion. Not the transfers: measured with django-storages
1.14.6 on 200 MB against moto on loopback, its S3File sends one 5 MiB part at a time from inside
``write()`` (never two in flight, 46 MB/s, no checksum; an exception inside its ``with`` block
completes the upload with whatever was written), and opening one for reading downloads the
whole object into a SpooledTemporaryFile before the first byte, in memory with the default
AWS_S3_MAX_MEMORY_SIZE=0 (+290 MB RSS, 2.5 s) or on disk otherwise. Here an upload is a multipart
upload fed by ``write()`` with several parts in flight, and a read is ranged GETs a few chunks
ahead of the reader: memory is bounded by the bytes in flight whatever the size. A download into a
file (a restore's) needs no buffers: long ranges at once, each written where it belongs.

Integrity: every part goes with its SHA-256, which S3 verifies on receipt (the object's checksum
is then composite, a checksum of the parts' checksums, never the file's); the file's sha256
travels as the object's metadata, the upload re-hashes what it was given and refuses to complete
on a difference, and a reader checks it at end of file. A member smaller than one part is one
PutObject whose SHA-256 is the file's own, which S3 checks whole. The manifest goes last, and
only once every file it lists is there with its size: a listed manifest means a whole backup.
"""

import base64
import collections
import contextlib
import hashlib
import io
import logging
import os
import re
import threading
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import botocore.auth
import botocore.handlers
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from django.conf import settings
from storages.backends.s3 import S3Storage

from trusca.backups import diskio
from trusca.backups import manifest as manifest_mod
from trusca.backups.errors import NotFound, OperationFailed
from trusca.backups.naming import parse_name
from trusca.backups.store.base import Store, StoredBackup, Upload
from trusca.backups.store.local import check_member, check_name

log = logging.getLogger("trusca.backups")

MiB = 1024 * 1024
# S3's smallest part, so that the memory allowed holds more parts in flight: measured on loopback
# (256 MiB, three rounds), 6 parts of 5 MiB went 30-35 MiB/s where 4 of 8 MiB went 25-28 and 8 of
# 8 MiB 31-37. Parts grow (doubling every 2,000 parts, up to 20 MiB, where one is in flight) so
# that S3's 10,000-part limit is reached only past ~146 GiB, without knowing the size up front.
PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
# Parts being sent at once are bounded by their bytes (at least one part): with the part being
# filled, a copy's uploads hold ~30 MiB between them (they share their store's buffers), and the
# ~90 MB a worker process holds before it (Django, a boto3 client) stay under the 150 MB budget.
IN_FLIGHT_BYTES = 25 * MiB
READ_CHUNK = 8 * MiB
# Two 8 MiB reads ahead: a download of the ~1 GB dataset's backup peaked at 141 MB with two,
# 159 MB with three (over the 150 MB budget) and 178 MB with four, at the same speed (10.9 s
# against 11.1 s on loopback, where the server sets the pace).
READ_AHEAD = 2
# A download into a file needs no buffers: each range's bytes are written at their offset as they
# arrive, so ranges can be long (fewer requests) and several in flight. Measured in
# benchmarks/offload_bench.py.
DOWNLOAD_RANGE = 64 * MiB
DOWNLOADERS = 4
# A dead endpoint must fail in seconds: an unanswered connect costs CONNECT_TIMEOUT per attempt,
# a silent server READ_TIMEOUT; botocore's standard retry mode backs off between attempts and
# never retries a refusal (credentials, permissions, missing bucket).
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 20
ATTEMPTS = 3
SHA256_METADATA = "sha256"  # x-amz-meta-sha256
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
_REGION_CODES = {
    "PermanentRedirect",
    "IllegalLocationConstraintException",
    "AuthorizationHeaderMalformed",
    "AuthorizationQueryParametersError",
}
_STREAM_ERRORS = (HTTPClientError, IncompleteReadError)


class OffsiteError(OperationFailed):
    """The bucket answered with an error."""


class OffsiteUnavailable(OffsiteError):
    """The bucket cannot be used now (network, credentials, permissions, missing bucket, region,
    clock): the operation can be retried once that is fixed."""


class OffsiteCorrupt(OffsiteError):
    """An object's bytes differ from the sha256 recorded with it."""


def configured() -> "S3Store | None":
    """The bucket from the settings, or None when BACKUP_S3_BUCKET is unset."""
    if not settings.BACKUP_S3_BUCKET:
        return None
    return S3Store(
        bucket=settings.BACKUP_S3_BUCKET,
        prefix=settings.BACKUP_S3_PREFIX,
        endpoint_url=settings.BACKUP_S3_ENDPOINT_URL,
        region=settings.BACKUP_S3_REGION,
        storage_class=settings.BACKUP_S3_STORAGE_CLASS,
    )


def _b64_sha256(data) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class S3Store(Store):
    location = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "backups/",
        endpoint_url: str = "",
        region: str = "",
        storage_class: str = "STANDARD_IA",
        part_size: int = PART_SIZE,
        read_chunk: int = READ_CHUNK,
        download_range: int = DOWNLOAD_RANGE,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ):
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.endpoint_url = endpoint_url
        self.region = region
        self.storage_class = storage_class
        self.part_size = part_size
        self.read_chunk = read_chunk
        self.download_range = download_range
        self.timeouts = (connect_timeout, read_timeout)
        self.storage = S3Storage(
            bucket_name=bucket,
            location=prefix.rstrip("/"),
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            # Nothing but boto3's own chain (environment, shared files, instance or container role):
            # django-storages would otherwise also take keys from Django settings.
            access_key=None,
            secret_key=None,
            security_token=None,
            session_profile=None,
            default_acl=None,
            object_parameters={"StorageClass": storage_class} if storage_class else {},
            client_config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
                max_pool_connections=16,
                # Virtual-hosted names (bucket.host) need DNS that a MinIO or Ceph host rarely has.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                # Uploads name their own SHA-256; no CRC32 added to the rest.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._client = None
        self._client_lock = threading.Lock()
        # Shared by the uploads in progress (a copy sends its files at once).
        self.part_buffers = _Buffers(IN_FLIGHT_BYTES)

    def __repr__(self) -> str:
        return f"<S3Store s3://{self.bucket}/{self.prefix}>"

    @property
    def client(self):
        # One client shared by the transfer threads (boto3 clients are thread-safe); the storage
        # would make a session per thread.
        with self._client_lock:
            if self._client is None:
                self._client = self.storage.connection.meta.client
                self._client.meta.events.register("choose-signer.s3.UploadPart", _choose_part_signer)
            return self._client

    def release(self) -> None:
        """Let go of the boto3 session and client, ~30 MB of service models and connections, until
        a later call makes them again: a restore from the bucket holds its store long after the
        download, while the load needs that memory."""
        with self._client_lock:
            self._client = None
            self.storage._connections = threading.local()  # django-storages' per-thread resource
            self.storage._bucket = None

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(name, '') if name else self.prefix}"

    # Keys -------------------------------------------------------------------------------------

    def _key(self, name: str, member: str) -> str:
        return self.storage._normalize_name(f"{check_name(name)}/{member}")

    def _object_parameters(self, content_type: str, sha256: str | None) -> dict:
        # Not the storage's _get_write_parameters: it guesses ContentEncoding gzip for .tar.gz,
        # and clients would then unpack the archives on the way down.
        params = {**self.storage.get_object_parameters(""), "ContentType": content_type}
        if sha256:
            params["Metadata"] = {SHA256_METADATA: sha256}
        return params

    # The interface ----------------------------------------------------------------------------

    def open_write(self, name: str, member: str, *, sha256: str | None = None) -> Upload:
        key = self._key(name, check_member(member))
        if sha256 is not None and not _HEX64.match(sha256):
            raise OperationFailed(f"{sha256!r} is not a sha256 (64 lowercase hexadecimal characters)")
        doing = f"uploading {name}/{member}"
        if self._has(self._key(name, manifest_mod.MANIFEST), doing):
            raise OperationFailed(f"a backup named {name} already exists in {self.url()}; nothing was written")
        return _MultipartUpload(self, key, doing, sha256)

    def publish(self, name: str, manifest: bytes) -> None:
        doing = f"publishing {name}"
        key = self._key(name, manifest_mod.MANIFEST)
        try:
            document = manifest_mod.parse(manifest)
        except manifest_mod.ManifestError as exc:
            raise OperationFailed(f"{name} was not published: {exc}") from None
        if self._has(key, doing):
            raise OperationFailed(f"a backup named {name} already exists in {self.url()}")
        stored = self._objects(name, doing)
        for member, entry in document.files.items():
            if member not in stored:
                raise OperationFailed(f"{name} was not published: {member} is missing from {self.url(name)}")
            if stored[member] != entry.size:
                raise OperationFailed(
                    f"{name} was not published: {member} in {self.url(name)} holds {stored[member]} bytes, "
                    f"its manifest says {entry.size}"
                )
            recorded = self._head(self._key(name, member), doing).get("Metadata", {}).get(SHA256_METADATA)
            if recorded is not None and recorded != entry.sha256:
                raise OperationFailed(
                    f"{name} was not published: {member} in {self.url(name)} is recorded with another sha256 "
                    "than its manifest's"
                )
        with self._s3(doing):
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=manifest,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=_b64_sha256(manifest),
                **self._object_parameters("application/json", hashlib.sha256(manifest).hexdigest()),
            )

    def discard(self, name: str) -> None:
        doing = f"discarding {name}"
        self._abort_uploads(name, doing)
        # Only what an unpublished backup left: a published one is deleted by delete(), never here.
        if not self._has(self._key(name, manifest_mod.MANIFEST), doing):
            self._delete_objects(name, doing)

    def open_read(self, name: str, member: str) -> BinaryIO:
        doing = f"reading {name}/{member}"
        key, head, recorded = self._member(name, member, doing)
        reader = _RangedReader(self, key, doing, size=head["ContentLength"], etag=head["ETag"], sha256=recorded)
        return io.BufferedReader(reader, buffer_size=256 * 1024)

    def download(self, name: str, member: str, out: BinaryIO, *, max_size: int, progress=None) -> None:
        """A member into ``out``, a new empty file open for reading and writing: DOWNLOADERS ranged
        GETs of ``download_range`` bytes at once, each writing at its offset as its bytes arrive,
        so memory holds a few MiB whatever the range; behind them the sha256 is checked in order
        on what was written, read back from the page cache. ``progress(count)`` hears the bytes
        checked. An object larger than ``max_size`` (its manifest's size) is refused before its
        first byte."""
        doing = f"downloading {name}/{member}"
        key, head, recorded = self._member(name, member, doing)
        if head["ContentLength"] > max_size:
            raise OffsiteCorrupt(f"{self.url(name)}{member} is larger than its manifest records (altered)")
        _Download(self, key, doing, out.fileno(), size=head["ContentLength"], etag=head["ETag"], sha256=recorded).run(
            progress or (lambda count: None)
        )

    def _member(self, name: str, member: str, doing: str) -> tuple[str, dict, str | None]:
        """A published backup's member: its key, its HEAD and the sha256 recorded with it."""
        key = self._key(name, check_member(member))
        if not self._has(self._key(name, manifest_mod.MANIFEST), doing):
            raise NotFound(f"there is no backup named {name} in {self.url()}")
        head = self._head(key, doing)
        if head is None:
            raise NotFound(f"{name} has no {member} in {self.url()}")
        recorded = head.get("Metadata", {}).get(SHA256_METADATA)
        if recorded is not None and not _HEX64.match(recorded):
            raise OffsiteCorrupt(f"{self.url(name)}{member} carries an unreadable sha256 ({recorded[:70]!r})")
        return key, head, recorded

    def read_manifest(self, name: str) -> bytes:
        key = self._key(name, manifest_mod.MANIFEST)
        doing = f"reading {name}/{manifest_mod.MANIFEST}"
        try:
            with self._s3(doing):
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                with contextlib.closing(body):
                    return body.read(manifest_mod.MAX_MANIFEST_BYTES + 1)
        except OffsiteError as exc:
            if _code(exc.__cause__) in ("NoSuchKey", "404"):
                raise NotFound(f"{name} has no {manifest_mod.MANIFEST} in {self.url()}") from None
            raise

    def list(self) -> list[StoredBackup]:
        found = [self._load(name, size) for name, size in self.names().items()]
        return sorted(found, key=lambda b: (b.timestamp, b.name))

    def names(self) -> dict[str, int]:
        """The published backups (their manifest is listed) and the bytes each holds, from the
        listing alone: one request per thousand objects, no manifest read."""
        sizes, published = self._listing()
        return {name: sizes[name] for name in published}

    def unpublished(self) -> tuple[str, ...]:
        """Names with objects but no manifest: a copy under way, or what one cut short (or a
        delete cut short) left behind, which ``discard`` removes."""
        sizes, published = self._listing()
        return tuple(sorted(set(sizes) - published))

    def _listing(self) -> tuple[dict[str, int], set[str]]:
        sizes: dict[str, int] = collections.defaultdict(int)
        published = set()
        with self._s3("listing the backups"):
            for obj in self.storage.bucket.objects.filter(Prefix=self.prefix):
                name, slash, member = obj.key[len(self.prefix) :].partition("/")
                if not slash or "/" in member or parse_name(name) is None:
                    continue  # not something this store wrote
                sizes[name] += obj.size
                if member == manifest_mod.MANIFEST:
                    published.add(name)
        return sizes, published

    def _load(self, name: str, size: int) -> StoredBackup:
        parsed = parse_name(name)
        try:
            document = manifest_mod.parse(self.read_manifest(name))
        except (manifest_mod.ManifestError, NotFound) as exc:
            return StoredBackup(name, parsed.kind, parsed.timestamp, None, size, str(exc))
        # The kind from the name, as the local store has it: an uploaded backup is kept as uploaded.
        return StoredBackup(name, parsed.kind, document.timestamp, document, size)

    def exists(self, name: str) -> bool:
        doing = f"looking for {name}"
        prefix = self._key(name, "")
        with self._s3(doing):
            if self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0):
                return True
            return bool(self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads"))

    def delete(self, name: str) -> None:
        doing = f"deleting {name}"
        with self._s3(doing):
            # The manifest first: from then on the backup is no longer listed, whatever stops us.
            self.storage.delete(f"{check_name(name)}/{manifest_mod.MANIFEST}")  # the storage adds the prefix
        self._delete_objects(name, doing)
        self._abort_uploads(name, doing)

    # Helpers ----------------------------------------------------------------------------------

    def _head(self, key: str, doing: str) -> dict | None:
        try:
            with self._s3(doing):
                return self.client.head_object(Bucket=self.bucket, Key=key)
        except OffsiteError as exc:
            if _code(exc.__cause__) not in ("404", "NoSuchKey"):
                raise
        # A HEAD says 404 for a missing bucket too: ask the bucket, so that this is not taken for
        # a missing backup.
        with self._s3(doing):
            self.client.head_bucket(Bucket=self.bucket)
        return None

    def _has(self, key: str, doing: str) -> bool:
        return self._head(key, doing) is not None

    def _objects(self, name: str, doing: str) -> dict[str, int]:
        prefix = self._key(name, "")
        with self._s3(doing):
            return {o.key[len(prefix) :]: o.size for o in self.storage.bucket.objects.filter(Prefix=prefix)}

    def _delete_objects(self, name: str, doing: str) -> None:
        prefix = self._key(name, "")
        with self._s3(doing):
            keys = [o.key for o in self.storage.bucket.objects.filter(Prefix=prefix)]
            for start in range(0, len(keys), 1000):
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                errors = self.storage.bucket.delete_objects(Delete={"Objects": batch, "Quiet": True}).get("Errors")
                if errors:
                    first = errors[0]
                    raise OffsiteError(
                        f"S3 kept {len(errors)} object(s) of {name} in {self.url()} while {doing} "
                        f"({first.get('Code')} on {first.get('Key')}); run it again"
                    )

    def _abort_uploads(self, name: str, doing: str) -> None:
        with self._s3(doing):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(name, "")):
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )

    @contextlib.contextmanager
    def _s3(self, doing: str):
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self.explain(exc, doing) from exc

    def explain(self, exc: BaseException, doing: str) -> OffsiteError:
        """One line for an operator: what went wrong with the bucket and what to do. Never the
        credentials, which the portal does not even hold (boto3's chain does)."""
        bucket = self.bucket
        where = self.endpoint_url or f"AWS ({self.region or 'default region'})"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return OffsiteUnavailable(
                f"no AWS credentials were found for bucket {bucket} while {doing}: give the portal's processes "
                "credentials through the environment (AWS_ACCESS_KEY_ID…), a shared credentials file or an "
                "instance or container role"
            )
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return OffsiteUnavailable(
                f"S3 at {where} could not be reached while {doing} ({_network_reason(exc, self.timeouts)}): "
                "check the network and BACKUP_S3_ENDPOINT_URL"
            )
        if not isinstance(exc, ClientError):
            return OffsiteError(f"S3 failed while {doing} in bucket {bucket} ({type(exc).__name__}: {_line(exc)})")
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("403", "404"):  # a HEAD's answer has no body, so no code: say what it means
            code = {"403": "AccessDenied", "404": "NotFound"}[code]
        if code in _CREDENTIAL_CODES:
            return OffsiteUnavailable(
                f"S3 refused the credentials for bucket {bucket} ({code}): "
                "check the AWS credentials the portal runs with"
            )
        if code == "NoSuchBucket" or (code == "NotFound" and exc.operation_name == "HeadBucket"):
            return OffsiteUnavailable(
                f"bucket {bucket} does not exist at {where}: create it, or correct BACKUP_S3_BUCKET"
            )
        if code == "RequestTimeTooSkewed":
            return OffsiteUnavailable(
                f"S3 refused the requests for bucket {bucket} ({code}): this host's clock is too far from the "
                "right time; set it right (NTP)"
            )
        if code == "InvalidObjectState":
            return OffsiteUnavailable(
                f"S3 cannot read an object of bucket {bucket} while {doing} ({code}): a lifecycle rule moved it to "
                "an archive storage class; restore it in S3 first, and keep backups out of GLACIER and DEEP_ARCHIVE"
            )
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return OffsiteUnavailable(
                f"S3 denied access to bucket {bucket} while {doing} ({code}): grant the portal's credentials "
                "the permissions of the README's IAM policy"
            )
        if code in _REGION_CODES or status == 301:
            return OffsiteUnavailable(
                f"bucket {bucket} is not in region {self.region or '(default)'} ({code}): set BACKUP_S3_REGION "
                "to the bucket's region"
            )
        if code == "InvalidStorageClass":
            return OffsiteUnavailable(
                f"S3 at {where} does not offer storage class {self.storage_class} ({code}): set "
                "BACKUP_S3_STORAGE_CLASS to one it offers, or to nothing to send none"
            )
        return OffsiteError(f"S3 failed while {doing} in bucket {bucket} ({code}: {_line(exc.response['Error'])})")


def _code(exc) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _line(value) -> str:
    text = value.get("Message", "") if isinstance(value, dict) else str(value)
    return " ".join(str(text).split())[:160]


def _network_reason(exc: Exception, timeouts: tuple[float, float]) -> str:
    if isinstance(exc, ConnectTimeoutError):
        return f"no connection within {timeouts[0]:g} s"
    if isinstance(exc, ReadTimeoutError):
        return f"no answer within {timeouts[1]:g} s"
    # The socket's own words ("Connection refused", "Name or service not known") are in the cause.
    errno = re.search(r"\[Errno -?\d+\] ([^'\"()\]]+)", str(getattr(exc, "kwargs", {}).get("error", exc)))
    return errno.group(1).strip() if errno else type(exc).__name__


class _Buffers:
    """Part-sized buffers, made once and handed round: a fresh allocation per 8 MiB part lets
    glibc's per-thread arenas keep 50-70 MB more resident (measured on 256 MiB each way).
    ``in_flight`` bytes of them may be away at once, plus the one being filled or read, whoever
    takes them: the uploads of one copy share their store's, so two files sent at once hold what
    one did. A free buffer of another size (parts grow past 2,000) is dropped when one is needed.
    Nobody waits for one holding another: a part's buffer is given back once it is sent or failed."""

    def __init__(self, in_flight: int):
        self.in_flight = in_flight
        self._made = 0  # bytes, in use or free
        self._free: list[bytearray] = []
        self._users = 0
        self._changed = threading.Condition()

    def take(self, size: int) -> bytearray:
        with self._changed:
            while True:
                for index, buffer in enumerate(self._free):
                    if len(buffer) == size:
                        return self._free.pop(index)
                if self._made <= self.in_flight:
                    self._made += size
                    return bytearray(size)
                if self._free:
                    self._made -= len(self._free.pop())
                else:
                    self._changed.wait()  # one comes back when a part is sent (or fails)

    def give_back(self, buffer: bytearray) -> None:
        with self._changed:
            self._free.append(buffer)
            self._changed.notify()

    def join(self) -> None:
        with self._changed:
            self._users += 1

    def leave(self) -> None:
        """The last user gone, the free buffers go (the ~30 MiB are not kept between copies)."""
        with self._changed:
            self._users -= 1
            if not self._users:
                self._made -= sum(len(buffer) for buffer in self._free)
                self._free.clear()


class _MultipartUpload(Upload):
    def __init__(self, store: S3Store, key: str, doing: str, sha256: str | None):
        self._store = store
        self._client = store.client
        self._key = key
        self._doing = doing
        self._expected = sha256
        self._hash = hashlib.sha256()
        self._size = 0
        self._part: bytearray | None = None
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: dict[int, dict] = {}
        self._next_part = 1
        self._sending: list[Future] = []
        self._failure: BaseException | None = None
        self._buffers = store.part_buffers
        self._buffers.join()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, IN_FLIGHT_BYTES // store.part_size), thread_name_prefix="trusca-s3-put"
        )

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a closed upload")
        self._check_failure()
        view = memoryview(data).cast("B")
        written = len(view)
        self._hash.update(view)
        self._size += written
        while view:
            if self._part is None:
                self._part = self._buffers.take(self._part_size())
                self._check_failure()
            count = min(len(view), len(self._part) - self._filled)
            self._part[self._filled : self._filled + count] = view[:count]
            self._filled += count
            view = view[count:]
            if self._filled == len(self._part):
                self._send()
        return written

    def _part_size(self) -> int:
        return self._store.part_size << min(2, (self._next_part - 1) // 2000)

    def _send(self) -> None:
        if self._next_part > MAX_PARTS:
            raise OperationFailed(
                f"{self._doing}: the file is larger than a multipart upload of {MAX_PARTS} parts can hold"
            )
        if self._upload_id is None:
            with self._store._s3(self._doing):
                self._upload_id = self._client.create_multipart_upload(
                    Bucket=self._store.bucket,
                    Key=self._key,
                    ChecksumAlgorithm="SHA256",
                    **self._store._object_parameters("application/octet-stream", self._expected),
                )["UploadId"]
        buffer, filled = self._part, self._filled
        self._part, self._filled = None, 0
        number, self._next_part = self._next_part, self._next_part + 1
        self._sending.append(self._pool.submit(self._upload_part, number, buffer, filled))

    def _upload_part(self, number: int, buffer: bytearray, filled: int) -> None:
        try:
            body = _PartBody(memoryview(buffer)[:filled])
            checksum = base64.b64encode(body.sha256).decode()
            response = self._client.upload_part(
                Bucket=self._store.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            )
            self._parts[number] = {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}
        except BaseException as exc:
            self._failure = self._failure or exc
        finally:
            self._buffers.give_back(buffer)

    def _check_failure(self) -> None:
        if self._failure is not None:
            failure = self._failure
            if isinstance(failure, ClientError | BotoCoreError):
                raise self._store.explain(failure, self._doing) from failure
            raise failure

    def _wait_for_parts(self) -> None:
        futures.wait(self._sending)
        self._sending = []

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._complete()
        except BaseException:
            self.abort()
            raise
        self._stop()
        super().close()

    def _complete(self) -> None:
        if self._upload_id is not None and self._filled:
            self._send()
        self._wait_for_parts()
        self._check_failure()
        digest = self._hash.hexdigest()
        if self._expected is not None and digest != self._expected:
            raise OperationFailed(
                f"{self._doing}: the bytes given hash to {digest[:12]}…, not to the sha256 {self._expected[:12]}… "
                "they were announced with; nothing was stored"
            )
        store = self._store
        with store._s3(self._doing):
            if self._upload_id is None:
                # Smaller than one part: one PUT, whose SHA-256 S3 checks against the whole file.
                body = bytes(memoryview(self._part)[: self._filled]) if self._part is not None else b""
                store.client.put_object(
                    Bucket=store.bucket,
                    Key=self._key,
                    Body=body,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode(),
                    **store._object_parameters("application/octet-stream", self._expected),
                )
                return
            store.client.complete_multipart_upload(
                Bucket=store.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": [self._parts[n] for n in sorted(self._parts)]},
            )
            stored = store.client.head_object(Bucket=store.bucket, Key=self._key)["ContentLength"]
        if stored != self._size:
            raise OffsiteCorrupt(f"{self._doing}: S3 assembled {stored} bytes from the {self._size} sent")

    def abort(self) -> None:
        """Best effort, never raising (it runs while another error propagates): what a dead endpoint
        keeps, ``discard`` or the bucket's lifecycle rule for incomplete uploads removes later."""
        if self.closed:
            return
        self._failure = self._failure or OperationFailed(f"{self._doing}: aborted")
        self._wait_for_parts()
        if self._upload_id is not None:
            try:
                self._client.abort_multipart_upload(Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id)
            except (ClientError, BotoCoreError) as exc:
                log.warning("%s: %s", self._doing, self._store.explain(exc, "aborting the upload"))
        self._stop()
        super().close()

    def _stop(self) -> None:
        self._pool.shutdown(wait=True)
        if self._part is not None:
            self._buffers.give_back(self._part)
            self._part = None
        self._buffers.leave()

    def __del__(self) -> None:
        # io's finalizer would close(), which completes: an upload nobody closed is unfinished,
        # so it stays an incomplete multipart upload that discard() removes.
        if not self.closed:
            self._pool.shutdown(wait=False)


class _PartBody(io.RawIOBase):
    """A part as a file, not bytes: http.client sends bytes in one ``sendall()``, which Python
    bounds by the socket timeout as a whole (measured: 16 MiB to a 1.3 MB/s reader fails after the
    2 s timeout while bytes flow), so a slow uplink would fail every part; a file goes out block by
    block, each block bounded on its own. No copy: it reads the part's buffer in place. Its
    SHA-256 is hashed once, for the part's checksum and for its signature (``_PartSigner``)."""

    def __init__(self, view: memoryview):
        self._view = view
        self._position = 0
        self.sha256 = hashlib.sha256(view).digest()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), len(self._view) - self._position)
        buffer[:count] = self._view[self._position : self._position + count]
        self._position += count
        return count

    def read(self, size: int = -1) -> memoryview:
        # A view, not a copy: botocore hashes the part and http.client sends it block by block, each
        # used at once, and a copy per block kept ~12 MB more resident across the sending threads.
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._position + size)
        block = self._view[self._position : end]
        self._position = max(self._position, end)
        return block

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


class _PartSigner(botocore.auth.S3SigV4Auth):
    """S3's SigV4 signer, with a part's payload hash taken from the part. Without TLS botocore
    signs every body's SHA-256 (and must: an S3-compatible store may refuse an unsigned one over
    http), so it read and hashed each part again right after the part was hashed for its
    x-amz-checksum-sha256: the same digest, hex instead of base64. The signature is the same;
    everything else, https's unsigned streaming bodies included, is botocore's."""

    def payload(self, request):
        body = request.body
        if (
            isinstance(body, _PartBody)
            and body.tell() == 0  # botocore hashes from where the body stands
            and not self._is_streaming_checksum_payload(request)
            and self._should_sha256_sign_payload(request)
        ):
            return body.sha256.hex()
        return super().payload(request)


_PART_SIGNER = "trusca-s3v4-part"
botocore.auth.AUTH_TYPE_MAPS.setdefault(_PART_SIGNER, _PartSigner)


def _choose_part_signer(**kwargs):
    """UploadPart's signer: botocore's choice (its own choose-signer handler, which this more
    specific one runs before and stands in for), with ours for its S3 SigV4."""
    chosen = botocore.handlers.set_operation_specific_signer(**kwargs)
    return _PART_SIGNER if chosen == "s3v4" else chosen


class _RangedReader(io.RawIOBase):
    """The object in ranged GETs of ``read_chunk`` bytes, READ_AHEAD of them in flight while the
    reader consumes another, all pinned to the ETag seen when it was opened (a replaced object fails
    instead of mixing two), into buffers made once."""

    def __init__(self, store: S3Store, key: str, doing: str, *, size: int, etag: str, sha256: str | None):
        self._store = store
        self._key = key
        self._doing = doing
        self._size = size
        self._etag = etag
        self._expected = sha256
        self._hash = hashlib.sha256()
        self._received = 0
        self._next_offset = 0
        self._pending: collections.deque[Future] = collections.deque()
        self._buffers = _Buffers(READ_AHEAD * store.read_chunk)
        self._chunk: bytearray | None = None
        self._current = memoryview(b"")
        self._position = 0  # in _current
        self._failure: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="trusca-s3-get")
        for _ in range(READ_AHEAD):
            self._schedule()

    def readable(self) -> bool:
        return True

    def _schedule(self) -> None:
        if self._next_offset >= self._size:
            return
        start = self._next_offset
        end = min(start + self._store.read_chunk, self._size)
        self._next_offset = end
        buffer = self._buffers.take(self._store.read_chunk)
        self._pending.append(self._pool.submit(self._fetch, start, end, buffer))

    def _fetch(self, start: int, end: int, buffer: bytearray) -> bytearray:
        view = memoryview(buffer)

        def into_buffer(offset: int, data: bytes) -> None:
            view[offset - start : offset - start + len(data)] = data

        _get_range(self._store, self._key, self._etag, (start, end, self._size), self._doing, into_buffer)
        return buffer

    def readinto(self, buffer) -> int:
        if self._failure is not None:
            raise self._failure  # a caller that reads on after an error gets no bytes from past a gap
        while self._position >= len(self._current):
            try:
                self._next_chunk()
                if self._chunk is None:
                    self._finish()
                    return 0
            except OperationFailed as exc:
                self._failure = exc
                raise
        count = min(len(buffer), len(self._current) - self._position)
        buffer[:count] = self._current[self._position : self._position + count]
        self._position += count
        return count

    def _next_chunk(self) -> None:
        if self._chunk is not None:
            self._current.release()
            self._buffers.give_back(self._chunk)
            self._current, self._chunk = memoryview(b""), None
            self._schedule()
        if not self._pending:
            return
        start = self._received
        try:
            chunk = self._pending.popleft().result()
        except (ClientError, BotoCoreError) as exc:
            raise _read_error(self._store, exc, self._doing) from exc
        length = min(self._store.read_chunk, self._size - start)
        self._chunk, self._current, self._position = chunk, memoryview(chunk)[:length], 0
        self._hash.update(self._current)
        self._received += length

    def _finish(self) -> None:
        if self._received != self._size:
            raise OffsiteCorrupt(f"{self._doing}: {self._received} bytes came back, not {self._size}")
        _check_sha256(self._doing, self._hash, self._expected)

    def close(self) -> None:
        if not self.closed:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()
            self._current.release()
            self._current, self._chunk = memoryview(b""), None
        super().close()


class _Download:
    """One object into a file: ranges fetched on DOWNLOADERS threads, written where they belong as
    they arrive, hashed in order behind them (see S3Store.download)."""

    def __init__(self, store: S3Store, key: str, doing: str, fd: int, *, size: int, etag: str, sha256: str | None):
        self._store = store
        self._key = key
        self._doing = doing
        self._fd = fd
        self._size = size
        self._etag = etag
        self._expected = sha256
        step = store.download_range
        self._ranges = [(start, min(start + step, size)) for start in range(0, size, step)]
        self._stop = threading.Event()

    def _fetch(self, start: int, end: int) -> None:
        def into_file(offset: int, data: bytes) -> None:
            diskio.pwrite_all(self._fd, data, offset)

        _get_range(self._store, self._key, self._etag, (start, end, self._size), self._doing, into_file, self._stop)

    def run(self, progress) -> None:
        digest = hashlib.sha256()
        view = memoryview(bytearray(MiB))
        pool = ThreadPoolExecutor(max_workers=DOWNLOADERS, thread_name_prefix="trusca-s3-get")
        try:
            # All submitted at once: the pool runs DOWNLOADERS of them at a time, in order.
            fetching = [pool.submit(self._fetch, start, end) for start, end in self._ranges]
            for (start, end), fetched in zip(self._ranges, fetching, strict=True):
                try:
                    fetched.result()
                except (ClientError, BotoCoreError) as exc:
                    raise _read_error(self._store, exc, self._doing) from exc
                position = start
                while position < end:
                    count = os.preadv(self._fd, [view[: min(MiB, end - position)]], position)
                    if not count:
                        raise OffsiteCorrupt(f"{self._doing}: the file being written was cut short by something else")
                    digest.update(view[:count])
                    position += count
                    progress(count)
        finally:
            self._stop.set()  # the other ranges stop at their next MiB
            pool.shutdown(wait=True, cancel_futures=True)
        _check_sha256(self._doing, digest, self._expected)


def _get_range(store: S3Store, key: str, etag: str, span: tuple[int, int, int], doing: str, sink, stop=None) -> None:
    """Bytes ``start``..``end - 1`` of an object of ``size`` bytes, pinned to ``etag`` (a replaced
    object fails instead of mixing two), handed to ``sink(offset, data)`` a MiB at a time as they
    arrive. A body that breaks off half-way is asked again from where it stopped; botocore retries
    each request itself. ``stop`` set: return at the next MiB."""
    start, end, size = span
    offset = start
    for attempt in range(1, ATTEMPTS + 1):
        whole = offset == 0 and end == size
        args = {"Bucket": store.bucket, "Key": key, "IfMatch": etag}
        if not whole:
            args["Range"] = f"bytes={offset}-{end - 1}"
        response = store.client.get_object(**args)
        with contextlib.closing(response["Body"]) as body:
            if not whole and response["ResponseMetadata"]["HTTPStatusCode"] != 206:
                raise OffsiteError(f"{doing}: the store ignored a Range request; it cannot be read in chunks")
            try:
                while offset < end:
                    if stop is not None and stop.is_set():
                        return
                    data = body.read(min(MiB, end - offset))
                    if not data:
                        break
                    sink(offset, data)
                    offset += len(data)
            except _STREAM_ERRORS:
                if attempt == ATTEMPTS:
                    raise
                continue
            if offset != end or body.read(1):
                raise OffsiteCorrupt(f"{doing}: bytes {start}-{end - 1} did not come back whole")
            return


def _read_error(store: S3Store, exc: ClientError | BotoCoreError, doing: str) -> OffsiteError:
    if _code(exc) in ("PreconditionFailed", "412"):
        return OffsiteCorrupt(f"{doing}: the object was replaced in the bucket while being read")
    return store.explain(exc, doing)


def _check_sha256(doing: str, digest, expected: str | None) -> None:
    if expected is not None and digest.hexdigest() != expected:
        raise OffsiteCorrupt(
            f"{doing}: the object's bytes do not match the sha256 recorded with it "
            f"({digest.hexdigest()[:12]}… instead of {expected[:12]}…); the copy in the bucket is damaged"
        )
