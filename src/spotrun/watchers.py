"""Cloud preemption watchers (GCE, AWS, Azure) feeding the shutdown coordinator.

Each watcher asks its cloud's metadata service, on daemon threads, whether this machine is
about to go away, and hands the coordinator the notice with the deadline the service gave.
A watcher never breaks the worker: an unreachable or misbehaving service is logged once
per outage and retried with capped backoff, and nothing here raises into the caller after
:func:`start_from_env` has returned.

HTTP uses ``http.client`` directly, not ``urllib.request``: it reads no proxy settings (a
metadata service must never be asked through a proxy) and keeps the worker's start light.
Tokens are never logged.

Signals (SIGTERM, SIGINT) are always heard: the ``worker`` command installs their handlers
whatever SPOTRUN_PREEMPTION_SOURCES says, so ``signal`` in that list needs no watcher.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from spotrun.config import ConfigError
from spotrun.shutdown import ShutdownCoordinator

log = logging.getLogger("spotrun.watchers")

SOURCES_VAR = "SPOTRUN_PREEMPTION_SOURCES"
SOURCES = ("signal", "gce", "aws", "azure")
CLOUDS = ("gce", "aws", "azure")

GCE_HOST_VAR = "GCE_METADATA_HOST"
GCE_DEFAULT_HOST = "metadata.google.internal"
AWS_ENDPOINT_VAR = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
AWS_POLL_VAR = "SPOTRUN_AWS_POLL_SECONDS"
AWS_DEFAULT_ENDPOINT = "http://169.254.169.254"
AZURE_URL_VAR = "SPOTRUN_AZURE_METADATA_URL"
AZURE_POLL_VAR = "SPOTRUN_AZURE_POLL_SECONDS"
AZURE_VM_NAME_VAR = "SPOTRUN_AZURE_VM_NAME"
AZURE_DEFAULT_URL = "http://169.254.169.254"

DMI_DIR = Path("/sys/class/dmi/id")
# Azure sets this chassis asset tag on every VM; a local Hyper-V VM does not.
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"

MAX_BODY = 1 << 20  # metadata answers are small; never buffer more than this


# ----------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Endpoint:
    """Where a metadata service listens: scheme, host, port and a path prefix."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    @classmethod
    def parse(cls, url: str, variable: str) -> Endpoint:
        """Parse ``http://host[:port][/prefix]``; a bad value raises ConfigError naming
        ``variable``."""
        try:
            parts = urllib.parse.urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{variable}={url!r} is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{variable}={url!r} must look like http://HOST[:PORT]")
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default, parts.path.rstrip("/"))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read in full."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class ServiceError(Exception):
    """The service answered, but not as it should (a status or a body we cannot use)."""


# Failures that mean "try again later": the service is down, slow, or answered oddly.
RETRYABLE: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException,
                                              ServiceError, ValueError)


# ------------------------------------------------------------------- watchers


class Watcher:
    """Watches one cloud's metadata service on daemon threads and tells the coordinator.

    ``start()`` returns at once; ``stop()`` ends the threads, cutting any request in
    flight. Subclasses provide ``_loops()``: each loop's step makes one round of requests
    and returns the seconds to wait before the next round, or None when it is done (it
    gave its notice). A step that raises one of ``RETRYABLE`` is retried with backoff from
    ``retry_initial`` doubling up to ``retry_cap`` seconds.
    """

    source: ClassVar[str] = ""

    def __init__(self, coordinator: ShutdownCoordinator, endpoint: Endpoint, *,
                 connect_timeout: float = 2.0, retry_initial: float = 0.5,
                 retry_cap: float = 30.0) -> None:
        self.coordinator = coordinator
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.retry_initial = retry_initial
        self.retry_cap = retry_cap
        self.failures = 0  # failed rounds, all loops together (for tests and doctor)
        self.rounds = 0  # rounds that got a usable answer
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()
        self._down_since: float | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint}>"

    # ------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Start the watcher's daemon threads (once); returns self."""
        with self._lock:
            if self._threads:
                return self
            for name, step in self._loops():
                t = threading.Thread(target=self._run, args=(name, step),
                                     name=f"spotrun-watch-{name}", daemon=True)
                self._threads.append(t)
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the threads, cutting requests in flight; True if they all ended in time."""
        self._stopping.set()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            # shutdown() wakes a thread blocked in recv(); close() alone may not.
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        return not self.alive

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------- internals

    def _loops(self) -> list[tuple[str, Callable[[], float | None]]]:
        raise NotImplementedError

    def _run(self, name: str, step: Callable[[], float | None]) -> None:
        delay = self.retry_initial
        while not self._stopping.is_set():
            try:
                wait = step()
            except RETRYABLE as exc:
                if self._stopping.is_set():
                    return
                self._failed(_describe(exc))
                wait, delay = delay, min(delay * 2, self.retry_cap)
            except Exception as exc:
                # A bug of ours or a truly odd answer: keep watching all the same, since a
                # dead watcher would miss the notice.
                self._failed(f"unexpected {_describe(exc)}", exc_info=True)
                wait, delay = delay, min(delay * 2, self.retry_cap)
            else:
                self._recovered()
                delay = self.retry_initial
                if wait is None:
                    return
            self._stopping.wait(wait)

    def _failed(self, why: str, *, exc_info: bool = False) -> None:
        with self._lock:
            self.failures += 1
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            log.warning("%s metadata service at %s: %s; retrying with backoff (up to "
                        "%g s), logged once until it answers", self.source, self.endpoint,
                        why, self.retry_cap, exc_info=exc_info)
        else:
            log.debug("%s metadata service at %s: %s", self.source, self.endpoint, why)

    def _recovered(self) -> None:
        with self._lock:
            self.rounds += 1
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("%s metadata service at %s answers again after %.1f s",
                        self.source, self.endpoint, time.monotonic() - since)

    def _request(self, method: str, path: str, headers: Mapping[str, str], *,
                 timeout: float) -> Reply:
        """One request on a fresh connection; ``timeout`` bounds each read."""
        if self._stopping.is_set():
            raise ServiceError("stopping")
        ep = self.endpoint
        cls = http.client.HTTPSConnection if ep.scheme == "https" else \
            http.client.HTTPConnection
        conn = cls(ep.host, ep.port, timeout=self.connect_timeout)
        with self._lock:
            self._open.add(conn)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(timeout)
            conn.request(method, ep.prefix + path, headers=dict(headers))
            resp = conn.getresponse()
            body = resp.read(MAX_BODY)
            return Reply(resp.status, resp.headers, body)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _notify(self, reason: str, deadline: float | None) -> None:
        self.coordinator.notify(reason, source=self.source, deadline=deadline)


class GceWatcher(Watcher):
    """GCE: ``instance/preempted`` turning TRUE, or ``instance/maintenance-event`` turning
    TERMINATE_ON_HOST_MAINTENANCE, is a notice.

    Both keys are watched with hanging GETs (``wait_for_change``), as Google's guest agent
    does. GCE gives no deadline: the budget is the coordinator's grace (GCE allows 30 s).
    """

    source = "gce"
    KEYS = ("preempted", "maintenance-event")
    HEADERS: ClassVar[dict[str, str]] = {"Metadata-Flavor": "Google"}

    def __init__(self, coordinator: ShutdownCoordinator, endpoint: Endpoint, *,
                 timeout_sec: int = 60, **kwargs: Any) -> None:
        super().__init__(coordinator, endpoint, **kwargs)
        self.timeout_sec = timeout_sec

    def _loops(self) -> list[tuple[str, Callable[[], float | None]]]:
        return [(f"gce-{key}", self._watch(key)) for key in self.KEYS]

    def _watch(self, key: str) -> Callable[[], float | None]:
        path = f"/computeMetadata/v1/instance/{key}"
        first = True
        etag: str | None = None
        last_value: str | None = None

        def step() -> float | None:
            nonlocal first, etag, last_value
            if first:
                # A plain read: it learns the ETag, and reading maintenance-event at least
                # once is what makes GCE announce the next event ahead of time.
                url, timeout = path, 10.0
            else:
                query = {"wait_for_change": "true", "timeout_sec": str(self.timeout_sec)}
                if etag:
                    query["last_etag"] = etag
                url = f"{path}?{urllib.parse.urlencode(query)}"
                timeout = self.timeout_sec + 10.0
            started = time.monotonic()
            reply = self._request("GET", url, self.HEADERS, timeout=timeout)
            if reply.status != 200:
                raise ServiceError(f"GET {path}: HTTP {reply.status}")
            value = reply.text().strip()
            new_etag = reply.headers.get("ETag")
            changed = first or new_etag != etag or value != last_value
            first, etag, last_value = False, new_etag, value
            if self._is_notice(key, value, changed):
                return None
            # A hanging GET that came back at once with nothing new means a server that
            # does not hang: pace it rather than spin.
            return 0.0 if changed or time.monotonic() - started > 1.0 else 1.0

        return step

    def _is_notice(self, key: str, value: str, changed: bool) -> bool:
        if key == "preempted":
            if value.upper() == "TRUE":
                self._notify("gce: preempted", None)
                return True
            return False
        if value == "TERMINATE_ON_HOST_MAINTENANCE":
            self._notify("gce: host maintenance will terminate this VM", None)
            return True
        if changed and value not in ("NONE", ""):
            log.info("gce: maintenance event %s (no action needed)", value)
        return False


class AwsWatcher(Watcher):
    """AWS: a spot ``instance-action`` is a notice with its deadline; a rebalance
    recommendation is an advisory (an early checkpoint), given once.

    Uses IMDSv2: a session token, renewed before it expires and whenever a GET answers 401.
    """

    source = "aws"
    TOKEN_TTL = 21600
    ACTION_PATH = "/latest/meta-data/spot/instance-action"
    REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"

    def __init__(self, coordinator: ShutdownCoordinator, endpoint: Endpoint, *,
                 poll_seconds: float = 5.0, timeout: float = 2.0,
                 boot_time: float | None = None, **kwargs: Any) -> None:
        super().__init__(coordinator, endpoint, **kwargs)
        self.poll_seconds = poll_seconds
        self.timeout = timeout
        self.boot_time = _boot_time() if boot_time is None else boot_time
        self.advised = False
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._stale_logged = False

    def _loops(self) -> list[tuple[str, Callable[[], float | None]]]:
        return [("aws", self._step)]

    def _step(self) -> float | None:
        action = self._get_json(self.ACTION_PATH)
        if action is not None:
            what = str(action.get("action", "interruption"))
            when = str(action.get("time", ""))
            deadline = _parse_time(when, dt.datetime.fromisoformat)
            if deadline is not None and self.boot_time and deadline < self.boot_time:
                # A stop or hibernate interruption can leave its notice in place after the
                # instance comes back; one dated before this boot is not about this run.
                if not self._stale_logged:
                    self._stale_logged = True
                    log.info("aws: ignoring a spot %s notice for %s, before this boot",
                             what, when)
            else:
                if deadline is None:
                    log.warning("aws: spot %s notice with an unreadable time %r; using the "
                                "grace period", what, when)
                self._notify(f"aws: spot {what} at {when or 'an unknown time'}", deadline)
                return None
        if not self.advised:
            rebalance = self._get_json(self.REBALANCE_PATH)
            if rebalance is not None:
                self.advised = True
                self.coordinator.advise(
                    f"aws: rebalance recommendation at {rebalance.get('noticeTime', '?')}")
        return self.poll_seconds

    def _get_json(self, path: str) -> dict[str, Any] | None:
        """The JSON object at ``path``, or None on 404 (nothing pending)."""
        reply = self._get(path)
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise ServiceError(f"GET {path}: HTTP {reply.status}")
        doc = reply.json()
        if not isinstance(doc, dict):
            raise ServiceError(f"GET {path}: expected a JSON object")
        return doc

    def _get(self, path: str) -> Reply:
        for attempt in range(2):
            reply = self._request("GET", path, {"X-aws-ec2-metadata-token": self._session()},
                                  timeout=self.timeout)
            if reply.status != 401 or attempt:
                return reply
            # The token expired or IMDS forgot it (e.g. after a stop/start): renew once.
            log.info("aws: metadata token refused; renewing it")
            self._token = None
        return reply

    def _session(self) -> str:
        if self._token is None or time.monotonic() >= self._token_renew_at:
            try:
                reply = self._request(
                    "PUT", "/latest/api/token",
                    {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL)},
                    timeout=self.timeout)
            except TimeoutError:
                raise ServiceError(
                    "no answer to the IMDSv2 token request (inside a container the "
                    "instance's metadata hop limit must be at least 2)") from None
            if reply.status != 200 or not reply.body.strip():
                raise ServiceError(f"PUT /latest/api/token: HTTP {reply.status}")
            self._token = reply.text().strip()
            self._token_renew_at = time.monotonic() + self.TOKEN_TTL - 60
        return self._token


class AzureWatcher(Watcher):
    """Azure: a Preempt or Terminate scheduled event naming this VM is a notice with the
    event's NotBefore as deadline; a Reboot or Redeploy naming it is an advisory.

    The VM's name comes from ``vm_name``, else the instance metadata, else the host name.
    """

    source = "azure"
    EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
    NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
    HEADERS: ClassVar[dict[str, str]] = {"Metadata": "true"}
    NOTICE_TYPES = ("Preempt", "Terminate")
    ADVISORY_TYPES = ("Reboot", "Redeploy")

    def __init__(self, coordinator: ShutdownCoordinator, endpoint: Endpoint, *,
                 poll_seconds: float = 1.0, vm_name: str | None = None,
                 first_timeout: float = 130.0, timeout: float = 10.0,
                 **kwargs: Any) -> None:
        super().__init__(coordinator, endpoint, **kwargs)
        self.poll_seconds = poll_seconds
        self.vm_name = vm_name or None
        # The first call after a while can take up to two minutes (Azure turns the
        # service on for the VM), later ones answer at once.
        self.first_timeout = first_timeout
        self.timeout = timeout
        self._answered = False
        self._incarnation: object = None
        self._seen: set[str] = set()

    def _loops(self) -> list[tuple[str, Callable[[], float | None]]]:
        return [("azure", self._step)]

    def _step(self) -> float | None:
        reply = self._request("GET", self.EVENTS_PATH, self.HEADERS,
                              timeout=self.timeout if self._answered else self.first_timeout)
        if reply.status != 200:
            raise ServiceError(f"GET /metadata/scheduledevents: HTTP {reply.status}")
        self._answered = True
        doc = reply.json()
        if not isinstance(doc, dict):
            raise ServiceError("scheduled events: expected a JSON object")
        incarnation = doc.get("DocumentIncarnation")
        if incarnation is not None and incarnation == self._incarnation:
            return self.poll_seconds  # nothing changed since the last look
        for event in doc.get("Events") or []:
            if isinstance(event, dict) and self._handle(event):
                return None
        self._incarnation = incarnation
        return self.poll_seconds

    def _handle(self, event: dict[str, Any]) -> bool:
        """Act on one event; True if it was a notice for this VM."""
        kind = str(event.get("EventType", ""))
        if kind not in self.NOTICE_TYPES + self.ADVISORY_TYPES or \
                event.get("ResourceType", "VirtualMachine") != "VirtualMachine":
            return False
        event_id = str(event.get("EventId", ""))
        resources = [str(r).lower() for r in event.get("Resources") or []]
        name = self._name()
        if name.lower() not in resources:
            if event_id not in self._seen:
                self._seen.add(event_id)
                log.info("azure: %s event %s is for %s, not this VM (%s); ignoring it",
                         kind, event_id, ", ".join(resources) or "no VM", name)
            return False
        not_before = str(event.get("NotBefore") or "")
        if kind in self.ADVISORY_TYPES:
            if event_id not in self._seen:
                self._seen.add(event_id)
                self.coordinator.advise(f"azure: {kind} scheduled "
                                        f"{'not before ' + not_before if not_before else 'now'}")
            return False
        # NotBefore is blank once the event has started: no deadline beyond the grace.
        deadline = _parse_time(not_before, email.utils.parsedate_to_datetime) \
            if not_before else None
        if not_before and deadline is None:
            log.warning("azure: %s event with an unreadable NotBefore %r; using the grace "
                        "period", kind, not_before)
        when = f"not before {not_before}" if not_before else "started"
        self._notify(f"azure: {kind} ({when})", deadline)
        return True

    def _name(self) -> str:
        if self.vm_name:
            return self.vm_name
        try:
            reply = self._request("GET", self.NAME_PATH, self.HEADERS, timeout=self.timeout)
            if reply.status == 200 and reply.text().strip():
                self.vm_name = reply.text().strip()
                return self.vm_name
            why = f"HTTP {reply.status}"
        except RETRYABLE as exc:
            why = _describe(exc)
        # Not cached: the next event tries the metadata service again.
        host = socket.gethostname()
        log.info("azure: cannot read this VM's name from the metadata service (%s); using "
                 "the host name %s", why, host)
        return host


# ------------------------------------------------------------- configuration


def parse_sources(raw: str | None) -> tuple[set[str], bool]:
    """Read SPOTRUN_PREEMPTION_SOURCES: (the named sources, whether ``auto`` was asked)."""
    items = [s.strip().lower() for s in (raw or "auto").split(",") if s.strip()]
    if not items:
        items = ["auto"]
    bad = [s for s in items if s not in (*SOURCES, "auto")]
    if bad:
        raise ConfigError(
            f"{SOURCES_VAR}={raw!r}: unknown source {bad[0]!r}; use a comma-separated list "
            f"of {', '.join(SOURCES)}, or auto")
    return {s for s in items if s != "auto"}, "auto" in items


def detect_clouds(environ: Mapping[str, str] | None = None,
                  dmi_dir: Path | None = None) -> list[str]:
    """The clouds this machine seems to run on, from the environment and DMI files.

    Cheap and never hangs: no network. A metadata variable that is set counts as a yes.
    """
    env = os.environ if environ is None else environ
    dmi_dir = DMI_DIR if dmi_dir is None else dmi_dir
    dmi = {name: _read_small(dmi_dir / name).lower() for name in (
        "product_name", "sys_vendor", "bios_vendor", "bios_version", "product_version",
        "chassis_asset_tag")}
    everything = " ".join(dmi.values())
    found = []
    if env.get(GCE_HOST_VAR) or "google" in everything:
        found.append("gce")
    # Older Xen instances say "Xen" as vendor and "4.11.amazon" as BIOS version.
    if env.get(AWS_ENDPOINT_VAR) or "amazon" in everything:
        found.append("aws")
    if env.get(AZURE_URL_VAR) or dmi["chassis_asset_tag"].strip() == AZURE_ASSET_TAG or \
            "microsoft" in dmi["sys_vendor"]:
        # sys_vendor alone also matches Hyper-V off Azure; the cost is one warning line.
        found.append("azure")
    return found


def watchers_from_env(coordinator: ShutdownCoordinator,
                      environ: Mapping[str, str] | None = None,
                      dmi_dir: Path | None = None) -> list[Watcher]:
    """Build (not start) the watchers the environment asks for; ConfigError if it is bad."""
    env = os.environ if environ is None else environ
    named, auto = parse_sources(env.get(SOURCES_VAR))
    clouds = {c for c in CLOUDS if c in named}
    if auto:
        clouds.update(detect_clouds(env, dmi_dir))
    out: list[Watcher] = []
    if "gce" in clouds:
        host = env.get(GCE_HOST_VAR) or GCE_DEFAULT_HOST
        if "://" in host or "/" in host:
            raise ConfigError(f"{GCE_HOST_VAR}={host!r} must be HOST or HOST:PORT")
        out.append(GceWatcher(coordinator, Endpoint.parse(f"http://{host}", GCE_HOST_VAR)))
    if "aws" in clouds:
        out.append(AwsWatcher(
            coordinator,
            Endpoint.parse(env.get(AWS_ENDPOINT_VAR) or AWS_DEFAULT_ENDPOINT,
                           AWS_ENDPOINT_VAR),
            poll_seconds=_seconds(env, AWS_POLL_VAR, 5.0)))
    if "azure" in clouds:
        out.append(AzureWatcher(
            coordinator,
            Endpoint.parse(env.get(AZURE_URL_VAR) or AZURE_DEFAULT_URL, AZURE_URL_VAR),
            poll_seconds=_seconds(env, AZURE_POLL_VAR, 1.0),
            vm_name=env.get(AZURE_VM_NAME_VAR) or None))
    return out


def start_from_env(coordinator: ShutdownCoordinator,
                   environ: Mapping[str, str] | None = None) -> list[Watcher]:
    """Start the watchers SPOTRUN_PREEMPTION_SOURCES asks for and return them.

    Checks the whole configuration before starting anything (ConfigError naming the
    variable); signals need no watcher.
    """
    watchers = watchers_from_env(coordinator, environ)
    for w in watchers:
        w.start()
    log.info("preemption sources: signals%s", "".join(
        f", {w.source} ({w.endpoint})" for w in watchers))
    return watchers


# ------------------------------------------------------------------- helpers


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not 0.01 <= value <= 3600:
        raise ConfigError(f"{name}={raw!r} must be between 0.01 and 3600 seconds")
    return value


def _parse_time(text: str, parse: Callable[[str], dt.datetime]) -> float | None:
    """Wall-clock epoch seconds of ``text``, or None if it cannot be read."""
    try:
        when = parse(text)
    except (ValueError, TypeError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)  # both clouds write UTC
    return when.timestamp()


def _boot_time() -> float:
    """When this machine booted (epoch seconds), or 0 if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _read_small(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(256).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
