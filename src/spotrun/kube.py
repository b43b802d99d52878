"""Scale-downs that spare busy workers: the pod-deletion-cost annotation, kept current.

When a Deployment's ReplicaSet is scaled down (by KEDA, an HPA or ``kubectl scale``),
Kubernetes deletes the pods with the lowest ``controller.kubernetes.io/pod-deletion-cost``
first. Each worker keeps that annotation on its own pod current: :data:`IDLE_COST` while it
runs nothing, and more the more work it would lose (seconds since each running job's last
checkpoint), so a scale-down takes idle workers first and a busy one only when no idle one
is left.

Inside a pod the worker finds the API server as client-go's in-cluster config does
(``KUBERNETES_SERVICE_HOST``/``PORT``, the service-account token and CA), and PATCHes only
its own pod. Outside Kubernetes there is nothing to do and nothing is said.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("spotrun.kube")

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
IDLE_COST = 0
# The API server rejects values outside int32.
MAX_COST = 2**31 - 1
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICEACCOUNT_DIR_VAR = "SPOTRUN_KUBERNETES_SERVICEACCOUNT_DIR"
POD_NAME_VAR = "SPOTRUN_POD_NAME"
POD_NAMESPACE_VAR = "SPOTRUN_POD_NAMESPACE"


def deletion_cost(unsaved_seconds: Sequence[float]) -> int:
    """The pod's deletion cost, given each running job's seconds since its last checkpoint.

    Idle is :data:`IDLE_COST`; any running job makes it at least one more, and each second
    of work that a deletion would make a job redo adds one.
    """
    if not unsaved_seconds:
        return IDLE_COST
    return min(MAX_COST, IDLE_COST + 1 + int(sum(max(0.0, s) for s in unsaved_seconds)))


class KubeError(Exception):
    """The API server refused or could not be reached; the message says which."""


@dataclass(frozen=True)
class InCluster:
    """Where this pod's API server is, who the pod is, and the credentials to use."""

    server: str  # https://HOST:PORT
    namespace: str
    pod: str
    token_path: Path
    ca_path: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InCluster | None:
        """The in-cluster config, or None outside Kubernetes (no service host or token)."""
        env = os.environ if environ is None else environ
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            return None
        sa = Path(env.get(SERVICEACCOUNT_DIR_VAR) or SERVICEACCOUNT_DIR)
        token, ca = sa / "token", sa / "ca.crt"
        if not token.is_file():
            return None  # automountServiceAccountToken: false; no credentials to patch with
        namespace = env.get(POD_NAMESPACE_VAR) or _read(sa / "namespace")
        # Kubernetes sets HOSTNAME to the pod's name unless the spec sets a hostname.
        pod = env.get(POD_NAME_VAR) or env.get("HOSTNAME") or ""
        if not namespace or not pod:
            return None
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 service address
        return cls(f"https://{host}:{port}", namespace, pod, token, ca)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class PodDeletionCost:
    """Sends this pod's deletion cost to the API server, rate-limited.

    Never more than one PATCH per ``min_interval`` seconds. A change between idle and busy
    goes out as soon as that allows (a scale-down may come at any moment); a change that
    only moves a busy worker's cost waits ``refresh_interval`` after the last PATCH, so a
    thousand busy workers cost the API server a few requests a second, not thousands.
    After a failure the next attempt waits, doubling up to five minutes.
    """

    def __init__(self, cluster: InCluster, *, min_interval: float = 2.0,
                 refresh_interval: float = 30.0, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.min_interval = min_interval
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.sent: int | None = None  # the value the API server holds, as far as we know
        self.patches = 0
        self._last_attempt: float | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._warned = False
        ctx = ssl.create_default_context(cafile=str(cluster.ca_path)) \
            if cluster.ca_path.is_file() else ssl.create_default_context()
        self._http = httpx.Client(verify=ctx, timeout=timeout, trust_env=False)

    @property
    def url(self) -> str:
        c = self.cluster
        return f"{c.server}/api/v1/namespaces/{c.namespace}/pods/{c.pod}"

    def due(self, cost: int) -> bool:
        """Whether ``cost`` would be sent now."""
        now = self.clock()
        if cost == self.sent or now < self._retry_at:
            return False
        if self._last_attempt is None or self.sent is None:
            return True
        since = now - self._last_attempt
        if since < self.min_interval:
            return False
        if (cost == IDLE_COST) != (self.sent == IDLE_COST):
            return True
        return since >= self.refresh_interval

    def update(self, cost: int) -> bool:
        """Send ``cost`` if it is due; True when the API server took it."""
        if not self.due(cost):
            return False
        self._last_attempt = self.clock()
        try:
            self._patch(cost)
        except KubeError as exc:
            self._backoff = min(300.0, max(self.min_interval, self._backoff * 2))
            self._retry_at = self.clock() + self._backoff
            if not self._warned:  # once until it works again: no log spam per tick
                log.warning("could not set %s on pod %s/%s: %s", ANNOTATION,
                            self.cluster.namespace, self.cluster.pod, exc)
                self._warned = True
            return False
        if self._warned:
            log.warning("pod %s/%s: %s set again", self.cluster.namespace, self.cluster.pod,
                        ANNOTATION)
        self._warned, self._backoff, self.sent = False, 0.0, cost
        self.patches += 1
        return True

    def _patch(self, cost: int) -> None:
        token = _read(self.cluster.token_path)  # re-read: bound tokens are rotated
        body = json.dumps({"metadata": {"annotations": {ANNOTATION: str(cost)}}})
        try:
            resp = self._http.patch(self.url, content=body, headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise KubeError(f"{self.cluster.server} unreachable ({exc})") from None
        if resp.status_code != 200:
            try:
                why = str(resp.json().get("message") or resp.reason_phrase)
            except ValueError:
                why = resp.reason_phrase
            raise KubeError(f"HTTP {resp.status_code}: {why}")

    def close(self) -> None:
        self._http.close()


class Keeper:
    """A thread that keeps the annotation current from ``compute()`` until stopped."""

    def __init__(self, cost: PodDeletionCost, compute: Callable[[], Sequence[float]],
                 tick: float = 0.5) -> None:
        self.cost = cost
        self._compute = compute
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spotrun-pod-cost",
                                        daemon=True)

    def start(self) -> Keeper:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            try:
                self.cost.update(deletion_cost(self._compute()))
            except Exception:  # never let a bookkeeping thread take the worker down
                log.exception("pod deletion cost")
            if self._stop.wait(self._tick):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.cost.close()


def keep_deletion_cost(unsaved_seconds: Callable[[], Sequence[float]],
                       environ: Mapping[str, str] | None = None) -> Keeper | None:
    """Start keeping this pod's deletion cost current; None (and silence) outside a pod."""
    cluster = InCluster.from_env(environ)
    if cluster is None:
        return None
    log.info("keeping %s on pod %s/%s current", ANNOTATION, cluster.namespace, cluster.pod)
    return Keeper(PodDeletionCost(cluster), unsaved_seconds).start()
