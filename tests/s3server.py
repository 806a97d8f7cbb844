"""A real S3 HTTP endpoint on loopback: moto's standalone server in a child process, with its IAM
authentication switched on, so that every request's signature and access key are checked as AWS
checks them (a wrong secret gets SignatureDoesNotMatch, an unknown key InvalidAccessKeyId, a key
without the right policy AccessDenied).

Use it from a test module::

    pytest_plugins = ["tests.s3server"]

    def test_it_copies(s3):  # s3.bucket is new and empty; settings and AWS_* env point at it
        store = trusca.backups.store.s3.configured()

``s3_server`` (session) starts the server once; ``s3`` (function) gives each test a bucket of its
own, sets BACKUP_S3_* settings and the AWS_* environment for boto3's credential chain (never a
developer's ~/.aws, never the instance metadata service), and empties the bucket afterwards.
``S3Server.env()`` is the same environment for a child process (manage.py, a worker).
``s3_least_privilege`` is ``s3`` with the credentials of a user holding exactly the IAM policy the
README gives operators, which moto enforces (actions and resource ARNs).
"""

import dataclasses
import json
import os
import re
import socket
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from trusca.backups import children

REGION = "us-east-1"
# Any key works before authentication is switched on; these only create the IAM users.
_BOOTSTRAP = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
_ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
_ALLOW_LISTING_ONLY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListAllMyBuckets"], "Resource": "*"}],
}
README = Path(__file__).resolve().parent.parent / "README.md"
# The README's policy names this bucket; the least-privilege user gets it for a bucket of its own.
README_BUCKET = "acme-trusca-backups"
LEAST_PRIVILEGE_BUCKET = "trusca-least-privilege"


def readme_iam_policy(bucket: str) -> dict:
    """The IAM policy of the README's "IAM policy: the least the portal needs", for ``bucket``."""
    text = README.read_text()
    section = text[text.index("### IAM policy: the least the portal needs") :]
    block = re.search(r"```json\n(.*?)```", section, re.DOTALL)
    return json.loads(block.group(1).replace(README_BUCKET, bucket))


@dataclasses.dataclass
class Credentials:
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


@dataclasses.dataclass
class S3Server:
    endpoint_url: str
    portal: Credentials  # allowed s3:* on everything
    lister: Credentials  # allowed to list, refused everything else
    least: Credentials  # the README's least-privilege policy, for LEAST_PRIVILEGE_BUCKET only
    process: object
    bucket: str = ""

    def client(self, credentials: Credentials | None = None):
        credentials = credentials or self.portal
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            config=Config(retries={"max_attempts": 1}),
        )

    def env(self, credentials: Credentials | None = None) -> dict[str, str]:
        """AWS_* and BACKUP_S3_* for a process that should use this endpoint and bucket."""
        return {
            **isolated_aws_env(),
            **(credentials or self.portal).env(),
            "BACKUP_S3_BUCKET": self.bucket,
            "BACKUP_S3_ENDPOINT_URL": self.endpoint_url,
            "BACKUP_S3_REGION": REGION,
        }

    @staticmethod
    def unreachable_url() -> str:
        """An endpoint that refuses connections at once (a loopback port nobody listens on): the
        endpoint "down" of a test; set BACKUP_S3_ENDPOINT_URL back to ``endpoint_url`` for "up"."""
        return f"http://127.0.0.1:{_free_port()}"

    def empty(self, bucket: str) -> None:
        client = self.client()
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def isolated_aws_env() -> dict[str, str]:
    # boto3 must find only the credentials a test gives it: no developer's shared files, no
    # profile, and no instance metadata service (an address outside this machine).
    return {
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": REGION,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_ready(url: str, proc, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):  # noqa: S310 - loopback
                return True
        except OSError:
            time.sleep(0.1)
    return False


def start(log: Path) -> S3Server:
    """Start the server on a free loopback port, create its IAM users, switch authentication on."""
    for _attempt in range(3):  # the free port may be taken between our probe and its bind
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **isolated_aws_env()}
        with open(log, "ab") as out:
            proc = children.spawn(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=out,
                env=env,
            )
        if _wait_until_ready(url, proc, time.monotonic() + 30):
            break
        children.kill(proc)
    else:
        raise RuntimeError(f"moto's S3 server did not start; see {log}")
    iam = boto3.client("iam", endpoint_url=url, region_name=REGION, **_BOOTSTRAP)
    portal = _user(iam, "trusca-portal", _ALLOW_S3)
    lister = _user(iam, "trusca-lister", _ALLOW_LISTING_ONLY)
    least = _user(iam, "trusca-least", _as_moto_names_it(readme_iam_policy(LEAST_PRIVILEGE_BUCKET)))
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - loopback
        pass
    return S3Server(endpoint_url=url, portal=portal, lister=lister, least=least, process=proc)


def _as_moto_names_it(policy: dict) -> dict:
    """The same rights in the terms moto checks, where they differ from AWS's (the S3 API
    reference): AWS authorizes HeadBucket with s3:ListBucket, moto asks for an "s3:HeadBucket"
    that IAM does not have; AWS authorizes DeleteObjects with s3:DeleteObject on each key, moto
    on the bucket's ARN. Every other request is checked as AWS checks it."""
    extra = []
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if "s3:ListBucket" in actions:
            statement["Action"] = [*actions, "s3:HeadBucket"]
        if "s3:DeleteObject" in actions:
            buckets = sorted({r.split("/", 1)[0] for r in resources})
            extra.append({"Effect": "Allow", "Action": "s3:DeleteObject", "Resource": buckets})
    policy["Statement"] += extra
    return policy


def _user(iam, name: str, policy: dict) -> Credentials:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return Credentials(key["AccessKeyId"], key["SecretAccessKey"])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("s3server") / "moto.log")
    yield server
    children.kill(server.process)


@pytest.fixture
def s3(s3_server, settings, monkeypatch):
    yield from _bucket(s3_server, f"trusca-test-{uuid.uuid4().hex[:12]}", s3_server.portal, settings, monkeypatch)


@pytest.fixture
def s3_least_privilege(s3_server, settings, monkeypatch):
    yield from _bucket(s3_server, LEAST_PRIVILEGE_BUCKET, s3_server.least, settings, monkeypatch)


def _bucket(s3_server: S3Server, bucket: str, credentials: Credentials, settings, monkeypatch):
    s3_server.client().create_bucket(Bucket=bucket)
    server = dataclasses.replace(s3_server, bucket=bucket)
    for key, value in server.env(credentials).items():
        monkeypatch.setenv(key, value)
    settings.BACKUP_S3_BUCKET = bucket
    settings.BACKUP_S3_ENDPOINT_URL = server.endpoint_url
    settings.BACKUP_S3_REGION = REGION
    yield server
    s3_server.empty(bucket)
    s3_server.client().delete_bucket(Bucket=bucket)
