"""The worker's main loop: claim jobs, hear notices, stop in time, exit with a code.

Threads of a worker process:

- the main thread: the claim loop (``Worker``), and on a notice the stop path with its
  deadline; it also ends a job whose step ignores a cancel or time limit (hung);
- one runner thread per running job (``runner.py``): the pipeline runs there, so the main
  thread never sits inside a long C call and always hears a notice in time;
- the reporter thread (``reporter.py``): renews leases, flushes progress and logs, sweeps
  expired leases, on its own engine.

What a stopped job writes is decided in ``outcome.py``; the worker talks to the store, the
checkpoint store and the shutdown coordinator, and never speaks SQL.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable

from spotrun import kube
from spotrun.checkpoints import CheckpointStore
from spotrun.config import Settings
from spotrun.shutdown import Notice, ShutdownCoordinator, flush_logs
from spotrun.store import (
    ClaimRequest,
    DatabaseUnavailable,
    JobRecord,
    JobStore,
    Lease,
    LeaseLost,
    Waker,
)
from spotrun.worker import memory, refusals
from spotrun.worker.outcome import UNWAITED, StopReason
from spotrun.worker.reporter import Reporter
from spotrun.worker.retry import Retrier, is_db_error
from spotrun.worker.runner import JobRunner

log = logging.getLogger("spotrun.worker")

# The exit status of a worker that left a pipeline thread it could not stop.
EXIT_STUCK = 3

# After a notice the stop path waits for its jobs to reach a step boundary, but not to the
# deadline itself: ending a job still stuck (in a step, or in a pipeline's start such as a
# slow import) is a write to the database too, and it must land inside the budget. The
# wait ends this long before the deadline, at most this share of the budget.
HAND_BACK_RESERVE_SECONDS = 1.5
HAND_BACK_RESERVE_SHARE = 0.2


def hand_back_reserve(budget: float) -> float:
    """Seconds of a notice's budget kept for ending the jobs that did not stop in time."""
    return min(HAND_BACK_RESERVE_SECONDS, max(0.0, budget) * HAND_BACK_RESERVE_SHARE)


def detect_cuda() -> bool:
    """Whether this worker can run CUDA jobs, without importing torch on CPU machines."""
    forced = os.environ.get("SPOTRUN_WORKER_CUDA")
    if forced:
        return forced.lower() in ("1", "true", "yes")
    if not os.path.exists("/dev/nvidiactl") or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


class Worker:
    """A worker process's main loop. ``run()`` returns the process's exit code."""

    def __init__(self, settings: Settings, *, name: str | None = None, concurrency: int = 1,
                 coordinator: ShutdownCoordinator | None = None, pool: str | None = None,
                 store: JobStore | None = None, max_jobs: int | None = None,
                 exit_at_deadline: bool = False) -> None:
        self.settings = settings
        # A process of its own (the CLI's) may end itself at a notice's deadline.
        self.exit_at_deadline = exit_at_deadline
        self._deadline_armed = False
        # The exit code once every job is handed back (or could not be): from then on
        # the deadline's exit is no failure (see _exit_at_deadline).
        self._handed_back: int | None = None
        self._stopped = threading.Event()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.concurrency = max(1, concurrency)
        self.pool = pool or settings.pool
        self.max_jobs = max_jobs
        self.coordinator = coordinator or ShutdownCoordinator(
            grace_seconds=settings.grace_seconds, safety_margin=settings.safety_margin_seconds)
        self.store = store or self._open_store(settings)
        # The reporter's own engine: its heartbeats never wait on a pipeline's connection.
        self.hb_store = self.store.reopen(pool_size=1, pre_ping=False,
                                          statement_timeout=self._statement_timeout(settings))
        self.checkpoints = CheckpointStore(settings.checkpoint_url)
        self.has_cuda = detect_cuda()
        self.db = Retrier(f"worker {self.name}")
        self.runners: dict[str, JobRunner] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.reporter = Reporter(self)
        self.worker_id = ""
        self.claimed = 0
        self.exit_code = 0  # EXIT_STUCK once a pipeline thread could not be stopped

    def _open_store(self, settings: Settings) -> JobStore:
        """Wait for the database at start: a replacement may boot during an outage."""
        delay, logged = 0.1, False
        while True:
            try:
                # No pre-ping: a round trip per transaction; the retrier covers restarts.
                # One connection a job slot (claims, results, checkpoints, events: the
                # reporter has its own), more only for a moment when threads overlap.
                return JobStore.open(settings.database_url, pool_size=self.concurrency,
                                     pre_ping=False,
                                     statement_timeout=self._statement_timeout(settings))
            except DatabaseUnavailable as exc:
                if self.coordinator.stopping:
                    raise
                if not logged:
                    log.warning("%s; retrying with backoff", exc)
                    logged = True
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    @staticmethod
    def _statement_timeout(settings: Settings) -> float:
        # A call that waits longer than a lease has lost the lease anyway.
        return max(1.0, settings.lease_seconds)

    def wake(self) -> None:
        self._wake.set()

    def deadline(self) -> float | None:
        n = self.coordinator.notice
        return None if n is None else n.deadline_mono

    # --------------------------------------------------------------------- run

    def run(self) -> int:
        if self.settings.job_memory_gb is not None:
            limit = memory.apply_limit(self.settings.job_memory_gb, has_cuda=self.has_cuda)
            log.info("worker %s: jobs may use %g GB (address space limited to %.1f GB)",
                     self.name, self.settings.job_memory_gb, limit / memory.GB)
        self.worker_id = self.db.call(lambda: self.store.register_worker(
            name=self.name, host=socket.gethostname(), pid=os.getpid(), pool=self.pool,
            has_cuda=self.has_cuda, lease_seconds=self.settings.lease_seconds,
            price_per_hour=self.settings.price_per_hour))
        log.info("worker %s (%s) ready: pool %s, lease %.1f s, heartbeat %.1f s%s",
                 self.name, self.worker_id, self.pool, self.settings.lease_seconds,
                 self.settings.heartbeat_seconds, ", CUDA" if self.has_cuda else "")
        # In this order: the deadline armed first and the jobs told to stop next, so that
        # nothing a later listener may wait on (the stores' bounds register on their
        # engines) can delay either. Seen in the chaos drills: a worker noticed just after
        # its start reached neither its hand-back nor its deadline's exit in the grace.
        self.coordinator.on_notice(self._arm_deadline)
        self.coordinator.on_notice(self._on_notice)
        self.coordinator.on_notice(self._bound_waits)
        self.coordinator.on_advisory(self._on_advisory)
        self.reporter.start()
        # A worker of one job slot listens on its claims' connection: two connections in
        # all, the reporter's and that one (the pool is the claim loop's while idle).
        waker = self.store.waker(self.worker_id, shared=self.concurrency == 1)
        # In a Kubernetes pod: scale-downs take idle workers first (kube.py).
        pod_cost = kube.keep_deletion_cost(self.unsaved_seconds)
        try:
            try:
                self._claim_loop(waker)
            finally:
                waker.close()
            return self._stop()
        finally:
            self._stopped.set()
            if pod_cost is not None:
                pod_cost.stop()

    def unsaved_seconds(self) -> list[float]:
        """Seconds since each running job's last checkpoint: what a kill would redo."""
        now = time.monotonic()
        with self._lock:
            return [now - r.state.checkpoint_mono for r in self.runners.values()
                    if not r.state.done.is_set()]

    def _bound_waits(self, notice: Notice) -> None:
        """From a notice on, no wait on the database may outlast the budget.

        SQLite waits for a lock up to a short share of the budget. A link that blackholes
        (no reset, no reply: a partitioned network, a dead NAT entry) would hold a call on
        PostgreSQL for as long as TCP takes to give up, minutes: at the deadline the
        process exits non-zero instead, and the leases bring its jobs back.
        """
        for st in (self.store, self.hb_store):
            st.bound_lock_waits(max(0.1, self.coordinator.time_left() / 4))

    def _arm_deadline(self, notice: Notice) -> None:
        """Start the thread that exits the process at the deadline (see _bound_waits)."""
        if self.exit_at_deadline and not self._deadline_armed:
            self._deadline_armed = True
            threading.Thread(target=self._exit_at_deadline, name="spotrun-deadline",
                             daemon=True).start()

    def _exit_at_deadline(self) -> None:
        # Half the safety margin past the deadline: the stop path had its whole budget.
        while not self._stopped.wait(max(0.0, self.coordinator.time_left()
                                         + self.settings.safety_margin_seconds / 2)):
            if self.coordinator.time_left() + self.settings.safety_margin_seconds / 2 > 0:
                continue  # a later notice moved the deadline
            done = self._handed_back
            if done is not None:
                # Only the stop path's last steps (hooks, the worker's row) were left.
                log.warning("worker %s: its jobs are handed back; exiting at the deadline "
                            "before the rest of its stop", self.name)
                flush_logs()
                os._exit(done | self.exit_code)
            with self._lock:
                held = [r.job.id for r in self.runners.values() if not r.state.done.is_set()]
            log.error("worker %s: the database did not answer before the deadline; exiting "
                      "now: the lease will expire and bring back %s", self.name,
                      ", ".join(held) if held else "its jobs")
            flush_logs()
            os._exit(1)

    def _claim_loop(self, waker: Waker) -> None:
        # One request id until a claim is known to have happened or not: a retry after a
        # lost reply must find the job that claim took, not take another.
        pending: ClaimRequest | None = None
        while not self.coordinator.stopping:
            if self.max_jobs is not None and self.claimed >= self.max_jobs and \
                    not self.runners:
                return
            self._reap()
            self._check_hung()
            if len(self.runners) >= self.concurrency or (
                    self.max_jobs is not None and self.claimed >= self.max_jobs):
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            if pending is None:
                with self._lock:
                    holding = bool(self.runners)  # reaped above: the live ones
                pending = self._claim_request(holding=holding)
            try:
                claimed = self.db.call(functools.partial(self._claim_one, pending, waker),
                                       give_up_at=time.monotonic() + 2)
                pending = None
            except Exception as exc:
                if not is_db_error(exc):
                    raise
                claimed = False
            if not claimed:
                self._idle_wait(waker)

    def _idle_wait(self, waker: Waker) -> None:
        """Wait for work: until the waker hears that the queue changed, a runner or a
        notice wakes this loop, or the fallback poll is due.

        The fallback is jittered around ``idle_poll_seconds`` so that a fleet's idle
        workers do not poll in step; it is what a worker costs the database while idle
        (a wake-up costs nothing until it comes). While the database is down, a retry a
        second.
        """
        if self.db.down_since is not None:
            wait = 1.0
        else:
            wait = self.settings.idle_poll_seconds * random.uniform(0.5, 1.5)
        until = time.monotonic() + wait
        while not self.coordinator.stopping and not self._wake.is_set():
            left = until - time.monotonic()
            if left <= 0 or waker.wait(min(left, 0.25)):
                break
        self._wake.clear()

    def _claim_one(self, request: ClaimRequest, waker: Waker) -> bool:
        if self.coordinator.stopping:
            return False
        got = self.store.claim(**request.params())
        if got is None:
            return False
        with self._lock:
            self.claimed += 1
        waker.busy()  # before the job's thread takes the connection the waker listens on
        self.add_runner(*got).start()
        return True

    def _claim_request(self, *, holding: bool) -> ClaimRequest:
        """A claim with a new request id; ``holding``: the worker runs another job."""
        return ClaimRequest(self.worker_id, self.name, self.settings.lease_seconds,
                            self.has_cuda, self.pool, secrets.token_hex(16),
                            idle_if_empty=not holding)

    def reserve_claim(self, finishing: JobRunner) -> ClaimRequest | None:
        """A claim for ``finishing``, a runner writing its outcome, to make in the same
        write, unless this worker takes no more jobs."""
        with self._lock:
            if self.coordinator.stopping or (
                    self.max_jobs is not None and self.claimed >= self.max_jobs):
                return None
            self.claimed += 1  # reserved: given back if nothing was claimed
            holding = any(r is not finishing and not r.state.done.is_set()
                          for r in self.runners.values())
        return self._claim_request(holding=holding)

    def release_claim(self, request: ClaimRequest | None) -> None:
        if request is not None:
            with self._lock:
                self.claimed -= 1

    def add_runner(self, lease: Lease, job: JobRecord) -> JobRunner:
        """The runner of a claimed job, registered: the caller starts it, or a finishing
        runner runs it next on its own thread."""
        runner = JobRunner(self, lease, job)
        with self._lock:
            self.runners[job.id] = runner
        if self.coordinator.stopping:
            # A notice arrived while we claimed: the runner hands the job straight back.
            runner.request_stop(self._reason_for(self.coordinator.notice))
        return runner

    def _reap(self) -> None:
        with self._lock:
            for job_id in [j for j, r in self.runners.items() if r.state.done.is_set()]:
                del self.runners[job_id]

    # ------------------------------------------------------------------ notice

    @staticmethod
    def _reason_for(notice: Notice | None) -> StopReason:
        if notice is not None and (notice.source == "worker" or (
                notice.source == "signal" and notice.reason == "SIGINT")):
            return StopReason.SHUTDOWN
        return StopReason.PREEMPTED

    def _on_notice(self, notice: Notice) -> None:
        # Called from the thread that heard the notice: only raise flags here.
        reason = self._reason_for(notice)
        with self._lock:
            runners = list(self.runners.values())
        for r in runners:
            r.request_stop(reason, notice.reason)
        self.wake()

    def _on_advisory(self, reason: str) -> None:
        # Elevated risk (e.g. an AWS rebalance recommendation): checkpoint at the next
        # step boundary, and keep working.
        with self._lock:
            runners = list(self.runners.values())
        for r in runners:
            r.state.ask_checkpoint()

    def _stop(self) -> int:
        """Wait for the runners to hand back, up to the deadline; then hooks; exit code."""
        notice = self.coordinator.notice
        code = 0
        if notice is not None:
            try:
                self.db.call(lambda: self.store.set_worker_state(self.worker_id, "stopping"),
                             give_up_at=time.monotonic() + 0.5)
            except Exception as exc:
                # Handing the jobs back matters more than showing "stopping".
                log.warning("could not mark worker %s stopping: %s", self.name,
                            str(exc).splitlines()[0][:200])
            reserve = hand_back_reserve(notice.deadline_mono - notice.received_mono)
            runners = self._wait_runners(lambda: self._deadline() - reserve)
            for r in runners:
                if r.state.abandoned:
                    continue  # already ended without its stuck thread
                if not r.state.done.is_set():
                    code |= self._force_stop(
                        r, r.state.stop_reason or self._reason_for(notice),
                        give_up_at=max(time.monotonic() + 0.2, self._deadline()))
                elif r.state.write_failed:
                    code |= 1
            self._handed_back = code
        else:
            self._wait_runners(None)
        self.reporter.stop()
        code |= self.exit_code
        if notice is not None:
            outcome = self.coordinator.run_hooks()
            if outcome:
                log.info("shutdown hooks: %s", ", ".join(f"{k} {v}" for k, v in
                                                          outcome.items()))
        # Showing "stopped" is worth a second, but after a notice not the deadline's exit.
        give_up = time.monotonic() + 1.0
        if notice is not None:
            give_up = min(give_up, max(time.monotonic() + 0.1, self._deadline()))
        try:
            self.db.call(lambda: self.store.set_worker_state(self.worker_id, "stopped"),
                         give_up_at=give_up)
        except Exception:
            log.warning("could not mark worker %s stopped", self.name)
        if notice is not None:
            log.info("worker %s exits %.2f s after the notice (%s)", self.name,
                     time.monotonic() - notice.received_mono, notice.reason)
        return code

    def _deadline(self) -> float:
        """The notice's deadline (monotonic; a later notice may bring it forward)."""
        d = self.deadline()
        return float("inf") if d is None else d

    def _wait_runners(self, until: Callable[[], float] | None) -> list[JobRunner]:
        """Wait for every runner, including one a finishing runner started meanwhile, up
        to ``until()`` (monotonic, read again as the wait goes on)."""
        seen: list[JobRunner] = []
        while True:
            with self._lock:
                new = [r for r in self.runners.values()
                       if r not in seen and not r.state.abandoned]
            if not new:
                return seen
            for r in new:
                if until is None:
                    r.state.done.wait()
                    continue
                while not r.state.done.is_set() and (left := until() - time.monotonic()) > 0:
                    r.state.done.wait(min(left, 0.5))  # until() may move: read it again
            seen += new

    def _force_stop(self, r: JobRunner, reason: StopReason, *,
                    give_up_at: float | None = None) -> int:
        """End a job whose pipeline is stuck in a step, by the policy of a step boundary.

        From here on the runner is abandoned: the reporter no longer renews its lease and
        nothing the pipeline does later reaches the store.
        """
        r.state.abandon()
        if r.ctx is not None and r.ctx.on_abandon is not None:
            # Work outside this process (a command job's program) ends with the job here.
            try:
                r.ctx.on_abandon()
            except Exception as exc:
                log.warning("job %s: could not end its work: %s", r.job.id, exc)
        if reason is StopReason.LEASE_LOST:
            return 0  # another attempt owns the job: nothing of this one may be written
        out = r.outcome(in_flight=True, reason=reason)
        try:
            r.apply(out, self.hb_store,
                    give_up_at=time.monotonic() + 1.0 if give_up_at is None else give_up_at,
                    forced=self.coordinator.stopping)
            return 0
        except LeaseLost as exc:
            refusals.record(exc)
            log.warning("job %s: %s", r.job.id, exc)
            return 0
        except Exception as exc:
            log.error("job %s: could not record its stop before the deadline (%s); its lease "
                      "will expire and bring it back", r.job.id, exc)
            return 1

    def _check_hung(self) -> None:
        """A cancel or a time limit the pipeline ignores past the grace period.

        Its thread cannot be stopped, so the job ends without it, and the worker stops:
        it hands its other jobs back and exits non-zero, for its supervisor to start a
        fresh one in its place.
        """
        grace = self.settings.grace_seconds
        now = time.monotonic()
        with self._lock:
            hung = [r for r in self.runners.values() if r.state.hung(grace, now)]
        for r in hung:
            reason = r.state.stop_reason
            assert reason is not None
            log.error("job %s: the pipeline did not stop within %.1f s (SPOTRUN_GRACE_SECONDS) "
                      "after its %s, stuck at %s; ending the job without it", r.job.id, grace,
                      UNWAITED[reason], r.where())
            self._force_stop(r, reason)
            self.exit_code = EXIT_STUCK
        if hung and not self.coordinator.stopping:
            log.error("worker %s: a pipeline thread is stuck and cannot be stopped; handing "
                      "back the other jobs and exiting %d so that a supervisor starts a "
                      "fresh worker", self.name, EXIT_STUCK)
            self.coordinator.notify("a pipeline thread is stuck", source="worker")

    def reported_runners(self) -> list[JobRunner]:
        """The runners whose leases the reporter renews (a snapshot)."""
        with self._lock:
            return [r for r in self.runners.values() if r.state.reported()]
