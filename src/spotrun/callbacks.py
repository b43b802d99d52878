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

Exactly once per event and callback across any number of server processes: one deliverer
leads at a time (a lease in ``callback_leader``, judged by the database clock, renewed at
each poll and used for only half its length), and each event delivered or given up on is
recorded in ``callback_deliveries``. The feed is not a cursor: every poll asks for the
events above a settled horizon that no one recorded, so an event whose transaction committed
after a later id's is found all the same; the horizon moves only past events that are all
recorded and older than a minute. A leader that dies between a POST and its record leaves
that event to the next leader, which sends it again: receivers that must never see a
duplicate use the ``X-Spotrun-Delivery`` header (the event id). A restarted server resumes
where the last leader stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import time
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


LEADER_SECONDS = 10.0  # the deliverer's lease; it sends only in the first half
SETTLE_SECONDS = 60.0  # older events cannot still commit: the horizon may pass them


class CallbackDeliverer:
    """Delivers callbacks while it leads the server processes sharing the database.

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
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._leading_until = 0.0  # time.monotonic(); sends stop at this instant
        self._queued: set[int] = set()  # event ids queued or in flight here
        self._unrecorded: list[int] = []  # delivered, not yet recorded (database away)
        # Recorded while a read of the feed may have been under way, which then still
        # lists them as pending: event id -> when it was recorded (time.monotonic()).
        self._recent: dict[int, float] = {}
        self._last_settle = 0.0
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
        failing = False
        try:
            while True:
                try:
                    await self._read_feed()
                    if failing:
                        log.warning("callbacks: the event feed is readable again")
                    failing = False
                except Exception as exc:  # the database may be away for a while
                    self._leading_until = 0.0
                    if not failing:
                        log.warning("callbacks: cannot read the event feed: %s", exc)
                    failing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                self._wake.clear()
        finally:
            self._leading_until = 0.0
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._client.aclose()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.callback_resign, self.holder)

    def leading(self) -> bool:
        return time.monotonic() < self._leading_until

    async def _read_feed(self) -> None:
        asked = time.monotonic()
        horizon = await asyncio.to_thread(self.store.callback_lead, self.holder,
                                          LEADER_SECONDS)
        if horizon is None:
            self._leading_until = 0.0
            return
        # Half the lease, from before it was asked for: a leader that stops renewing stops
        # sending well before another can take over.
        self._leading_until = asked + LEADER_SECONDS / 2
        while self._unrecorded:
            await self._record(self._unrecorded.pop(0))
        kinds = sorted(STATE_CHANGES)
        after = horizon
        read_from = time.monotonic()
        while True:
            rows = await asyncio.to_thread(self.store.callbacks_pending, after, kinds)
            for event_id, job_id, kind, url in rows:
                if event_id not in self._queued and event_id not in self._recent:
                    self._queued.add(event_id)
                    self._enqueue(Delivery(event_id, job_id, kind, url))
            if len(rows) < 500:
                break
            after = rows[-1][0]
        # A record made before this read began was seen by it: no need to remember it.
        self._recent = {i: t for i, t in self._recent.items() if t >= read_from}
        if time.monotonic() - self._last_settle >= SETTLE_SECONDS / 4:
            self._last_settle = time.monotonic()
            await asyncio.to_thread(self.store.callback_settle, self.holder, kinds,
                                    SETTLE_SECONDS)

    async def _record(self, event_id: int) -> None:
        try:
            await asyncio.to_thread(self.store.callback_done, self.holder, event_id)
        except Exception:
            self._unrecorded.append(event_id)  # recorded at the next poll that can
            return
        self._recent[event_id] = time.monotonic()
        self._queued.discard(event_id)

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
                    sent = await self._deliver(d)
                if sent:
                    await self._record(d.event_id)
                    continue
                # No longer the leader: this job's callbacks are the next leader's, from
                # this one on, in order.
                self._queued.discard(d.event_id)
                while not queue.empty():
                    self._queued.discard(queue.get_nowait().event_id)
        finally:
            self._queues.pop(job_id, None)

    async def _deliver(self, d: Delivery) -> bool:
        """Deliver (or give up and note it); False if this process stopped leading."""
        last_error = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            if not self.leading():
                return False
            try:
                await asyncio.to_thread(check_callback_url, d.url,
                                        allow_private=self.allow_private)
            except CallbackRefused as exc:
                await self._note(d, f"callback for '{d.kind}' not sent: {exc}")
                return True
            try:
                job = await asyncio.to_thread(self.store.get, d.job_id, with_events=False)
            except JobNotFound:
                return True
            if not self.leading():
                return False
            headers = {"X-Spotrun-Event": d.kind, "X-Spotrun-Delivery": str(d.event_id)}
            try:
                status = await self._send(d.url, job.to_json(with_events=False), headers)
            except httpx.HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if 200 <= status < 300:
                return True
            last_error = f"HTTP {status}"
        await self._note(d, f"callback for '{d.kind}' could not be delivered to "
                            f"{redact_url(d.url)} after {self.attempts} attempts "
                            f"(last: {last_error})")
        return True

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
