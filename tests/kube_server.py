"""A local stand-in for the Kubernetes API server's pod PATCH, over real HTTPS on loopback.

It answers like the real one where spotrun depends on it: ``PATCH
/api/v1/namespaces/NS/pods/NAME`` with a bearer token, JSON merge patch (or strategic merge
patch) of the pod's metadata, 200 with the whole Pod, and ``Status`` objects for 401 (no or
unknown token), 403 (the token's service account may not patch that pod: each token here is
bound to one pod, as the RBAC and admission policy in deploy/ make it), 404 (no such pod),
415 (another content type) and 422 (a pod-deletion-cost that is not a 32-bit integer). The
server's certificate is signed by a CA of its own, which the client finds as ``ca.crt`` in
a service-account folder, as in a pod.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

COST = "controller.kubernetes.io/pod-deletion-cost"
_PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


@dataclass(frozen=True)
class Patch:
    """One PATCH the server accepted."""

    at: float  # time.monotonic() when it arrived
    pod: str
    cost: str | None


def make_ca_and_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt = folder / "server.key", folder / "server.csr", folder / "server.crt"
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca_crt), "-days", "2", "-subj", "/CN=kubernetes-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=kube-apiserver")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return ca_crt, crt, key


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_PATCH(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        code, answer = self.server.api.patch(
            urllib.parse.urlsplit(self.path).path, self.headers.get("Authorization", ""),
            self.headers.get("Content-Type", ""), body)
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeKubeAPI


class FakeKubeAPI:
    """Pods in one namespace, each with its own service-account token; a context manager."""

    def __init__(self, folder: Path, namespace: str = "spotrun") -> None:
        self.folder = folder
        self.namespace = namespace
        self.lock = threading.Lock()
        self.pods: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, str] = {}  # token -> the one pod it may patch
        self.patches: list[Patch] = []
        self.refused: list[int] = []
        self.ca, crt, key = make_ca_and_cert(folder)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.api = self
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(crt, key)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def add_pod(self, name: str) -> Path:
        """A pod, and the service-account folder its containers would see."""
        token = secrets.token_urlsafe(24)
        with self.lock:
            self.pods[name] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": self.namespace,
                             "uid": str(uuid.uuid4()), "resourceVersion": "1",
                             "labels": {"app.kubernetes.io/component": "worker"}},
                "spec": {"containers": [{"name": "worker", "image": "spotrun"}]},
                "status": {"phase": "Running"},
            }
            self.tokens[token] = name
        sa = self.folder / f"sa-{name}"
        sa.mkdir()
        (sa / "token").write_text(token)
        (sa / "namespace").write_text(self.namespace)
        (sa / "ca.crt").write_bytes(self.ca.read_bytes())
        return sa

    def env(self, pod: str, sa: Path) -> dict[str, str]:
        """What the kubelet would put in the environment of that pod's worker container."""
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(self.port),
                "SPOTRUN_KUBERNETES_SERVICEACCOUNT_DIR": str(sa),
                "SPOTRUN_POD_NAME": pod, "HOSTNAME": pod}

    def cost(self, pod: str) -> int | None:
        with self.lock:
            value = self.pods[pod]["metadata"].get("annotations", {}).get(COST)
        return None if value is None else int(value)

    def scale_down_order(self) -> list[str]:
        """The pods a ReplicaSet scale-down deletes first, first (all Running and Ready
        here, so the deletion cost decides; ties by name for a stable answer)."""
        with self.lock:
            names = list(self.pods)
        return sorted(names, key=lambda n: (self.cost(n) or 0, n))

    def patch(self, path: str, auth: str, ctype: str, body: bytes
              ) -> tuple[int, dict[str, Any]]:
        code, answer = self._patch(path, auth, ctype, body)
        if code != 200:
            with self.lock:
                self.refused.append(code)
        return code, answer

    def _patch(self, path: str, auth: str, ctype: str, body: bytes
               ) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if len(parts) != 6 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "pods":
            return 404, _status(404, "NotFound", "the server could not find the requested "
                                "resource")
        ns, name = parts[3], parts[5]
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        with self.lock:
            bound = self.tokens.get(token)
        if bound is None:
            return 401, _status(401, "Unauthorized", "Unauthorized")
        if ns != self.namespace or name != bound:
            return 403, _status(403, "Forbidden", f'pods "{name}" is forbidden: User '
                                f'"system:serviceaccount:{self.namespace}:spotrun" cannot '
                                f'patch resource "pods" in API group "" in the namespace '
                                f'"{ns}"')
        if ctype.split(";")[0].strip() not in _PATCH_TYPES:
            return 415, _status(415, "UnsupportedMediaType",
                                f'the body of the request was in an unknown format - '
                                f'accepted media types include: {", ".join(_PATCH_TYPES)}')
        try:
            patch = json.loads(body)
        except ValueError as exc:
            return 400, _status(400, "BadRequest", f"error decoding patch: {exc}")
        with self.lock:
            pod = self.pods.get(name)
            if pod is None:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            annotations = dict(pod["metadata"].get("annotations", {}))
            for k, v in (patch.get("metadata", {}).get("annotations") or {}).items():
                if v is None:
                    annotations.pop(k, None)
                else:
                    annotations[k] = v
            value = annotations.get(COST)
            if value is not None:
                try:
                    ok = isinstance(value, str) and -2**31 <= int(value) < 2**31
                except ValueError:
                    ok = False
                if not ok:
                    return 422, _status(422, "Invalid", f'Pod "{name}" is invalid: '
                                        f'metadata.annotations: Invalid value: "{value}": '
                                        "must be a 32bit integer")
            pod["metadata"]["annotations"] = annotations
            pod["metadata"]["resourceVersion"] = str(int(pod["metadata"]["resourceVersion"])
                                                     + 1)
            self.patches.append(Patch(time.monotonic(), name, value))
            return 200, json.loads(json.dumps(pod))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
