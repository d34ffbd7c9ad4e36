"""An S3 API server process on 127.0.0.1 for tests: moto's server (``moto[server]``).

Use the fixture from a test module (``tests/`` is on ``sys.path`` under pytest)::

    from s3_server import s3_server  # noqa: F401  (pytest fixture)

    def test_something(s3_server):  # noqa: F811
        server = s3_server.with_new_bucket()  # an empty bucket of this test's own
        server.client().put_object(Bucket=server.bucket, Key="k", Body=b"v")
        subprocess.run([...], env={**os.environ, **server.env()})

(a conftest could instead list ``pytest_plugins = ["s3_server"]``, sharing one server across
modules), or, without pytest, ``with moto_s3_server() as server: ...``. The process is started with a free
port, polled until it answers HTTP, and always terminated (then killed) on exit. Its request log goes
to a file, never to a pipe nobody reads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
ACCESS_KEY_ID = "hescape-test-key"
SECRET_ACCESS_KEY = "hescape-test-secret"  # moto accepts any credentials
REGION = "us-east-1"
DEFAULT_BUCKET = "hescape-test"


@dataclass(frozen=True)
class S3Server:
    """A running S3 API server and one bucket on it."""

    endpoint: str
    bucket: str
    access_key_id: str = ACCESS_KEY_ID
    secret_access_key: str = SECRET_ACCESS_KEY
    region: str = REGION
    log: Path | None = None

    def env(self) -> dict[str, str]:
        """Environment for a client process (DVC, boto3, the platform's HESCAPE_S3_* settings).

        Explicit keys take precedence over a developer's ``~/.aws`` credentials; ``NO_PROXY`` keeps
        127.0.0.1 off any proxy.
        """
        no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY"), HOST, "localhost") if x)
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "HESCAPE_S3_BUCKET": self.bucket,
            "HESCAPE_S3_ENDPOINT": self.endpoint,
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key, region_name=self.region)

    def url(self, prefix: str = "") -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{self.bucket}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(out)

    def with_new_bucket(self, name: str | None = None) -> S3Server:
        """Create another (by default uniquely named) bucket on the same server."""
        name = name or f"hescape-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return S3Server(self.endpoint, name, self.access_key_id, self.secret_access_key, self.region, self.log)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP response means the server is up
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def moto_s3_server(bucket: str = DEFAULT_BUCKET, *, log_dir: str | os.PathLike | None = None,
                   timeout: float = 60.0, attempts: int = 3) -> Iterator[S3Server]:
    """Start ``python -m moto.server`` on 127.0.0.1, wait until it answers, create ``bucket``, yield an
    :class:`S3Server`, and always stop the process."""
    own_dir = None
    if log_dir is None:
        own_dir = tempfile.TemporaryDirectory(prefix="moto-")
        log_dir = own_dir.name
    log_path = Path(log_dir) / "moto-server.log"
    env = {**os.environ, "NO_PROXY": f"{HOST},localhost", "no_proxy": f"{HOST},localhost"}
    proc = None
    try:
        for attempt in range(attempts):
            port = _free_port()
            endpoint = f"http://{HOST}:{port}"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline and not _answers(endpoint + "/"):
                time.sleep(0.1)
            if proc.poll() is None and _answers(endpoint + "/"):
                break
            _stop(proc)  # port taken between probe and bind, or too slow: try again
            if attempt == attempts - 1:
                raise RuntimeError(f"moto server did not answer on {endpoint} within {timeout:.0f} s:\n"
                                   f"{log_path.read_text(errors='replace')[-4000:]}")
        server = S3Server(endpoint=endpoint, bucket=bucket, log=log_path)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        if own_dir is not None:
            own_dir.cleanup()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the session, with bucket ``hescape-test``; call
    ``s3_server.with_new_bucket()`` for an empty bucket of a test's own."""
    with moto_s3_server(log_dir=tmp_path_factory.mktemp("moto")) as server:
        yield server
