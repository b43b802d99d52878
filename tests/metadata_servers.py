"""Local stand-ins for the clouds' metadata services, on real HTTP sockets.

Each behaves like its real service where spotrun depends on it: paths, required headers
(and the status a request without them gets), status codes, JSON shapes, and for GCE the
ETag and the hanging ``wait_for_change`` GET. Flip them from a test with the methods on
each class; every request is recorded in ``requests``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import hashlib
import json
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self


@dataclass(frozen=True)
class Request:
    """What a client sent."""

    method: str
    path: str  # without the query
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        parts = urllib.parse.urlsplit(self.path)
        req = Request(method, parts.path, dict(urllib.parse.parse_qsl(parts.query)),
                      {k.lower(): v for k, v in self.headers.items()})
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        fake = self.server.fake
        with fake.cond:
            fake.requests.append(req)
            fail_with = fake.fail_with
        status, headers, body = fake.answer(req) if fail_with is None else \
            _text(fail_with, "unavailable")
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeService


class FakeService:
    """A metadata service on 127.0.0.1, in a thread; a context manager that closes it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.requests: list[Request] = []
        self.fail_with: int | None = None  # answer every request with this status
        self.closing = False
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    def changed(self) -> None:
        """Wake hanging requests (call with ``cond`` held)."""
        self.cond.notify_all()

    def seen(self, path: str, method: str = "GET") -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.path == path and r.method == method]

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(status: int, body: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "text/plain", **headers}, body.encode()


def _json(status: int, value: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode()


# ------------------------------------------------------------------------ GCE


class GceMetadata(FakeService):
    """``computeMetadata/v1/instance/{preempted,maintenance-event}`` with ETags and
    ``wait_for_change`` (hangs until the value changes or ``timeout_sec`` passes)."""

    PREFIX = "/computeMetadata/v1/instance/"

    def __init__(self) -> None:
        self.values = {"preempted": "FALSE", "maintenance-event": "NONE"}
        self.versions = dict.fromkeys(self.values, 0)
        super().__init__()

    def etag(self, key: str) -> str:
        raw = f"{key}/{self.versions[key]}/{self.values[key]}".encode()
        return hashlib.sha1(raw).hexdigest()[:16]

    def set(self, key: str, value: str) -> None:
        with self.cond:
            self.values[key] = value
            self.versions[key] += 1
            self.changed()

    def hanging(self, key: str) -> int:
        """Hanging GETs of ``key`` received so far."""
        return sum(1 for r in self.seen(self.PREFIX + key)
                   if r.query.get("wait_for_change") == "true")

    def answer(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        if req.headers.get("metadata-flavor") != "Google":
            return _text(403, "Missing required header: Metadata-Flavor")
        key = req.path.removeprefix(self.PREFIX)
        if not req.path.startswith(self.PREFIX) or key not in self.values:
            return _text(404, "Not Found")
        with self.cond:
            if req.query.get("wait_for_change") == "true":
                timeout = float(req.query.get("timeout_sec", "3600"))
                last = req.query.get("last_etag")
                start_etag = self.etag(key)
                # Without last_etag it waits for the next change; with a stale one it
                # answers at once.
                if last is None or last == start_etag:
                    end = time.monotonic() + timeout
                    while self.etag(key) == start_etag and not self.closing:
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        self.cond.wait(left)
            value, etag = self.values[key], self.etag(key)
        return _text(200, value, ETag=etag, **{"Metadata-Flavor": "Google"})


# ------------------------------------------------------------------------ AWS


def aws_time(epoch: float) -> str:
    """AWS's spelling of a time: ``2017-09-18T08:22:00Z``."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AwsImds(FakeService):
    """IMDSv2: ``PUT /latest/api/token``, then GETs carrying the token (401 without it or
    once it expired); spot ``instance-action`` and the rebalance recommendation, 404 until
    set."""

    ACTION = "/latest/meta-data/spot/instance-action"
    REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
    TOKEN = "/latest/api/token"

    def __init__(self) -> None:
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.documents: dict[str, Any] = {}
        super().__init__()

    def interrupt(self, action: str, at: float) -> None:
        with self.cond:
            self.documents[self.ACTION] = {"action": action, "time": aws_time(at)}

    def rebalance(self, at: float) -> None:
        with self.cond:
            self.documents[self.REBALANCE] = {"noticeTime": aws_time(at)}

    def expire_tokens(self) -> None:
        with self.cond:
            self.tokens.clear()

    def issued(self) -> list[str]:
        with self.cond:
            return list(self.tokens)

    def answer(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        if req.path == self.TOKEN:
            if req.method != "PUT":
                return _text(405, "Method Not Allowed")
            ttl = req.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return _text(400, "Bad Request")
            token = secrets.token_urlsafe(40)
            with self.cond:
                self.tokens[token] = time.monotonic() + int(ttl)
            return _text(200, token, **{"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": ttl})
        presented = req.headers.get("x-aws-ec2-metadata-token")
        with self.cond:
            valid = presented is not None and \
                self.tokens.get(presented, 0) > time.monotonic()
            doc = self.documents.get(req.path)
        if not valid:
            return _text(401, "Unauthorized")
        if req.method != "GET":
            return _text(405, "Method Not Allowed")
        if doc is None:
            return 404, {"Content-Type": "text/html"}, b"<html><body>404 - Not Found</body>"
        return _json(200, doc)


# ---------------------------------------------------------------------- Azure


def azure_time(epoch: float) -> str:
    """Azure's spelling of a time: ``Mon, 11 Apr 2022 22:26:58 GMT``."""
    return email.utils.formatdate(epoch, usegmt=True)


class AzureImds(FakeService):
    """Scheduled Events (``Metadata: true`` required, else 400) and the VM's name."""

    EVENTS = "/metadata/scheduledevents"
    NAME = "/metadata/instance/compute/name"
    NEED_HEADER: ClassVar[dict[str, str]] = {
        "error": "Bad request. Required metadata header not specified"}

    def __init__(self, vm_name: str = "spot-vm-1") -> None:
        self.vm_name = vm_name
        self.incarnation = 1
        self.events: list[dict[str, Any]] = []
        super().__init__()

    def schedule(self, event_type: str, resources: list[str], not_before: float | None,
                 status: str = "Scheduled") -> str:
        """Add an event; returns its id."""
        event_id = secrets.token_hex(8).upper()
        with self.cond:
            self.events.append({
                "EventId": event_id, "EventType": event_type,
                "ResourceType": "VirtualMachine", "Resources": resources,
                "EventStatus": status,
                "NotBefore": "" if not_before is None else azure_time(not_before),
                "Description": "", "EventSource": "Platform", "DurationInSeconds": -1,
            })
            self.incarnation += 1
        return event_id

    def answer(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        if req.headers.get("metadata", "").lower() != "true":
            return _json(400, self.NEED_HEADER)
        if "api-version" not in req.query:
            return _json(400, {"error": "Bad request. api-version was not specified"})
        if req.path == self.EVENTS and req.method == "GET":
            with self.cond:
                doc = {"DocumentIncarnation": self.incarnation, "Events": list(self.events)}
            return _json(200, doc)
        if req.path == self.NAME and req.query.get("format") == "text":
            return _text(200, self.vm_name)
        return _json(404, {"error": "Not found"})


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
