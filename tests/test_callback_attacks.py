"""Callbacks against a hostile user: DNS rebinding, proxies, forged callbacks, receivers
that try to exhaust the server. Real servers on loopback; the one stand-in is the system's
resolver, replaced in this process so that a name can answer what an attacker's DNS
would."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import wait_until
from spotrun.config import Settings
from spotrun.http.app import create_app
from spotrun.http.callbacks import CallbackDeliverer, CallbackRefused, check_callback_url
from spotrun.jobs import EventKind
from spotrun.serve import ServerThread
from spotrun.service import callback_urls
from spotrun.store import JobStore


class Receiver:
    """A real HTTP server on 127.0.0.1: records each POST (headers, body) and answers as
    ``behaviour`` says: "ok", "endless" (200, then a body that never ends), "silent"
    (never answers)."""

    def __init__(self, behaviour: str = "ok", host: str = "127.0.0.1") -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.in_flight = 0  # requests being answered now
        self.spans: list[tuple[float, float]] = []  # (start, end) of each silent request
        self.lock = threading.Lock()
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if behaviour == "silent":
                    began = time.monotonic()
                    with outer.lock:
                        outer.in_flight += 1
                    try:
                        # Say nothing until the client hangs up: recv returns at once
                        # when its FIN arrives, so the count follows the client closely.
                        self.connection.settimeout(None)
                        with contextlib.suppress(OSError):
                            while self.connection.recv(65536):
                                pass
                    finally:
                        with outer.lock:
                            outer.in_flight -= 1
                            outer.spans.append((began, time.monotonic()))
                    return
                self.send_response(200)
                self.end_headers()
                if behaviour == "endless":
                    chunk = b"x" * 65536
                    try:
                        while not outer.stop.is_set():
                            self.wfile.write(chunk)
                    except OSError:
                        pass  # the deliverer hung up: what it should do

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def most_at_once(self, skew: float = 0.25) -> int:
        """The most requests held open together, ignoring overlaps shorter than ``skew``
        (when the client closes one and opens the next, this server's threads notice in
        an order of their own)."""
        with self.lock:
            edges = sorted([(a, 1) for a, _b in self.spans]
                           + [(b - skew, -1) for _a, b in self.spans])
        most = now = 0
        for _t, step in edges:
            now += step
            most = max(most, now)
        return most

    def count(self) -> int:
        with self.lock:
            return len(self.got)

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


class ScriptedDNS:
    """Names whose answers a test scripts, one answer per lookup (the last repeats);
    every lookup of them is counted. Other names go to the system's resolver."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.lookups: dict[str, int] = {}


@pytest.fixture
def rebinding(monkeypatch: pytest.MonkeyPatch) -> ScriptedDNS:
    dns = ScriptedDNS()
    real = callback_urls.resolve

    def resolve(host: str, port: int) -> list[str]:
        if host not in dns.answers:
            return real(host, port)
        n = dns.lookups[host] = dns.lookups.get(host, 0) + 1
        script = dns.answers[host]
        return [script[min(n, len(script)) - 1]]

    monkeypatch.setattr(callback_urls, "resolve", resolve)
    return dns


def _served(store: JobStore, tmp_path: Path, deliverer: CallbackDeliverer) -> ServerThread:
    settings = Settings.from_env(home=str(tmp_path / "home"), database_url="sqlite://")
    srv = ServerThread(create_app(settings, store=store, deliverer=deliverer), "127.0.0.1",
                       0, access_log=False)
    srv.start()
    return srv


def test_refused_destinations_and_no_address_in_the_answer(rebinding: ScriptedDNS) -> None:
    rebinding.answers["metadata.attacker.example"] = ["169.254.169.254"]
    rebinding.answers["inside.attacker.example"] = ["10.20.30.40"]
    refused = {
        "http://[::127.0.0.1]/": "embeds an IPv4 one",
        "http://[64:ff9b::a9fe:a9fe]/": "embeds an IPv4 one",  # NAT64 of 169.254.169.254
        "http://[2002:a9fe:a9fe::1]/": "embeds an IPv4 one",  # 6to4
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/": "embeds an IPv4 one",  # Teredo
        "http://93.184.216.34:8080/hook": "uses port 8080",
        "https://93.184.216.34:22/": "uses port 22",
        "http://user:pw@93.184.216.34/": "user name or password",
        "http://metadata.attacker.example/latest": "resolves to a link-local address",
        "http://inside.attacker.example/": "resolves to a private address",
    }
    for url, words in refused.items():
        with pytest.raises(CallbackRefused) as err:
            check_callback_url(url, allow_private=False)
        assert words in str(err.value), url
        for secret in ("169.254", "10.20.30.40", "a9fe"):
            if "attacker" in url:
                assert secret not in str(err.value)  # what a name points at stays hidden
    target = check_callback_url("https://93.184.216.34/hook?x=1", allow_private=False)
    assert (target.address, target.port, target.path) == ("93.184.216.34", 443, "/hook?x=1")


def test_a_rebinding_name_cannot_steer_the_post(store: JobStore, tmp_path: Path,
                                                rebinding: ScriptedDNS) -> None:
    """The name answers the receiver's address once and another address after that: the
    POST goes to the address that was checked, and the name is looked up once per
    delivery, by spotrun, never again by the HTTP client."""
    receiver = Receiver()
    # Loopback is allowed here (the receiver is on it); 127.0.0.2 has no receiver, so a
    # client that looked the name up again would miss.
    rebinding.answers["rebind.attacker.example"] = ["127.0.0.1", "127.0.0.2"]
    deliverer = CallbackDeliverer(store, allow_private=True, attempts=1, poll_seconds=0.1)
    srv = _served(store, tmp_path, deliverer)
    try:
        job = store.submit("sleep", {}, owner="mallory",
                           callback_url=f"http://rebind.attacker.example:{receiver.port}/h")
        wait_until(lambda: receiver.count() >= 1, 20, "the callback")
        headers, body = receiver.got[0]
        assert headers["host"] == f"rebind.attacker.example:{receiver.port}"
        assert json.loads(body)["id"] == job.id
        assert rebinding.lookups["rebind.attacker.example"] == 1
    finally:
        srv.stop()
        receiver.close()


def test_the_environments_proxy_is_not_used(store: JobStore, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = Receiver()  # would record what a proxy is sent
    receiver = Receiver()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    deliverer = CallbackDeliverer(store, allow_private=True, attempts=1, poll_seconds=0.1)
    srv = _served(store, tmp_path, deliverer)
    try:
        store.submit("sleep", {}, callback_url=f"http://127.0.0.1:{receiver.port}/h")
        wait_until(lambda: receiver.count() >= 1, 20, "the callback")
        assert proxy.count() == 0
    finally:
        srv.stop()
        proxy.close()
        receiver.close()


def test_callbacks_are_signed_with_the_owners_key(store: JobStore, tmp_path: Path) -> None:
    receiver = Receiver()
    deliverer = CallbackDeliverer(store, allow_private=True, attempts=1, poll_seconds=0.1)
    srv = _served(store, tmp_path, deliverer)
    token = store.tokens.create("alice")
    try:
        url = f"http://127.0.0.1:{srv.port}"
        got = httpx.get(f"{url}/v1/callback-secret",
                        headers={"Authorization": f"Bearer {token}"}).json()
        assert got["owner"] == "alice" and got["header"] == "X-Spotrun-Signature"
        key = got["secret"]
        store.submit("sleep", {}, owner="alice",
                     callback_url=f"http://127.0.0.1:{receiver.port}/h")
        wait_until(lambda: receiver.count() >= 1, 20, "the callback")
        headers, body = receiver.got[0]
        fields = dict(part.split("=", 1) for part in headers["x-spotrun-signature"].split(","))
        assert abs(int(fields["t"]) - time.time()) < 60
        expected = hmac.new(key.encode(), f"{fields['t']}.".encode() + body,
                            hashlib.sha256).hexdigest()
        assert hmac.compare_digest(fields["v1"], expected)
        # Another owner's key does not verify it: a forger needs alice's key.
        bobs = store.callbacks.secret("bob")
        assert bobs != key
        forged = hmac.new(bobs.encode(), f"{fields['t']}.".encode() + body,
                          hashlib.sha256).hexdigest()
        assert forged != fields["v1"]
    finally:
        srv.stop()
        receiver.close()


def test_a_receiver_cannot_exhaust_the_server(store: JobStore, tmp_path: Path) -> None:
    """An endless body is never read; a silent receiver is cut at the deadline; one
    owner's hanging receivers leave the other owners' callbacks their slots."""
    endless, silent, fine = Receiver("endless"), Receiver("silent"), Receiver()
    deliverer = CallbackDeliverer(store, allow_private=True, attempts=2,
                                  backoff_seconds=0.2, timeout_seconds=1.0,
                                  poll_seconds=0.1, max_in_flight=4, per_owner=2)
    srv = _served(store, tmp_path, deliverer)
    try:
        # The endless answer counts as delivered (200), its body unread. (First, alone:
        # among one owner's jobs, which delivery gets a slot first is not an order.)
        flood = store.submit("sleep", {}, owner="mallory",
                             callback_url=f"http://127.0.0.1:{endless.port}/h")
        wait_until(lambda: endless.count() >= 1, 10, "the endless receiver")
        for _ in range(12):
            store.submit("sleep", {}, owner="mallory",
                         callback_url=f"http://127.0.0.1:{silent.port}/h")
        wait_until(lambda: silent.in_flight >= 1, 10, "mallory's deliveries to hang")
        good = store.submit("sleep", {}, owner="alice",
                            callback_url=f"http://127.0.0.1:{fine.port}/h")
        wait_until(lambda: fine.count() >= 1, 30, "alice's callback")
        assert json.loads(fine.got[0][1])["id"] == good.id
        assert not any(e.kind == EventKind.NOTE for e in store.events(flood.id))
        # Each silent receiver is given up on after its attempts, with a note.
        silent_jobs = [j.id for j in store.list_jobs(owner="mallory")
                       if j.id != flood.id]
        wait_until(lambda: all(any(e.kind == EventKind.NOTE for e in store.events(j))
                               for j in silent_jobs), 90, "the silent receivers' notes")
        note = next(e.message for e in store.events(silent_jobs[0])
                    if e.kind == EventKind.NOTE)
        assert "no answer within 1 s" in note
        # An owner never holds more than its share (2) of the delivery slots (4): alice's
        # went out while mallory's hung.
        assert silent.most_at_once() <= 2, silent.spans
    finally:
        srv.stop()
        for r in (endless, silent, fine):
            r.close()
