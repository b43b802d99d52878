"""Live progress for Server-Sent Events: one :class:`ChangeFeed` per server process.

The feed, not each client, watches the store: it polls :meth:`JobStore.change_marker`
(one indexed read) every ``poll_seconds``, then reads the jobs that changed once and fans
them out to every client's :class:`Subscription`. The store sends no NOTIFY for live
views: on PostgreSQL every NOTIFY'd commit queues behind the others on one lock, which
halved the rate of submits and results; one reader per server process costs less.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from spotrun.jobs import Job
from spotrun.service.auth import Principal
from spotrun.store import JobNotFound, JobStore
from spotrun.strictjson import json_bytes

log = logging.getLogger("spotrun.api")


async def wait_set(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set or ``timeout`` seconds pass; a cancel always ends it.

    Not ``asyncio.wait_for``: on Python 3.11 it returns normally when the event is set in
    the loop turn that cancels the waiting task, and the cancel is lost (a stopping server
    hung in the callback deliverer's loop, which went on polling).
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


class Subscription:
    """One live client: the changed jobs it has not been sent yet, newest state per job."""

    def __init__(self, principal: Principal, job_id: str | None) -> None:
        self.principal = principal
        self.job_id = job_id
        self.pending: dict[str, dict[str, Any]] = {}
        self.closed = False
        self._ready = asyncio.Event()

    def offer(self, job: dict[str, Any]) -> None:
        self.pending[job["id"]] = job
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self, timeout: float) -> list[dict[str, Any]] | None:
        """The jobs changed since the last call; [] on timeout; None once closed."""
        await wait_set(self._ready, timeout)
        self._ready.clear()
        if self.closed:
            return None
        items, self.pending = list(self.pending.values()), {}
        return items


class ChangeFeed:
    """The one task per server that learns which jobs changed and tells every client.

    It wakes when :meth:`JobStore.change_marker` moves (polled every ``poll_seconds``),
    waits ``settle_seconds`` so that a burst of writes becomes one read, then reads the
    changed jobs once. It keeps a watermark of ``updated_at`` and looks ``slack_seconds``
    behind it, because a transaction can commit after a later one.
    """

    def __init__(self, store: JobStore, *, poll_seconds: float = 0.25,
                 settle_seconds: float = 0.1, slack_seconds: float = 5.0,
                 page: int = 1000) -> None:
        self.store = store
        self.page = page  # jobs a read
        self.poll_seconds = poll_seconds
        self.settle_seconds = settle_seconds
        self.slack_seconds = slack_seconds
        self.subscribers: set[Subscription] = set()
        self.listeners: list[Callable[[], None]] = []
        self.stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watermark: float | None = None
        self._seen: dict[str, float] = {}

    def subscribe(self, principal: Principal, job_id: str | None = None) -> Subscription:
        sub = Subscription(principal, job_id)
        if self.stopped:
            sub.close()
        self.subscribers.add(sub)
        return sub

    def streams_of(self, principal: Principal) -> int:
        """How many live streams ``principal`` has open on this server process."""
        return sum(1 for s in self.subscribers if s.principal.name == principal.name)

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def stop(self) -> None:
        """End the feed and every live stream (call from the event loop)."""
        self.stopped = True
        for sub in list(self.subscribers):
            sub.close()

    def stop_threadsafe(self) -> None:
        """:meth:`stop`, from any thread (e.g. the one that heard Ctrl-C)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.stop)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        marker: float | None = None
        moved_at = -math.inf
        while not self.stopped:
            try:
                await asyncio.sleep(self.poll_seconds)
                new = await asyncio.to_thread(self.store.change_marker)
                if self.stopped:
                    break
                if new != marker:
                    marker, moved_at = new, time.monotonic()
                    for listener in self.listeners:
                        listener()
                elif time.monotonic() - moved_at > self.slack_seconds:
                    # A change stamped before the newest one but committed after it does
                    # not move the marker: the reads go on for the slack after each move.
                    continue
                if not self.subscribers:
                    # Nobody watches: forget the watermark rather than read what changed.
                    self._watermark = None
                    continue
                await asyncio.sleep(self.settle_seconds)
                await self._publish()
            except Exception as exc:  # the database may be away for a while
                log.warning("live feed: %s", exc)
                await asyncio.sleep(1.0)

    async def _publish(self) -> None:
        changed = await asyncio.to_thread(self._changed)
        if not changed:
            return
        watched = {s.job_id for s in self.subscribers if s.job_id is not None}
        full: dict[str, dict[str, Any]] = {}
        for job in changed:
            if job.id in watched:
                # One read with the history per changed job, shared by all its viewers.
                with contextlib.suppress(JobNotFound):
                    full[job.id] = (await asyncio.to_thread(self.store.get, job.id)).to_json()
        for sub in list(self.subscribers):
            for job in changed:
                if sub.job_id is None and sub.principal.can_see(job):
                    sub.offer(job.to_json(with_events=False))
                elif sub.job_id == job.id and job.id in full and sub.principal.can_see(job):
                    sub.offer(full[job.id])

    def _changed(self) -> list[Job]:
        if self._watermark is None:
            self._watermark = self.store.now() - self.slack_seconds
            self._seen.clear()
        out: list[Job] = []
        since, after_id = self._watermark - self.slack_seconds, None
        while True:
            # Page by page to the newest change: a burst of more changes than one page
            # within the slack would otherwise be read again at every poll, and nothing
            # after it ever (the watermark stays inside the burst).
            found = self.store.jobs_updated_since(since, after_id=after_id,
                                                  limit=self.page)
            for job in found:
                t = job.updated_epoch
                if self._seen.get(job.id) != t:
                    self._seen[job.id] = t
                    out.append(job)
                self._watermark = max(self._watermark, t)
            if len(found) < self.page:
                break
            since, after_id = found[-1].updated_epoch, found[-1].id
        cutoff = self._watermark - self.slack_seconds
        self._seen = {k: v for k, v in self._seen.items() if v >= cutoff}
        return out


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event frame: ``event`` and ``data`` as strict JSON."""
    return f"event: {event}\ndata: ".encode() + json_bytes(data) + b"\n\n"
