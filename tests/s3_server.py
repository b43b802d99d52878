"""A real S3-compatible server on loopback: moto in server mode, in its own process.

Clients reach it the way they would reach any S3 endpoint other than AWS: through
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the usual credential variables. The
variables from :meth:`S3Server.env` also shut every other source out (profiles, config files,
the EC2 metadata service), so nothing a test does can reach a real cloud.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun.chaos.processes import free_port

ACCESS_KEY = "testing"
# Distinctive, so a test can prove it never reaches a log or an output.
SECRET_KEY = "SECRETsecret123"
REGION = "us-east-1"

# Variables that could send a client elsewhere or to other credentials; removed.
_CLEARED = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "FSSPEC_S3", "FSSPEC_S3_ENDPOINT_URL",
)


@dataclass
class S3Server:
    """A running moto server; ``endpoint`` is its loopback URL."""

    endpoint: str
    log_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def env(self, *, secret: str = SECRET_KEY) -> dict[str, str]:
        """Variables that point the AWS SDKs (and s3fs) at this server and nothing else."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    @staticmethod
    def cleared() -> tuple[str, ...]:
        """Variables to remove from an environment that uses this server."""
        return _CLEARED

    def client(self) -> Any:
        """A boto3 S3 client of this server, independent of the code under test."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY)

    def new_bucket(self) -> str:
        name = f"spotrun-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``, as the server lists them."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def moto_server(log_dir: Path, timeout: float = 30) -> Iterator[S3Server]:
    """Start ``moto.server`` on 127.0.0.1 on a free port; stop it on exit."""
    port = free_port()
    log_path = log_dir / f"moto-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = S3Server(f"http://127.0.0.1:{port}", log_path, proc)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited {proc.returncode}:\n{server.log()}")
            try:
                server.client().list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
