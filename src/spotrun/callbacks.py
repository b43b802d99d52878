"""Per-job callbacks: POST the job as JSON to its ``callback_url`` on every state change.

The deliverer runs inside the server process. It follows the store's event feed
(:meth:`JobStore.events_after`), so a callback is sent whoever changed the job (a worker,
the CLI, the API). Deliveries of one job go out in order; a failing receiver is retried
with exponential backoff and, once the attempts are spent, the failure is written to the
job's history. Nothing here ever blocks or fails a job.

Server-side request forgery: a callback URL that resolves to a loopback, private,
link-local (169.254.0.0/16, where the cloud metadata services live) or otherwise
non-public address is refused at submit, and checked again before each delivery (the name
may resolve differently by then), unless the operator sets
``SPOTRUN_CALLBACK_ALLOW_PRIVATE=1``. Redirects are never followed.

Delivery is at most once per event across server restarts: a restarted server follows the
events written after it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from spotrun.jobs import EventKind
from spotrun.store import JobNotFound, JobStore

log = logging.getLogger("spotrun.callbacks")

ALLOW_PRIVATE_ENV = "SPOTRUN_CALLBACK_ALLOW_PRIVATE"
MAX_URL_LENGTH = 2000

# The events that change a job's state (handed_back: a worker stopped and returned it).
STATE_CHANGES = frozenset({
    EventKind.SUBMITTED, EventKind.STARTED, EventKind.RESUMED, EventKind.PREEMPTED,
    EventKind.HANDED_BACK, EventKind.LEASE_EXPIRED, EventKind.SUCCEEDED, EventKind.FAILED,
    EventKind.CANCELLED,
})


class CallbackRefused(ValueError):
    """A callback URL may not be used; the message says why, in one line."""


def allow_private_from_env() -> bool:
    return os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower() in ("1", "true", "yes")


def redact_url(url: str) -> str:
    """The URL without credentials, query or fragment (they may hold secrets)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return "<unparseable URL>"


def _why_not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services live)"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "a reserved address"
    return None


def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise CallbackRefused(f"cannot resolve host {host!r} ({exc})") from None
    return sorted({str(info[4][0]).split("%", 1)[0] for info in infos})


def check_callback_url(url: str, *, allow_private: bool) -> None:
    """Refuse a callback URL that is malformed or, unless allowed, reaches a non-public
    address. Resolves the host name and checks every address it has. Blocking (DNS)."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise CallbackRefused("contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise CallbackRefused("must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise CallbackRefused("has no host")
    if allow_private:
        return
    for addr in _resolve(host, port or (443 if parts.scheme == "https" else 80)):
        why = _why_not_public(ipaddress.ip_address(addr))
        if why is not None:
            shown = host if host == addr else f"{host} ({addr})"
            raise CallbackRefused(
                f"{shown} is {why}; callbacks to loopback, private and "
                f"link-local addresses are refused unless the operator sets "
                f"{ALLOW_PRIVATE_ENV}=1")


@dataclass(frozen=True)
class Delivery:
    event_id: int
    job_id: str
    kind: str
    url: str


class CallbackDeliverer:
    """Follows the event feed from where the server started and delivers callbacks.

    ``attempts`` tries per delivery, waiting ``backoff_seconds * 2**n`` between them.
    """

    def __init__(self, store: JobStore, *, allow_private: bool, attempts: int = 6,
                 backoff_seconds: float = 1.0, timeout_seconds: float = 5.0,
                 poll_seconds: float = 2.0, max_in_flight: int = 16) -> None:
        self.store = store
        self.allow_private = allow_private
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.timeout_seconds = timeout_seconds
        self.poll_seconds = poll_seconds
        self._cursor: int | None = None
        self._queues: dict[str, asyncio.Queue[Delivery]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._client: httpx.AsyncClient | None = None

    def poke(self) -> None:
        """Something may have changed: read the feed now (call from the event loop)."""
        self._wake.set()

    async def run(self) -> None:
        """Follow the feed until cancelled."""
        self._client = httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False,
                                         headers={"User-Agent": "spotrun-callbacks"})
        try:
            if self._cursor is None:
                self._cursor = await asyncio.to_thread(self.store.last_event_id)
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                self._wake.clear()
                try:
                    await self._read_feed()
                except Exception as exc:  # the database may be away for a while
                    log.warning("callbacks: cannot read the event feed: %s", exc)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._client.aclose()

    async def _read_feed(self) -> None:
        assert self._cursor is not None
        while True:
            rows = await asyncio.to_thread(self.store.events_after, self._cursor)
            for event_id, job_id, kind, url in rows:
                self._cursor = event_id
                if url and kind in STATE_CHANGES:
                    self._enqueue(Delivery(event_id, job_id, kind, url))
            if len(rows) < 500:
                return

    def _enqueue(self, d: Delivery) -> None:
        # One queue and one task per job keeps a job's callbacks in order without letting
        # a slow receiver hold up the callbacks of other jobs.
        queue = self._queues.get(d.job_id)
        if queue is None:
            queue = self._queues[d.job_id] = asyncio.Queue()
            task = asyncio.create_task(self._drain(d.job_id, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.put_nowait(d)

    async def _drain(self, job_id: str, queue: asyncio.Queue[Delivery]) -> None:
        try:
            while not queue.empty():
                d = queue.get_nowait()
                async with self._slots:
                    await self._deliver(d)
        finally:
            self._queues.pop(job_id, None)

    async def _deliver(self, d: Delivery) -> None:
        last_error = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                await asyncio.to_thread(check_callback_url, d.url,
                                        allow_private=self.allow_private)
            except CallbackRefused as exc:
                await self._note(d, f"callback for '{d.kind}' not sent: {exc}")
                return
            try:
                job = await asyncio.to_thread(self.store.get, d.job_id, with_events=False)
            except JobNotFound:
                return
            headers = {"X-Spotrun-Event": d.kind, "X-Spotrun-Delivery": str(d.event_id)}
            try:
                status = await self._send(d.url, job.to_json(with_events=False), headers)
            except httpx.HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if 200 <= status < 300:
                return
            last_error = f"HTTP {status}"
        await self._note(d, f"callback for '{d.kind}' could not be delivered to "
                            f"{redact_url(d.url)} after {self.attempts} attempts "
                            f"(last: {last_error})")

    async def _send(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
        from spotrun.api import json_bytes

        assert self._client is not None
        response = await self._client.post(
            url, content=json_bytes(body),
            headers={**headers, "Content-Type": "application/json"})
        return response.status_code

    async def _note(self, d: Delivery, message: str) -> None:
        log.warning("job %s: %s", d.job_id, message)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.add_note, d.job_id, message)
