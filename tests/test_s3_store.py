"""The S3 store against a real S3 HTTP endpoint on loopback (moto's server, credentials checked)."""

import base64
import contextlib
import gc
import hashlib
import os
import random
import runpy
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured

from trusca.backups import manifest
from trusca.backups.errors import NotFound, OperationFailed
from trusca.backups.naming import parse_name
from trusca.backups.store.s3 import (
    IN_FLIGHT_BYTES,
    OffsiteCorrupt,
    OffsiteError,
    OffsiteUnavailable,
    S3Store,
    configured,
)

pytest_plugins = ["tests.s3server"]  # the s3 and s3_server fixtures

MiB = 1024 * 1024
DATA = random.Random(9).randbytes(20 * MiB)
NAME = "auto-20260102T030405Z"
DUMP, ARCHIVE, MANIFEST = "postgres.sql.gz", "workspace.tar.gz", "manifest.json"


def small_parts(**kwargs) -> S3Store:
    """The configured store, with S3's smallest parts so that a few MiB make a multipart upload."""
    base = configured()
    options = {
        "bucket": base.bucket,
        "prefix": base.prefix,
        "endpoint_url": base.endpoint_url,
        "region": base.region,
        "storage_class": base.storage_class,
        "part_size": 5 * MiB,
        "read_chunk": 5 * MiB,
        **kwargs,
    }
    return S3Store(**options)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(store: S3Store, name: str, member: str, data: bytes, *, announce: str | None = "") -> None:
    with store.open_write(name, member, sha256=sha(data) if announce == "" else announce) as upload:
        for start in range(0, len(data), MiB):
            upload.write(data[start : start + MiB])


def manifest_bytes(files: dict[str, bytes], *, when: datetime = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) -> bytes:
    entries = {member: manifest.FileEntry(size=len(data), sha256=sha(data)) for member, data in files.items()}
    return manifest.Manifest(
        timestamp=when,
        kind="auto",
        engine="postgresql",
        db_revision="0123456789ab",
        migrations={"backups": "0001_initial"},
        db_size=1,
        workspace_path="/srv/workspace",
        app_version="test",
        files=entries,
    ).to_json()


def backup(store: S3Store, name: str = NAME, files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = files if files is not None else {DUMP: DATA[: 2 * MiB], ARCHIVE: b"workspace bytes"}
    for member, data in files.items():
        write(store, name, member, data)
    store.publish(name, manifest_bytes(files, when=parse_name(name).timestamp))
    return files


def keys(s3, prefix: str = "") -> dict[str, dict]:
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o for o in listed}


def uploads(s3) -> list[dict]:
    return s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])


def read_all(store: S3Store, name: str, member: str) -> bytes:
    with store.open_read(name, member) as stream:
        return stream.read()


# Transfers -------------------------------------------------------------------------------------


def test_a_member_of_several_parts_round_trips_with_its_parts_in_flight_together(s3):
    store = small_parts()
    together = threading.Barrier(2, timeout=10)
    seen = []

    signers = []

    def part_sent(request, **_):
        body = request.body.read()
        request.body.seek(0)
        seen.append((request.headers["x-amz-checksum-sha256"], request.headers["x-amz-content-sha256"], body))
        if len(seen) <= 2:  # the first two parts must be on the wire at the same time
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait()

    store.client.meta.events.register("before-send.s3.UploadPart", part_sent)
    store.client.meta.events.register(
        "before-sign.s3.UploadPart", lambda signature_version, **_: signers.append(signature_version)
    )
    write(store, NAME, DUMP, DATA)
    assert not together.broken, "the second part was not sent before the first one finished"
    store.publish(NAME, manifest_bytes({DUMP: DATA}))

    head = s3.client().head_object(Bucket=s3.bucket, Key=f"backups/{NAME}/{DUMP}")
    assert head["ETag"].endswith('-4"') and len(seen) == 4
    # Each part went with its own SHA-256, for S3 to check on receipt, and the signature covers
    # that same SHA-256 (http: the body is signed), hashed once by us and not again by botocore.
    assert [base64.b64decode(checksum) for checksum, _, _ in seen] == [hashlib.sha256(b).digest() for *_, b in seen]
    assert [signed.decode() for _, signed, _ in seen] == [sha(body) for *_, body in seen]
    assert signers == ["trusca-s3v4-part"] * 4
    assert read_all(store, NAME, DUMP) == DATA


def test_uploads_at_once_share_their_stores_part_buffers_and_give_them_up_after(s3):
    store = small_parts()
    buffers = store.part_buffers
    made = []
    take = buffers.take

    def counted(size: int) -> bytearray:
        buffer = take(size)
        made.append(buffers._made)
        return buffer

    buffers.take = counted
    files = {DUMP: DATA, ARCHIVE: DATA[::-1]}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda member: write(store, NAME, member, files[member]), files))
    assert len(made) >= 8
    assert max(made) <= IN_FLIGHT_BYTES + 5 * MiB, "two uploads hold what one may"
    assert buffers._made == 0, "nothing kept once no upload is in progress"
    store.publish(NAME, manifest_bytes(files))
    assert all(read_all(store, NAME, member) == data for member, data in files.items())


def test_every_object_carries_the_storage_class_and_the_files_sha256(s3):
    store = small_parts()
    files = backup(store, files={DUMP: DATA[: 6 * MiB], ARCHIVE: b"workspace bytes"})  # a multipart, a PUT
    listed = keys(s3, f"backups/{NAME}/")
    assert sorted(listed) == [f"backups/{NAME}/{m}" for m in (MANIFEST, DUMP, ARCHIVE)]
    assert {o["StorageClass"] for o in listed.values()} == {"STANDARD_IA"}
    for member, data in files.items():
        head = s3.client().head_object(Bucket=s3.bucket, Key=f"backups/{NAME}/{member}", ChecksumMode="ENABLED")
        assert head["Metadata"] == {"sha256": sha(data)}
        assert head["ChecksumSHA256"]  # every part went with its SHA-256
    # Smaller than one part: one PUT whose checksum is the file's own sha256, which S3 checks whole.
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"backups/{NAME}/{ARCHIVE}", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(files[ARCHIVE]).digest()).decode()


@pytest.mark.parametrize(("setting", "stored"), [("ONEZONE_IA", "ONEZONE_IA"), ("", "STANDARD")])
def test_the_storage_class_follows_the_setting_and_can_be_left_out(s3, settings, setting, stored):
    settings.BACKUP_S3_STORAGE_CLASS = setting
    backup(small_parts())
    assert {o["StorageClass"] for o in keys(s3).values()} == {stored}


def test_the_prefix_holds_every_key_and_another_prefix_sees_nothing(s3, settings):
    settings.BACKUP_S3_PREFIX = "site-a/trusca/"
    backup(small_parts())
    assert keys(s3) and all(k.startswith(f"site-a/trusca/{NAME}/") for k in keys(s3))
    settings.BACKUP_S3_PREFIX = "site-b/"
    assert small_parts().list() == []
    settings.BACKUP_S3_PREFIX = ""
    assert small_parts().list() == []  # "site-a/" is not a backup name


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], id="one-bit-flipped"),
        pytest.param(lambda d: d[:-1], id="truncated"),
        pytest.param(lambda d: d + b"\0", id="extended"),
    ],
)
def test_a_damaged_object_is_refused_at_the_end_of_the_file(s3, damage):
    store = small_parts(read_chunk=MiB)
    files = backup(store)
    key = f"backups/{NAME}/{DUMP}"
    damaged = damage(files[DUMP])
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=damaged, Metadata={"sha256": sha(files[DUMP])})

    with store.open_read(NAME, DUMP) as stream:
        assert stream.read(len(damaged) - 1) == damaged[:-1]  # bytes flow until the end...
        with pytest.raises(OffsiteCorrupt, match="do not match the sha256 recorded with it"):
            stream.read()  # ...where the sha256 is checked
        with pytest.raises(OffsiteCorrupt):
            stream.read()  # and asking again is no quiet end of file


def test_an_object_replaced_while_being_read_is_refused(s3):
    store = small_parts(read_chunk=MiB)
    files = backup(store, files={DUMP: DATA[: 6 * MiB]})  # more chunks than are fetched ahead
    with store.open_read(NAME, DUMP) as stream:
        assert stream.read(MiB) == files[DUMP][:MiB]
        s3.client().put_object(Bucket=s3.bucket, Key=f"backups/{NAME}/{DUMP}", Body=b"x" * len(files[DUMP]))
        with pytest.raises(OffsiteCorrupt, match="replaced in the bucket while being read"):
            stream.read()
        with pytest.raises(OffsiteCorrupt):
            stream.read()  # never the bytes after the gap


def test_a_copy_made_by_hand_without_our_metadata_is_listed_and_read(s3):
    # The manual's `aws s3 sync` of a backup directory: no sha256 metadata, nothing to check at
    # the end of the file (the manifest's checksums still are, by whoever restores).
    files = {DUMP: DATA[: 7 * MiB], ARCHIVE: b"ws"}
    for member, data in {**files, MANIFEST: manifest_bytes(files)}.items():
        s3.client().put_object(Bucket=s3.bucket, Key=f"backups/{NAME}/{member}", Body=data)
    store = small_parts()
    assert [b.name for b in store.list()] == [NAME]
    assert read_all(store, NAME, DUMP) == files[DUMP]


def download(store: S3Store, member: str, path, *, max_size: int) -> list[int]:
    heard: list[int] = []
    with open(path, "x+b") as out:
        store.download(NAME, member, out, max_size=max_size, progress=heard.append)
    return heard


def test_a_download_fetches_ranges_together_into_the_file_and_hears_every_byte(s3, tmp_path):
    store = small_parts(download_range=MiB)
    data = DATA[: 7 * MiB + 5]
    backup(store, files={DUMP: data})
    together = threading.Barrier(2, timeout=10)
    asked = []

    def range_sent(request, **_):
        asked.append(request.headers["Range"].decode())
        if len(asked) <= 2:  # the first two ranges must be on the wire at the same time
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait()

    store.client.meta.events.register("before-send.s3.GetObject", range_sent)
    heard = download(store, DUMP, tmp_path / DUMP, max_size=len(data))
    assert not together.broken, "the second range was not asked for before the first one arrived"
    assert (tmp_path / DUMP).read_bytes() == data
    assert sum(heard) == len(data)
    assert sorted(asked) == sorted(f"bytes={n * MiB}-{min((n + 1) * MiB, len(data)) - 1}" for n in range(8))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "do not match the sha256", id="flipped"),
        pytest.param(lambda d: d[: 3 * MiB] + d[3 * MiB + 1 :], "do not match the sha256", id="truncated"),
        pytest.param(lambda d: d + b"\0", "larger than its manifest records", id="extended"),
    ],
)
def test_a_damaged_object_is_refused_by_a_download(s3, tmp_path, damage, message):
    store = small_parts(download_range=MiB)
    files = backup(store, files={DUMP: DATA[: 5 * MiB]})
    damaged = damage(files[DUMP])
    key = f"backups/{NAME}/{DUMP}"
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=damaged, Metadata={"sha256": sha(files[DUMP])})
    with pytest.raises(OffsiteCorrupt, match=message):
        download(store, DUMP, tmp_path / DUMP, max_size=len(files[DUMP]))
    if len(damaged) > len(files[DUMP]):
        assert (tmp_path / DUMP).stat().st_size == 0  # refused before its first byte


def test_an_object_replaced_while_being_downloaded_is_refused(s3, tmp_path):
    store = small_parts(download_range=MiB)
    files = backup(store, files={DUMP: DATA[: 6 * MiB]})
    key = f"backups/{NAME}/{DUMP}"
    replaced = []

    def replace_once(**_):
        if not replaced:
            replaced.append(True)
            s3.client().put_object(Bucket=s3.bucket, Key=key, Body=b"x" * len(files[DUMP]))

    store.client.meta.events.register("before-send.s3.GetObject", replace_once)
    with pytest.raises(OffsiteCorrupt, match="replaced in the bucket while being read"):
        download(store, DUMP, tmp_path / DUMP, max_size=len(files[DUMP]))


# Uploads that do not finish leave nothing ------------------------------------------------------


def test_an_exception_inside_the_upload_aborts_it_and_leaves_nothing(s3):
    store = small_parts()
    with pytest.raises(RuntimeError, match="the dump broke"), store.open_write(NAME, DUMP) as upload:
        upload.write(DATA[: 12 * MiB])  # two parts sent
        raise RuntimeError("the dump broke")
    assert uploads(s3) == [] and keys(s3) == {}


@pytest.mark.parametrize("size", [12 * MiB, 1000], ids=["multipart", "single-put"])
def test_bytes_that_differ_from_the_announced_sha256_are_never_stored(s3, size):
    store = small_parts()
    with pytest.raises(OperationFailed, match="nothing was stored"):
        write(store, NAME, DUMP, DATA[:size], announce=sha(b"something else"))
    assert uploads(s3) == [] and keys(s3) == {}


def test_a_part_refused_half_way_fails_the_upload_and_leaves_nothing(s3):
    store = small_parts()
    upload = store.open_write(NAME, DUMP)
    upload.write(DATA[: 6 * MiB])
    (pending,) = uploads(s3)  # someone (a lifecycle rule) aborts it behind our back
    s3.client().abort_multipart_upload(Bucket=s3.bucket, Key=pending["Key"], UploadId=pending["UploadId"])
    # S3 answers NoSuchUpload; moto, a 500.
    with pytest.raises(OffsiteError, match=f"while uploading {NAME}/{DUMP}"), upload:
        upload.write(DATA[6 * MiB :])
    assert uploads(s3) == [] and keys(s3) == {}


def test_an_upload_nobody_closed_is_never_completed_and_discard_removes_it(s3):
    store = small_parts()
    upload = store.open_write(NAME, DUMP)
    upload.write(DATA[: 6 * MiB])
    del upload
    gc.collect()
    assert keys(s3) == {}  # not completed by the garbage collector
    assert store.exists(NAME)
    store.discard(NAME)
    assert uploads(s3) == [] and not store.exists(NAME)


# Publishing, listing, deleting -----------------------------------------------------------------


def test_an_unpublished_backup_exists_but_is_not_listed_until_its_manifest_is_written(s3):
    store = small_parts()
    files = {DUMP: b"dump", ARCHIVE: b"archive"}
    for member, data in files.items():
        write(store, NAME, member, data)
    assert store.exists(NAME) and store.list() == []
    with pytest.raises(NotFound):
        store.open_read(NAME, DUMP)
    store.publish(NAME, manifest_bytes(files))
    (listed,) = store.list()
    assert (listed.name, listed.kind, listed.error) == (NAME, "auto", "")
    assert listed.manifest.files[DUMP].sha256 == sha(b"dump")
    assert listed.size == sum(o["Size"] for o in keys(s3).values())


def test_discard_removes_an_unpublished_backup_but_never_a_published_one(s3):
    store = small_parts()
    write(store, "auto-20260101T000000Z", DUMP, b"half a backup")
    backup(store)
    store.discard("auto-20260101T000000Z")
    store.discard(NAME)
    assert not store.exists("auto-20260101T000000Z")
    assert [b.name for b in store.list()] == [NAME]


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ({DUMP: b"dump"}, f"{ARCHIVE} is missing"),
        ({DUMP: b"dump", ARCHIVE: b"short"}, "holds 5 bytes, its manifest says 7"),
        ({DUMP: b"dump", ARCHIVE: b"ARCHIVE"}, "another sha256 than its manifest's"),
    ],
)
def test_publish_refuses_a_backup_whose_files_are_not_the_ones_its_manifest_lists(s3, stored, message):
    store = small_parts()
    for member, data in stored.items():
        write(store, NAME, member, data)
    with pytest.raises(OperationFailed, match=message):
        store.publish(NAME, manifest_bytes({DUMP: b"dump", ARCHIVE: b"archive"}))
    assert store.list() == [] and f"backups/{NAME}/{MANIFEST}" not in keys(s3)


def test_a_published_backup_is_never_written_again(s3):
    store = small_parts()
    files = backup(store)
    with pytest.raises(OperationFailed, match="already exists"):
        store.open_write(NAME, DUMP)
    with pytest.raises(OperationFailed, match="already exists"):
        store.publish(NAME, manifest_bytes(files))
    assert read_all(store, NAME, ARCHIVE) == files[ARCHIVE]


def test_a_bad_manifest_is_listed_with_its_error_and_the_others_still_list(s3):
    store = small_parts()
    backup(store, "2026-01-01-000000", {DUMP: b"old"})
    backup(store, "manual-20260103T000000Z", {DUMP: b"new"})
    put = s3.client().put_object
    put(Bucket=s3.bucket, Key=f"backups/auto-20260102T000000Z/{MANIFEST}", Body=b"{not json")
    put(
        Bucket=s3.bucket,
        Key=f"backups/uploaded-20260102T120000Z/{MANIFEST}",
        Body=b" " * (manifest.MAX_MANIFEST_BYTES + 1),
    )
    # Not backups of ours: ignored.
    for key in ("backups/notes.txt", "backups/elsewhere/manifest.json", "backups/auto-2026/manifest.json"):
        put(Bucket=s3.bucket, Key=key, Body=b"{}")

    listed = {b.name: b for b in store.list()}
    assert list(listed) == [
        "2026-01-01-000000",
        "auto-20260102T000000Z",
        "uploaded-20260102T120000Z",
        "manual-20260103T000000Z",
    ]
    bad, huge = listed["auto-20260102T000000Z"], listed["uploaded-20260102T120000Z"]
    assert bad.manifest is None and "does not decode as JSON" in bad.error and bad.kind == "auto"
    assert huge.manifest is None and "larger than" in huge.error and huge.kind == "uploaded"
    assert listed["2026-01-01-000000"].manifest is not None and listed["2026-01-01-000000"].error == ""


def test_delete_removes_the_manifest_first_then_everything_else(s3):
    store = small_parts()
    backup(store)
    write(store, "manual-20260101T000000Z", DUMP, b"another backup's")
    s3.client().create_multipart_upload(Bucket=s3.bucket, Key=f"backups/{NAME}/{DUMP}.gpg")  # left by a crash
    deleted = []
    store.client.meta.events.register(
        "before-parameter-build.s3.*", lambda model, params, **_: deleted.append((model.name, params.get("Key")))
    )
    store.delete(NAME)
    assert deleted[0] == ("DeleteObject", f"backups/{NAME}/{MANIFEST}")
    assert list(keys(s3)) == ["backups/manual-20260101T000000Z/postgres.sql.gz"]
    assert uploads(s3) == [] and not store.exists(NAME)


@pytest.mark.parametrize("name", ["../x", "auto/x", "", ".hidden", "x" * 200, "b.tar.gz"])
def test_a_name_that_is_not_a_backup_name_is_refused(s3, name):
    store = small_parts()
    for call in (lambda: store.open_write(name, DUMP), lambda: store.open_read(name, DUMP), lambda: store.delete(name)):
        with pytest.raises(NotFound):
            call()


def test_a_member_a_backup_never_holds_is_refused(s3):
    with pytest.raises(NotFound):
        small_parts().open_write(NAME, "../../elsewhere")


# Errors an operator reads ----------------------------------------------------------------------


def failure(call) -> tuple[OperationFailed, float]:
    started = time.monotonic()
    with pytest.raises(OperationFailed) as caught:
        call()
    return caught.value, time.monotonic() - started


def everything_said(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize(
    ("variable", "value", "code"),
    [
        ("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789abcdefghijklmnopqrstu", "SignatureDoesNotMatch"),
        ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000", "InvalidAccessKeyId"),
    ],
)
def test_refused_credentials_give_one_line_without_the_secret(s3, monkeypatch, variable, value, code):
    monkeypatch.setenv(variable, value)
    exc, seconds = failure(lambda: small_parts().list())
    assert isinstance(exc, OffsiteUnavailable)
    assert str(exc) == (
        f"S3 refused the credentials for bucket {s3.bucket} ({code}): check the AWS credentials the portal runs with"
    )
    said = everything_said(exc)
    assert s3.portal.secret_key not in said and os.environ["AWS_SECRET_ACCESS_KEY"] not in said
    assert seconds < 5


def test_no_credentials_at_all_is_said_so(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    exc, seconds = failure(lambda: small_parts().list())
    assert str(exc).startswith(f"no AWS credentials were found for bucket {s3.bucket} while listing the backups:")
    assert seconds < 5


def test_credentials_without_the_rights_are_told_access_denied(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.lister.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.lister.secret_key)
    exc, _ = failure(lambda: write(small_parts(), NAME, DUMP, b"dump"))
    assert str(exc) == (
        f"S3 denied access to bucket {s3.bucket} while uploading {NAME}/{DUMP} (AccessDenied): grant the portal's "
        "credentials the permissions of the README's IAM policy"
    )
    assert s3.lister.secret_key not in everything_said(exc)


@pytest.mark.parametrize("call", ["list", "open_read", "exists", "publish"])
def test_a_missing_bucket_is_named_whatever_the_call(s3, settings, call):
    settings.BACKUP_S3_BUCKET = "trusca-no-such-bucket"
    store = small_parts()
    calls = {
        "list": store.list,
        "open_read": lambda: store.open_read(NAME, DUMP),  # a HEAD's 404 is not taken for a missing backup
        "exists": lambda: store.exists(NAME),
        "publish": lambda: store.publish(NAME, manifest_bytes({DUMP: b""})),
    }
    exc, seconds = failure(calls[call])
    assert str(exc) == (
        f"bucket trusca-no-such-bucket does not exist at {s3.endpoint_url}: create it, or correct BACKUP_S3_BUCKET"
    )
    assert seconds < 5


def test_an_endpoint_that_refuses_connections_fails_within_seconds(s3, settings):
    settings.BACKUP_S3_ENDPOINT_URL = s3.unreachable_url()
    exc, seconds = failure(lambda: small_parts().list())
    assert str(exc) == (
        f"S3 at {settings.BACKUP_S3_ENDPOINT_URL} could not be reached while listing the backups "
        "(Connection refused): check the network and BACKUP_S3_ENDPOINT_URL"
    )
    assert isinstance(exc, OffsiteUnavailable) and seconds < 5


def test_an_endpoint_that_never_answers_fails_within_its_timeouts(s3, settings):
    silent = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept_and_say_nothing():
        silent.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(silent.accept()[0])

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        settings.BACKUP_S3_ENDPOINT_URL = f"http://127.0.0.1:{silent.getsockname()[1]}"
        exc, seconds = failure(lambda: small_parts(read_timeout=1).list())
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        silent.close()
    assert "could not be reached while listing the backups (no answer within 1 s)" in str(exc)
    assert len(held) == 3 and seconds < 10  # three attempts, then a clear error


# Settings --------------------------------------------------------------------------------------


def load_settings(monkeypatch, tmp_path, **env) -> dict:
    monkeypatch.setenv("TRUSCA_VAR_DIR", str(tmp_path / "var"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return runpy.run_path(str(django_settings.BASE_DIR / "trusca" / "settings.py"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BACKUP_S3_BUCKET": "my bucket"}, "BACKUP_S3_BUCKET is 'my bucket'; set it to a bucket name"),
        ({"BACKUP_S3_PREFIX": "/backups/"}, "BACKUP_S3_PREFIX is '/backups/'; set it to a key prefix"),
        ({"BACKUP_S3_PREFIX": "a/../../b/"}, "BACKUP_S3_PREFIX is 'a/../../b/'; set it to a key prefix"),
        ({"BACKUP_S3_ENDPOINT_URL": "ftp://minio:9000"}, "set BACKUP_S3_ENDPOINT_URL to an http:// or https:// URL"),
        ({"BACKUP_S3_REGION": "EU West"}, "BACKUP_S3_REGION is 'EU West'; set it to a region name"),
        ({"BACKUP_S3_STORAGE_CLASS": "GLACIER"}, "BACKUP_S3_STORAGE_CLASS is 'GLACIER'; set it to STANDARD,"),
        ({"BACKUP_S3_RETENTION_DAYS": "0"}, "BACKUP_S3_RETENTION_DAYS is 0; set it to a whole number from 1 to 36500"),
    ],
)
def test_a_bad_s3_setting_is_refused_naming_the_variable(monkeypatch, tmp_path, env, message):
    with pytest.raises(ImproperlyConfigured, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_settings(monkeypatch, tmp_path, **env)


def test_an_endpoint_url_holding_credentials_is_refused_without_repeating_them(monkeypatch, tmp_path):
    with pytest.raises(ImproperlyConfigured) as caught:
        load_settings(monkeypatch, tmp_path, BACKUP_S3_ENDPOINT_URL="https://admin:hunter2-secret@minio:9000")
    assert "hunter2-secret" not in str(caught.value)


def test_the_s3_settings_default_to_no_copy_and_read_from_files(monkeypatch, tmp_path):
    values = load_settings(monkeypatch, tmp_path, BACKUP_RETENTION_DAYS="9")
    assert (values["BACKUP_S3_BUCKET"], values["BACKUP_S3_PREFIX"], values["BACKUP_S3_STORAGE_CLASS"]) == (
        "",
        "backups/",
        "STANDARD_IA",
    )
    assert values["BACKUP_S3_RETENTION_DAYS"] == 9
    bucket_file = tmp_path / "bucket"
    bucket_file.write_text("trusca-offsite\n")
    values = load_settings(monkeypatch, tmp_path, BACKUP_S3_BUCKET_FILE=str(bucket_file), BACKUP_S3_PREFIX="site")
    assert (values["BACKUP_S3_BUCKET"], values["BACKUP_S3_PREFIX"]) == ("trusca-offsite", "site/")


def test_no_bucket_means_no_s3_store(settings):
    settings.BACKUP_S3_BUCKET = ""
    assert configured() is None
