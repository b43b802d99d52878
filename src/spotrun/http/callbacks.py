"""Per-job callbacks: POST the job as JSON to its ``callback_url`` on every state change.

The deliverer runs inside the server process. It follows the store's event feed
(:meth:`JobStore.events_after`), so a callback is sent whoever changed the job (a worker,
the CLI, the API). Deliveries of one job go out in order; a failing receiver is retried
with exponential backoff and, once the attempts are spent, the failure is written to the
job's history. Nothing here ever blocks or fails a job.

Server-side request forgery: a callback URL that resolves to a loopback, private,
link-local (169.254.0.0/16, where the cloud metadata services live), otherwise non-public
address, or an IPv6 range that embeds an IPv4 one (::a.b.c.d, NAT64 64:ff9b::/96, 6to4
2002::/16, Teredo 2001::/32), or that names a port other than 80 and 443, is refused at
submit and checked again before each delivery, unless the operator sets
``SPOTRUN_CALLBACK_ALLOW_PRIVATE=1``. Each delivery resolves the name once and connects to
the very address it checked (the Host header and TLS's SNI and certificate check keep the
name), so a name that answers differently the second time (DNS rebinding) cannot steer the
POST elsewhere; the client ignores HTTP(S)_PROXY (a proxy would resolve the name itself);
redirects are never followed; errors never show the addresses a name resolved to.

Every callback is signed: ``X-Spotrun-Signature: t=<unix time>,v1=<hex>``, the HMAC-SHA256
of ``"<t>." + body`` with the job owner's key (``GET /v1/callback-secret``), so a receiver
can tell a real "succeeded" from a forged one, and an old one replayed.

A receiver cannot hold the server: only the status line is read (the body never), each
delivery has one overall deadline, an owner has at most ``per_owner`` deliveries in flight,
and a delivery waiting to retry holds no slot.

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
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx

from spotrun.events import Note
from spotrun.http.feed import wait_set
from spotrun.jobs import EventKind
from spotrun.service.callback_urls import (
    CallbackRefused,
    Target,
    check_callback_url,
    redact_url,
    signature,
)
from spotrun.store import JobNotFound, JobStore
from spotrun.strictjson import json_bytes

log = logging.getLogger("spotrun.callbacks")


# The events that change a job's state (handed_back: a worker stopped and returned it).
STATE_CHANGES = frozenset({
    EventKind.SUBMITTED, EventKind.STARTED, EventKind.RESUMED, EventKind.PREEMPTED,
    EventKind.HANDED_BACK, EventKind.LEASE_EXPIRED, EventKind.SUCCEEDED, EventKind.FAILED,
    EventKind.CANCELLED,
})


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
                 poll_seconds: float = 2.0, max_in_flight: int = 16,
                 per_owner: int = 4) -> None:
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
        self.per_owner = per_owner
        self._owner_slots: dict[str, asyncio.Semaphore] = {}
        self._secrets: dict[str, str] = {}
        self._client: httpx.AsyncClient | None = None

    def poke(self) -> None:
        """Something may have changed: read the feed now (call from the event loop)."""
        self._wake.set()

    async def run(self) -> None:
        """Follow the feed until cancelled."""
        # trust_env=False: an HTTP(S)_PROXY in the environment would resolve the name
        # itself and carry the POST past the address check.
        self._client = httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False,
                                         trust_env=False,
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
                await wait_set(self._wake, self.poll_seconds)
                self._wake.clear()
        finally:
            self._leading_until = 0.0
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._client.aclose()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.callbacks.resign, self.holder)

    def leading(self) -> bool:
        return time.monotonic() < self._leading_until

    async def _read_feed(self) -> None:
        asked = time.monotonic()
        horizon = await asyncio.to_thread(self.store.callbacks.lead, self.holder,
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
            rows = await asyncio.to_thread(self.store.callbacks.pending, after, kinds)
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
            await asyncio.to_thread(self.store.callbacks.settle, self.holder, kinds,
                                    SETTLE_SECONDS)

    async def _record(self, event_id: int) -> None:
        try:
            await asyncio.to_thread(self.store.callbacks.done, self.holder, event_id)
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
                # Waiting holds no slot: a failing receiver delays only its own job.
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            if not self.leading():
                return False
            try:
                target = await asyncio.to_thread(check_callback_url, d.url,
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
            owner = job.owner or ""
            slots = self._owner_slots.setdefault(owner, asyncio.Semaphore(self.per_owner))
            try:
                async with slots, self._slots:
                    status = await self._send(target, owner, job.to_json(with_events=False),
                                              headers)
            except (httpx.HTTPError, TimeoutError) as exc:
                last_error = (f"{type(exc).__name__}: {exc}" if str(exc)
                              else type(exc).__name__)
                if isinstance(exc, TimeoutError):
                    last_error = f"no answer within {self.timeout_seconds:g} s"
                continue
            if 200 <= status < 300:
                return True
            last_error = f"HTTP {status}"
        await self._note(d, f"callback for '{d.kind}' could not be delivered to "
                            f"{redact_url(d.url)} after {self.attempts} attempts "
                            f"(last: {last_error})")
        return True

    async def _send(self, target: Target, owner: str, body: dict[str, Any],
                    headers: dict[str, str]) -> int:
        """POST to the checked address; the answer's status (its body is never read)."""
        assert self._client is not None
        secret = self._secrets.get(owner)
        if secret is None:
            secret = self._secrets[owner] = await asyncio.to_thread(
                self.store.callbacks.secret, owner or None)
        content = json_bytes(body)
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        # One deadline for the whole delivery, connect to status line: a receiver that
        # trickles its answer cannot hold a slot for longer.
        async with asyncio.timeout(self.timeout_seconds):
            async with self._client.stream(
                    "POST", target.url(), content=content, extensions=extensions,
                    headers={**headers, "Host": target.host_header(),
                             "Content-Type": "application/json",
                             "X-Spotrun-Signature": signature(secret, int(time.time()),
                                                              content)}) as response:
                return response.status_code

    async def _note(self, d: Delivery, message: str) -> None:
        log.warning("job %s: %s", d.job_id, message)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.add_note, d.job_id, Note(message))
