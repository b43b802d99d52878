"""The reporter thread: the worker's heartbeat, which renews the leases and carries the
progress and logs; the fleet's sweep of lapsed leases, when this worker is its sweeper.

It has its own engine (the worker's ``hb_store``), so a long step or a busy pipeline
connection cannot starve it. Each tick it asks a job to stop when it ran past its time
limit. Every heartbeat period (busy) it writes one transaction: every lease renewed, the
progress and log lines of the jobs that moved, the worker's row, the sweeper lease (a
refused lease stops its job: another attempt owns it; a cancel requested stops it too). An
idle worker beats every ``idle_heartbeat_seconds`` only. The one worker that holds the
sweeper lease then sweeps the leases that lapsed, unless the ``SweepGuard`` says the
database itself was late.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import TYPE_CHECKING

from spotrun.store import Beat, BeatResult, DatabaseSlow, LeaseLost
from spotrun.worker import refusals
from spotrun.worker.outcome import StopReason
from spotrun.worker.retry import is_db_error

if TYPE_CHECKING:
    from spotrun.worker.loop import Worker
    from spotrun.worker.runner import JobRunner

log = logging.getLogger("spotrun.worker")


class Sweep(enum.Enum):
    """What to do after a heartbeat."""

    SWEEP = "sweep"  # the database answered in time for a whole lease: requeue lapsed jobs
    PROBE = "probe"  # inside the guard: only look whether a sweep would wait on a lock
    SLOW = "slow"  # the heartbeat was slow: no sweep (the guard starts again)


class SweepGuard:
    """Whether a sweep may requeue lapsed jobs, after an outage or a stall.

    After an outage every lease may have lapsed; sweeping before the other workers had a
    full lease to beat again would requeue the jobs of live workers. A call slower than
    ``slow`` counts as an outage: the database, not the workers, was late, and every
    heartbeat waited on it as this one did. Inside the guard the sweep only probes: a
    stall that goes on must keep the guard closed until a lease after it ends.
    """

    def __init__(self, *, lease_seconds: float, heartbeat_seconds: float, now: float) -> None:
        self.lease_seconds = lease_seconds
        self.slow = max(heartbeat_seconds, (lease_seconds - heartbeat_seconds) / 2)
        self.ok_since: float | None = now  # answers in time since then
        self.slow_told = False  # the slowness was logged (once per closed guard)

    def outage(self) -> None:
        """The database was out of reach."""
        self.ok_since = None

    def after_beat(self, started: float, now: float) -> Sweep:
        """A heartbeat started at ``started`` answered at ``now``."""
        if self.ok_since is None:
            self.ok_since = started
        if now - started > self.slow:
            self.ok_since = now
            return Sweep.SLOW
        if now - self.ok_since >= self.lease_seconds:
            self.slow_told = False
            return Sweep.SWEEP
        return Sweep.PROBE

    def sweep_was_slow(self, now: float) -> None:
        """The sweep waited too long on a lock: counted like a slow heartbeat."""
        self.ok_since = now

    def tell_slow(self) -> bool:
        """Whether to log the slowness now (once until the guard opens again)."""
        told, self.slow_told = self.slow_told, True
        return not told


class Reporter:
    """The reporter of a worker: ``run()`` on its thread until ``stop()``."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.store = worker.hb_store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="spotrun-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        name = self.worker.name
        down_since: float | None = None
        last_beat: float | None = None
        tick = min(0.25, self.settings.heartbeat_seconds / 2)
        guard = SweepGuard(lease_seconds=self.settings.lease_seconds,
                           heartbeat_seconds=self.settings.heartbeat_seconds,
                           now=time.monotonic())
        sweeper = False
        was_busy = False  # the last beat carried leases
        while not self._stop.wait(tick):
            now = time.monotonic()
            runners = self.worker.reported_runners()
            try:
                for r in runners:
                    self._check_timeout(r)
                # Busy, or the fleet's sweeper: a beat every heartbeat. Idle: only a sign
                # of life, rarely (the idle cost per worker is what a fleet pays most of).
                period = (self.settings.heartbeat_seconds if runners or sweeper
                          else self.settings.idle_heartbeat_seconds)
                # Gone idle: beat at once, so that the worker's row says idle and a job
                # queued now wakes it (wake-ups pick the idle workers by their rows).
                went_idle = was_busy and not runners
                if last_beat is not None and now - last_beat < period and not went_idle:
                    continue
                last_beat, was_busy = now, bool(runners)
                got = self._beat(runners)
                sweeper = got.sweeper
                answered = time.monotonic()
                sweep = guard.after_beat(now, answered)
                if sweep is Sweep.SLOW:
                    if guard.tell_slow():
                        log.warning("heartbeat of %s: the database took %.1f s to answer; "
                                    "no sweep until it has answered in time for a lease",
                                    name, answered - now)
                elif got.sweeper and got.to_sweep:
                    try:
                        self.store.sweep_expired(within=guard.slow,
                                                 probe=sweep is Sweep.PROBE)
                    except DatabaseSlow as exc:
                        guard.sweep_was_slow(time.monotonic())
                        if guard.tell_slow():
                            log.warning("heartbeat of %s: %s (the database was slow); "
                                        "no sweep until it has answered in time for a "
                                        "lease", name, exc)
                if down_since is not None:
                    log.warning("heartbeat of %s: database reachable again", name)
                    down_since = None
            except Exception as exc:
                if not is_db_error(exc):
                    log.exception("reporter error")
                    continue
                guard.outage()
                sweeper = False
                if down_since is None:
                    down_since = now
                    log.warning("heartbeat of %s: database unreachable (%s); retrying",
                                name, str(exc).splitlines()[0][:200])

    def _check_timeout(self, r: JobRunner) -> None:
        limit = r.job.timeout
        if limit and r.state.stop_reason is None and \
                r.job.run_seconds + r.run_seconds() > limit:
            r.request_stop(StopReason.TIMED_OUT,
                           f"the job ran longer than its time limit of {limit:g} s")

    def _beat(self, runners: list[JobRunner]) -> BeatResult:
        """One heartbeat: the leases, the progress and log lines of the jobs that moved,
        the worker's row, the sweeper lease."""
        beats = [Beat(r.lease, r.state.moved(), r.logs.take()) for r in runners]
        s = self.settings
        stopping = self.worker.coordinator.stopping
        got = self.store.beat(
            self.worker.worker_id, beats, s.lease_seconds,
            alive_for=s.lease_seconds if runners else 3 * s.idle_heartbeat_seconds,
            sweeper=not stopping)
        for r in runners:
            st = got.held.get(r.job.id)
            if st is None and r.state.finishing:
                continue  # its result was written between our snapshot and this heartbeat
            if st is None:
                msg = (f"heartbeat of job {r.job.id} refused: attempt {r.lease.attempt} no "
                       "longer holds the lease")
                refusals.record(LeaseLost(msg, write="heartbeat", job_id=r.job.id,
                                          attempt=r.lease.attempt))
                log.warning("%s; stopping it", msg)
                r.request_stop(StopReason.LEASE_LOST, msg)
            elif st:
                r.request_stop(StopReason.CANCELLED, "cancel requested")
        return got
