"""The worker: claim, run, heartbeat, checkpoint, hand back, complete.

Threads of a worker process:

- the main thread: the claim loop, and on a notice the stop path with its deadline;
- one runner thread per running job: the pipeline runs there (so the main thread never
  sits inside a long C call and always hears a notice in time);
- the reporter thread: renews leases, flushes progress and logs, sweeps expired leases.
  It has its own engine, so a long step or a busy pipeline connection cannot starve it.

The worker talks to the store, the checkpoint store and the shutdown coordinator; it never
speaks SQL.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib.util
import logging
import os
import secrets
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from spotrun import kube
from spotrun.checkpoints import (
    CheckpointCorrupt,
    CheckpointStore,
    CheckpointUnavailable,
    Loaded,
    Saved,
)
from spotrun.config import Settings
from spotrun.jobs import EventKind, JobState, OnPreempt, Progress
from spotrun.pipelines.base import JobContext, JobStopped, Pipeline, State
from spotrun.policy import ON_DEMAND
from spotrun.shutdown import Notice, ShutdownCoordinator
from spotrun.store import (
    ClaimRequest,
    DatabaseSlow,
    DatabaseUnavailable,
    JobRecord,
    JobStore,
    Lease,
    LeaseLost,
    Waker,
)

log = logging.getLogger("spotrun.worker")

T = TypeVar("T")

LOG_LINES_PER_ATTEMPT = 2000
LOG_BYTES_PER_ATTEMPT = 256_000
PROGRESS_FLUSH_SECONDS = 0.5
# The exit status of a worker that left a pipeline thread it could not stop.
EXIT_STUCK = 3


class StopReason(enum.Enum):
    PREEMPTED = "preempted"  # a notice: SIGTERM or a cloud's metadata service
    SHUTDOWN = "shutdown"  # the operator stopped the worker (SIGINT)
    CANCELLED = "cancelled"
    TIMED_OUT = "timed out"
    LEASE_LOST = "lease lost"


_NOTICES = (StopReason.PREEMPTED, StopReason.SHUTDOWN)
# Stops that no notice's deadline bounds: a pipeline that ignores one past the grace period
# is abandoned (the words name the stop in the worker's log). Not a lost lease: nothing of
# that job can be written any more, and a zombie's slow step (an import of torch on a
# loaded machine) must not cost its worker a restart.
_UNWAITED = {StopReason.CANCELLED: "cancel", StopReason.TIMED_OUT: "time limit"}


@dataclass(frozen=True)
class StopOutcome:
    """What to write for a job that stopped: one of the store's final or hand-back writes."""

    action: str  # "hand_back", "fail" or "cancel"
    message: str
    preempted: bool = False  # counts in the job's preemptions (and may escalate it)
    keep_checkpoint: bool = True
    cleanup: bool = False  # the job ended or restarts: its checkpoint files can go


def stop_outcome(reason: StopReason, policy: OnPreempt, *, worker: str, where: str,
                 detail: str = "", resume: str = "", in_flight: bool = False,
                 unwinding: str | None = None) -> StopOutcome:
    """The one policy for a job stopped on purpose, at a step boundary or not.

    ``resume`` says what the next attempt resumes from; ``in_flight``: the pipeline never
    reached a step boundary (the deadline, or a hung step, forced the stop); ``unwinding``:
    the error the pipeline raised while it unwound after the stop was asked for. Only a
    preemption (SIGTERM, a cloud's notice) applies ``on_preempt``; SIGINT is an operator
    stopping the worker and hands the job back whatever its policy.
    """
    at = f"at {where}" + (" before the step in flight finished" if in_flight else "")
    tail = f"; the pipeline raised {unwinding} while it unwound" if unwinding else ""
    if reason is StopReason.CANCELLED:
        return StopOutcome("cancel", "cancelled at the user's request" + tail, cleanup=True)
    if reason is StopReason.TIMED_OUT:
        hung = "; the step in flight never returned" if in_flight else ""
        return StopOutcome("fail", f"stopped {'at ' + where}: {detail}{hung}{tail}",
                           cleanup=True)
    if reason is StopReason.SHUTDOWN:
        return StopOutcome("hand_back", f"worker {worker} was stopped {at}; {resume}{tail}")
    if policy is OnPreempt.FAIL:
        return StopOutcome("fail", f"the machine running this job ({worker}) was preempted "
                           f"{at}; this job asked not to be resumed (on_preempt=fail), so it "
                           f"was stopped{tail}", cleanup=True)
    if policy is OnPreempt.RESTART:
        return StopOutcome("hand_back", f"preempted on {worker} {at}; it will restart from "
                           f"the beginning (on_preempt=restart){tail}", preempted=True,
                           keep_checkpoint=False, cleanup=True)
    return StopOutcome("hand_back", f"preempted on {worker} {at}; {resume}{tail}",
                       preempted=True)


def seconds(x: float) -> str:
    """A duration as people read it: 0.004 s, 0.12 s, 3.4 s."""
    return f"{x:.3f} s" if x < 0.1 else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def detect_cuda() -> bool:
    """Whether this worker can run CUDA jobs, without importing torch on CPU machines."""
    forced = os.environ.get("SPOTRUN_WORKER_CUDA")
    if forced:
        return forced.lower() in ("1", "true", "yes")
    if not os.path.exists("/dev/nvidiactl") or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _is_db_error(exc: BaseException) -> bool:
    return isinstance(exc, DatabaseUnavailable)


class _Retrier:
    """Retries database calls with backoff, logging an outage once and its end once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down_since: float | None = None

    def call(self, fn: Callable[[], T], *, give_up_at: float | None = None) -> T:
        delay = 0.1
        while True:
            try:
                value = fn()
            except Exception as exc:
                if not _is_db_error(exc):
                    raise
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("%s: database unreachable (%s); retrying with backoff",
                                self.what, str(exc).splitlines()[0][:200])
                if give_up_at is not None and time.monotonic() + delay > give_up_at:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self.down_since is not None:
                log.warning("%s: database reachable again after %.1f s", self.what,
                            time.monotonic() - self.down_since)
                self.down_since = None
            return value


class _JobLogHandler(logging.Handler):
    """Buffers a job's log lines, bounded in size, until the reporter writes them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str, str]] = []
        self.count = 0
        self.nbytes = 0
        self.truncated = False
        self._lock2 = threading.Lock()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        with self._lock2:
            if self.truncated:
                return
            if self.count >= LOG_LINES_PER_ATTEMPT or self.nbytes + len(msg) > \
                    LOG_BYTES_PER_ATTEMPT:
                self.truncated = True
                self.lines.append((record.created, "WARNING",
                                   "log truncated: this attempt wrote more than the "
                                   f"{LOG_LINES_PER_ATTEMPT} lines / "
                                   f"{LOG_BYTES_PER_ATTEMPT // 1000} kB kept per attempt"))
                return
            self.count += 1
            self.nbytes += len(msg)
            self.lines.append((record.created, record.levelname, msg))

    def take(self) -> list[tuple[float, str, str]]:
        with self._lock2:
            lines, self.lines = self.lines, []
        return lines


@dataclass
class _Checkpointed:
    step: int
    path: str
    seconds: float
    reused: bool = False  # committed at this step already (periodic), not written again


class JobRunner:
    """Runs one claimed job on its own thread; implements the pipeline's Driver."""

    def __init__(self, worker: Worker, lease: Lease, job: JobRecord) -> None:
        self.worker = worker
        self.store = worker.store
        self.lease = lease
        self.job = job
        self.started = time.monotonic()
        self.step = job.progress.step
        self.total = job.progress.total
        self.metrics: dict[str, Any] = {}
        self.dirty = False
        self.last_flush = 0.0
        self.stop_reason: StopReason | None = None
        self.stop_detail = ""
        self.stop_mono: float | None = None  # when the stop was asked for
        self.notice_checkpoint: _Checkpointed | None = None
        self.last_checkpoint_step: int | None = job.checkpoint_step
        self.committed_path: str | None = job.checkpoint  # the job's current pointer
        self.last_checkpoint_mono = time.monotonic()
        self.abandoned = False  # the main thread handed the job back without us
        self.early_checkpoint = False  # an advisory asked for a checkpoint now
        self.checkpoint_error: str | None = None  # the notice checkpoint could not be saved
        # Set before the final write: from then on the reporter leaves this job alone, so
        # a heartbeat racing the result is not mistaken for a lost lease.
        self.finishing = False
        self.write_failed = False  # a write of the stop path could not reach the database
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.logs = _JobLogHandler()
        # Not logging.getLogger: that registers every job's logger for the life of the
        # process, a leak in a worker that runs millions of jobs.
        # The level is set here: Logger.setLevel clears every logger's cache under the
        # logging module's lock, once per job.
        self.logger = logging.Logger(f"spotrun.job.{job.id}", logging.INFO)
        self.every_steps = job.checkpoint_every_steps
        if self.every_steps is None:
            self.every_steps = worker.settings.checkpoint_every_steps
        # A fixed period if the job or the worker's settings ask for one, else Young/Daly.
        fixed = job.checkpoint_every_seconds
        if fixed is None:
            fixed = worker.settings.checkpoint_every_seconds
        self.adaptive = fixed is None
        self.every_seconds: float = fixed or worker.settings.checkpoint_max_seconds
        self.checkpoint_cost: float | None = None
        self.interval_set = False
        # Files of this job may exist in the checkpoint store: an earlier attempt may have
        # written some (with or without a pointer), or this one did.
        self.may_have_files = lease.attempt > 1 or job.checkpoint is not None
        self.successor: JobRunner | None = None  # claimed by this runner's final write
        self.ctx: JobContext | None = None
        self.model_saved = False  # the pipeline wrote a final model (of this attempt)
        self.won = False  # the store accepted this attempt's result

    # ------------------------------------------------------------- Driver API

    def report(self, step: int, total: int | None, metrics: dict[str, Any]) -> None:
        with self.lock:
            self.step, self.total, self.metrics, self.dirty = step, total, metrics, True

    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def checkpoint_due(self, step: int) -> bool:
        if self.stop_reason in _NOTICES:
            return (self.job.on_preempt is OnPreempt.RESUME and self.notice_checkpoint is None
                    and self.checkpoint_error is None and not self.abandoned)
        if self.stop_reason is not None or step == self.last_checkpoint_step or step == 0:
            return False
        if self.early_checkpoint:
            self.early_checkpoint = False
            return True
        if self.adaptive and not self.interval_set and \
                self.run_seconds() >= self.worker.settings.checkpoint_min_seconds:
            # Only jobs that run long enough to need a periodic checkpoint pay for choosing
            # its interval; the choice is explained once, on the job's first attempt.
            self.interval_set = True
            self._set_interval(explain=self.lease.attempt == 1)
        if self.every_steps and self.last_checkpoint_step is not None and \
                step - self.last_checkpoint_step >= self.every_steps:
            return True
        if self.every_steps and self.last_checkpoint_step is None and step >= self.every_steps:
            return True
        return bool(self.every_seconds) and \
            time.monotonic() - self.last_checkpoint_mono >= self.every_seconds

    def checkpoint(self, state: State) -> None:
        """Save and commit a checkpoint; a failure is the worker's, never the pipeline's."""
        notice = self.stop_reason in _NOTICES
        try:
            self._checkpoint(state, notice)
        except LeaseLost as exc:
            log.warning("job %s: %s; stopping it", self.job.id, exc)
            self.request_stop(StopReason.LEASE_LOST, str(exc))
        except Exception as exc:
            # The job goes on (or is handed back) with its previous checkpoint.
            log.warning("job %s: checkpoint at step %d failed: %s: %s", self.job.id,
                        state.step, type(exc).__name__, exc)
            if notice:
                self.checkpoint_error = f"{type(exc).__name__}: {exc}"[:300]
            else:
                self.last_checkpoint_mono = time.monotonic()  # retry after a period

    def _checkpoint(self, state: State, notice: bool) -> None:
        if state.step == self.last_checkpoint_step and self.committed_path is not None \
                and state.directory is None:
            # The checkpoint of this very step is committed already (a periodic one, then
            # the notice at the same boundary): it is the notice's checkpoint. Writing it
            # again would rewrite files a pointer names. (A directory's files may have
            # changed at the same step, a command job's above all: each of its commits
            # gets a path of its own instead.)
            if notice:
                self.notice_checkpoint = _Checkpointed(state.step, self.committed_path, 0.0,
                                                       reused=True)
            return
        start = time.perf_counter()
        self.may_have_files = True
        if state.directory is not None:
            saved = self.worker.checkpoints.save_dir(
                self.lease.job_id, self.lease.attempt, state.step, state.directory, state.meta,
                final=state.directory_final)
        else:
            saved = self.worker.checkpoints.save(self.lease.job_id, self.lease.attempt,
                                                 state.step, state.files, state.meta)
        # The pointer moves only after the manifest is written; a refused write means a
        # newer attempt owns the job, and our files are left for its cleanup.
        message = None if notice else (
            f"checkpoint at step {state.step} saved in {seconds(saved.seconds)}")
        dropped = self.worker.db.call(lambda: self.store.commit_checkpoint(
            self.lease, saved.path, state.step, message=message),
            give_up_at=self.worker.deadline() if notice else None)
        elapsed = time.perf_counter() - start
        if self.checkpoint_cost is None and self.adaptive:
            self.checkpoint_cost = elapsed
            if self.interval_set:
                self._set_interval(explain=False)
        self.last_checkpoint_step = state.step
        self.committed_path = saved.path
        self.last_checkpoint_mono = time.monotonic()
        if notice:
            self.notice_checkpoint = _Checkpointed(state.step, saved.path, elapsed)
        if dropped and dropped != saved.path:
            with contextlib.suppress(Exception):
                self.worker.checkpoints.delete(dropped)

    def note(self, message: str) -> None:
        self.worker.db.call(functools.partial(
            self.store.add_event, self.lease, EventKind.NOTE, message))

    def save_model(self, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> Saved:
        # Under this attempt's own path: it becomes the job's model only if this attempt's
        # result is accepted, so a zombie can never overwrite the model of a finished job.
        self.model_saved = True
        return self.worker.checkpoints.save_model(self.lease.job_id, files, meta,
                                                  attempt=self.lease.attempt)

    def load_model(self, job_id: str) -> Loaded:
        # The submit checked that the caller may use this model; checked again here, as
        # the caller, so that no path (an old row, a plugin's own param) reaches another
        # user's model. An operator's job (no owner) may load any.
        other = self.worker.db.call(lambda: self.store.find(job_id))
        if other is None or (self.job.owner is not None and other.owner != self.job.owner):
            raise LookupError(f"no job with id {job_id!r}")
        return self.worker.checkpoints.load_model(job_id, other.attempt)

    def read_input(self, path: str) -> bytes:
        return self.worker.checkpoints.read_input(path)

    # ------------------------------------------------------------------ control

    def _set_interval(self, *, explain: bool) -> None:
        """Young/Daly from this job's checkpoint cost and its pool's interruptions."""
        from spotrun.policy import checkpoint_interval

        s = self.worker.settings
        lived, hits = self.worker.db.call(
            lambda: self.store.analytics.pool_interruptions(self.worker.pool))
        chosen = checkpoint_interval(checkpoint_seconds=self.checkpoint_cost,
                                     lived_seconds=lived, interruptions=hits,
                                     lo=s.checkpoint_min_seconds, hi=s.checkpoint_max_seconds)
        self.every_seconds = chosen.seconds
        if explain:
            self.worker.db.call(functools.partial(
                self.store.add_event, self.lease, EventKind.NOTE, chosen.summary,
                detail=chosen.explanation))

    def request_stop(self, reason: StopReason, detail: str = "") -> None:
        with self.lock:
            if self.stop_reason is None:
                self.stop_reason, self.stop_detail = reason, detail
                self.stop_mono = time.monotonic()
                if reason is not StopReason.PREEMPTED:
                    log.info("job %s: stopping (%s) %s", self.job.id, reason.value, detail)

    def run_seconds(self) -> float:
        return time.monotonic() - self.started

    def where(self) -> str:
        return f"step {self.step}/{self.total}" if self.total else f"step {self.step}"

    def start(self) -> None:
        """Run this job, then any job chained to it, on a new thread."""
        threading.Thread(target=self._run_chain, name=f"spotrun-job-{self.job.id}",
                         daemon=True).start()

    def _run_chain(self) -> None:
        # A chained job runs on its predecessor's thread: no thread to start per job.
        runner: JobRunner | None = self
        while runner is not None:
            threading.current_thread().name = f"spotrun-job-{runner.job.id}"
            runner._main()
            runner = runner.successor

    # -------------------------------------------------------------------- body

    def _main(self) -> None:
        self.logger.addHandler(self.logs)
        self.logger.propagate = False
        try:
            self._run()
        except LeaseLost as exc:
            log.warning("job %s: %s; stopping it", self.job.id, exc)
        except Exception as exc:
            if _is_db_error(exc):
                # The database is out of reach: the lease will expire and bring the job
                # back; the process must not claim it handed the job back.
                self.write_failed = True
                log.error("job %s: could not reach the database to record the outcome (%s); "
                          "its lease will expire and bring it back", self.job.id,
                          str(exc).splitlines()[0][:200])
                return
            # A fault of this worker, not of the pipeline: end the job rather than let
            # its lease expire and loop through every worker with the same fault.
            log.exception("job %s: worker error", self.job.id)
            with contextlib.suppress(Exception):
                # The job's user reads its error: the worker's own words (which may name
                # hosts, paths, endpoints) and traceback stay in the worker's log.
                self.store.fail(self.lease, f"worker {self.lease.worker_name} could not run "
                                f"the job ({type(exc).__name__}; the worker's log has the "
                                "details)", None, run_seconds=self.run_seconds())
        finally:
            self.logger.removeHandler(self.logs)
            self._settle_model()
            self.done.set()
            if self.successor is None:  # else the successor took over this one's slot
                self.worker.wake()

    def _run(self) -> None:
        from spotrun.pipelines.registry import get as get_pipeline

        pipe = get_pipeline(self.job.pipeline)
        params = pipe.validate(self.job.params)
        state_dir: Path | None = None
        if pipe.state_dir:
            state_dir = self._make_state_dir()
        try:
            self._run_pipeline(pipe, params, state_dir)
        finally:
            if state_dir is not None:
                shutil.rmtree(state_dir.parent, ignore_errors=True)

    def _make_state_dir(self) -> Path:
        """An empty local directory for this attempt's directory state."""
        work = self.worker.settings.home / "work" / f"{self.job.id}-a{self.lease.attempt:04d}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "checkpoint").mkdir(parents=True)
        return work / "checkpoint"

    def _run_pipeline(self, pipe: Pipeline, params: Any, state_dir: Path | None) -> None:
        try:
            if state_dir is None:
                resume = self._load_resume()
            else:
                restore = functools.partial(self.worker.checkpoints.restore_dir,
                                            dest=state_dir)
                resume = self._load_resume(restore)
        except CheckpointUnavailable as exc:
            self._store_unavailable(str(exc))
            return
        ctx = JobContext(job_id=self.job.id, attempt=self.lease.attempt, params=params,
                         driver=self, resume=resume, logger=self.logger,
                         worker=self.lease.worker_name, has_cuda=self.worker.has_cuda,
                         state_dir=state_dir, deadline=self.worker.deadline)
        self.ctx = ctx
        try:
            result = pipe.run(ctx)
        except JobStopped:
            self._stopped()
            return
        except Exception as exc:
            if self.stop_reason is StopReason.LEASE_LOST or self.abandoned:
                log.warning("job %s: pipeline ended after its lease was lost: %r",
                            self.job.id, exc)
                return
            if self.stop_reason is not None:
                # Asked to stop, the pipeline failed on the way out (its DataLoader or child
                # process heard the same SIGTERM, say): the stop decides, not the error.
                unwinding = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("job %s: the pipeline raised %s while it unwound after the stop "
                            "(%s)", self.job.id, unwinding, self.stop_reason.value)
                self._stopped(unwinding=unwinding)
                return
            error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
            progress, lines = self._take()
            self._finish_then_next(lambda then: self.store.fail(
                self.lease, error, tb, run_seconds=self.run_seconds(), progress=progress,
                logs=lines, then_claim=then))
            return
        if self.abandoned or self.stop_reason is StopReason.LEASE_LOST:
            return
        progress, lines = self._take()
        self._finish_then_next(lambda then: self.store.complete(
            self.lease, result, run_seconds=self.run_seconds(), progress=progress,
            logs=lines, then_claim=then))
        self.won = True

    def _finish_then_next(
        self, write: Callable[[ClaimRequest | None], tuple[Lease, JobRecord] | None]
    ) -> None:
        """Write the outcome and, in the same write, claim this worker's next job."""
        then = self.worker.reserve_claim()
        try:
            nxt = self.worker.db.call(lambda: write(then))
        except BaseException:
            self.worker.release_claim(then)
            raise
        if nxt is None:
            self.worker.release_claim(then)
        else:
            # Registered before the clean-up: from now on the reporter renews its lease,
            # however long a slow store takes to delete this job's files.
            self.successor = self.worker.add_runner(*nxt)
        self._cleanup()
        if self.successor is not None:
            self.successor.started = time.monotonic()  # its run time starts when it does

    def _store_unavailable(self, why: str) -> None:
        """The checkpoint store is out of reach: keep the pointer, hand the job back."""
        log.warning("job %s: %s", self.job.id, why)
        # Wait a little first, so that an outage does not bounce the job between workers.
        self.worker.coordinator.wait(5.0)
        self.worker.db.call(lambda: self.store.hand_back(
            self.lease, f"{self.lease.worker_name} could not read the job's checkpoint "
            f"({why}); back in the queue with its checkpoint kept", preempted=False))

    def _load_resume(self, load: Callable[[str], Loaded] | None = None) -> Loaded | None:
        load = load or self.worker.checkpoints.load
        job = self.job
        candidates = [(job.checkpoint, job.checkpoint_step),
                      (job.checkpoint_prev, job.checkpoint_prev_step)]
        for i, (path, step) in enumerate(candidates):
            if not path:
                continue
            try:
                return load(path)
            except CheckpointCorrupt as exc:
                nxt = candidates[i + 1] if i + 1 < len(candidates) else (None, None)
                fallback = (f"resuming from the previous checkpoint at step {nxt[1]}"
                            if nxt[0] else "starting from the beginning")
                message = f"checkpoint at step {step} is unusable: {exc}; {fallback}"
                self.worker.db.call(functools.partial(
                    self.store.drop_checkpoint_pointer, self.lease, path))
                self.worker.db.call(functools.partial(
                    self.store.add_event, self.lease, EventKind.CHECKPOINT_CORRUPT, message))
        return None

    def _stopped(self, unwinding: str | None = None) -> None:
        reason = self.stop_reason
        if reason is None:
            # The pipeline stopped on its own without a request: treat it as a failure.
            self.worker.db.call(lambda: self.store.fail(
                self.lease, "the pipeline stopped without being asked to",
                run_seconds=self.run_seconds()))
            self._cleanup()
            return
        if self.abandoned or reason is StopReason.LEASE_LOST:
            return
        self._flush()
        out = stop_outcome(reason, self.job.on_preempt, worker=self.lease.worker_name,
                           where=self.where(), detail=self.stop_detail,
                           resume=self._checkpoint_words(), unwinding=unwinding)
        self.apply(out, self.store, give_up_at=self.worker.deadline())

    def apply(self, out: StopOutcome, store: JobStore, *, give_up_at: float | None,
              forced: bool = False) -> None:
        """Carry out a stop's outcome with one fenced write (``store``: whose connection).

        ``forced``: at the deadline, where no round trip may be spent but the write's.
        """
        run = self.run_seconds()
        if out.action == "cancel":
            self.worker.db.call(lambda: store.finish_cancelled(self.lease, run_seconds=run),
                                give_up_at=give_up_at)
        elif out.action == "fail":
            self.worker.db.call(lambda: store.fail(self.lease, out.message, run_seconds=run),
                                give_up_at=give_up_at)
        else:
            why = (self._escalation(None if forced else store)
                   if out.preempted and out.keep_checkpoint else None)
            self.worker.db.call(lambda: store.hand_back(
                self.lease, out.message, preempted=out.preempted,
                keep_checkpoint=out.keep_checkpoint, run_seconds=run,
                escalate_to=ON_DEMAND if why else None, escalation=why or ""),
                give_up_at=give_up_at)
        if out.cleanup and not forced:  # at the deadline, exiting in time comes first
            self._cleanup()

    def _checkpoint_words(self) -> str:
        ck = self.notice_checkpoint
        if ck is not None:
            if ck.reused:
                return f"the checkpoint at step {ck.step} was saved at that step already"
            return f"checkpoint saved in {seconds(ck.seconds)}"
        if self.checkpoint_error is not None:
            fallback = (f"it will resume from the checkpoint at step {self.last_checkpoint_step}"
                        if self.last_checkpoint_step is not None
                        else "the next attempt starts from the beginning")
            return f"the checkpoint could not be saved ({self.checkpoint_error}); {fallback}"
        if self.last_checkpoint_step is not None:
            return f"will resume from the checkpoint at step {self.last_checkpoint_step}"
        return "no checkpoint, the next attempt starts from the beginning"

    def _escalation(self, store: JobStore | None) -> str | None:
        from spotrun.policy import escalation_reason

        job = self.job
        limit = job.max_preemptions
        if limit is None:
            limit = self.worker.settings.max_preemptions
        try:
            now = store.now() if store is not None else time.time()
        except Exception:
            now = time.time()
        return escalation_reason(
            preemptions=job.preemptions + 1, max_preemptions=limit, deadline=job.deadline,
            now=now, created=job.created_epoch, step=self.step, total=self.total,
            pool=job.pool if job.pool else self.worker.pool)

    def _take(self) -> tuple[Progress, list[tuple[float, str, str]]]:
        """The last progress and the buffered log lines, for the final write."""
        self.finishing = True
        with self.lock:
            progress = Progress(self.step, self.total, dict(self.metrics))
            self.dirty = False
        return progress, self.logs.take()

    def _flush(self) -> None:
        """Write the last progress and log lines (fenced)."""
        self.finishing = True
        with self.lock:
            step, total, metrics = self.step, self.total, dict(self.metrics)
            self.dirty = False
        lines = self.logs.take()
        self.worker.db.call(lambda: self.store.save_progress(
            self.lease, step, total, metrics, lines))

    def _settle_model(self) -> None:
        """Keep the model of the attempt that won; a loser deletes its own."""
        if not self.model_saved:
            return
        job_id, attempt = self.lease.job_id, self.lease.attempt
        try:
            if not self.won:
                # A refused result may be a retry of one that was accepted: ask the store.
                job = self.store.find(job_id)
                self.won = job is not None and job.state is JobState.SUCCEEDED and \
                    job.attempt == attempt
            if not self.won:
                self.worker.checkpoints.delete_model(job_id, attempt)
                log.info("job %s: attempt %d's result was not accepted; its model is deleted",
                         job_id, attempt)
            elif attempt > 1:
                # Earlier attempts that died after saving theirs left files behind.
                self.worker.checkpoints.delete_other_models(job_id, keep=attempt)
        except Exception as exc:
            log.warning("job %s: could not tidy the models of its attempts: %s", job_id, exc)

    def _cleanup(self) -> None:
        # Skipped when there can be nothing to delete: a listing per job is the largest
        # cost of a short job on an object store.
        if self.may_have_files:
            with contextlib.suppress(Exception):
                self.worker.checkpoints.delete_job(self.lease.job_id)


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
        self.db = _Retrier(f"worker {self.name}")
        self.runners: dict[str, JobRunner] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_reporter = threading.Event()
        self.worker_id = ""
        self.claimed = 0
        self.exit_code = 0  # EXIT_STUCK once a pipeline thread could not be stopped

    def _open_store(self, settings: Settings) -> JobStore:
        """Wait for the database at start: a replacement may boot during an outage."""
        delay, logged = 0.1, False
        while True:
            try:
                # No pre-ping: a round trip per transaction; the retrier covers restarts.
                return JobStore.open(settings.database_url, pool_size=self.concurrency + 2,
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
        self.worker_id = self.db.call(lambda: self.store.register_worker(
            name=self.name, host=socket.gethostname(), pid=os.getpid(), pool=self.pool,
            has_cuda=self.has_cuda, lease_seconds=self.settings.lease_seconds,
            price_per_hour=self.settings.price_per_hour))
        log.info("worker %s (%s) ready: pool %s, lease %.1f s, heartbeat %.1f s%s",
                 self.name, self.worker_id, self.pool, self.settings.lease_seconds,
                 self.settings.heartbeat_seconds, ", CUDA" if self.has_cuda else "")
        self.coordinator.on_notice(self._on_notice)
        self.coordinator.on_notice(self._bound_waits)
        self.coordinator.on_advisory(self._on_advisory)
        reporter = threading.Thread(target=self._report_loop, name="spotrun-reporter",
                                    daemon=True)
        reporter.start()
        waker = self.store.waker()
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
            return [now - r.last_checkpoint_mono for r in self.runners.values()
                    if not r.done.is_set()]

    def _bound_waits(self, notice: Notice) -> None:
        """From a notice on, no wait on the database may outlast the budget.

        SQLite waits for a lock up to a short share of the budget. A link that blackholes
        (no reset, no reply: a partitioned network, a dead NAT entry) would hold a call on
        PostgreSQL for as long as TCP takes to give up, minutes: at the deadline the
        process exits non-zero instead, and the leases bring its jobs back.
        """
        for st in (self.store, self.hb_store):
            st.bound_lock_waits(max(0.1, self.coordinator.time_left() / 4))
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
            with self._lock:
                held = [r.job.id for r in self.runners.values() if not r.done.is_set()]
            log.error("worker %s: the database did not answer before the deadline; exiting "
                      "now: the lease will expire and bring back %s", self.name,
                      ", ".join(held) if held else "its jobs")
            for h in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    h.flush()
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
                pending = self._claim_request()
            try:
                claimed = self.db.call(functools.partial(self._claim_one, pending),
                                       give_up_at=time.monotonic() + 2)
                pending = None
            except Exception as exc:
                if not _is_db_error(exc):
                    raise
                claimed = False
            if claimed:
                waker.busy()
            else:
                waker.wait(0.1 if self.db.down_since is None else 1.0)

    def _claim_one(self, request: ClaimRequest) -> bool:
        if self.coordinator.stopping:
            return False
        got = self.store.claim(**request.params())
        if got is None:
            return False
        with self._lock:
            self.claimed += 1
        self.add_runner(*got).start()
        return True

    def _claim_request(self) -> ClaimRequest:
        return ClaimRequest(self.worker_id, self.name, self.settings.lease_seconds,
                            self.has_cuda, self.pool, secrets.token_hex(16))

    def reserve_claim(self) -> ClaimRequest | None:
        """A claim for a finishing runner to make, unless this worker takes no more jobs."""
        with self._lock:
            if self.coordinator.stopping or (
                    self.max_jobs is not None and self.claimed >= self.max_jobs):
                return None
            self.claimed += 1  # reserved: given back if nothing was claimed
        return self._claim_request()

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
            for job_id in [j for j, r in self.runners.items() if r.done.is_set()]:
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
            r.early_checkpoint = True

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
            runners = self._wait_runners(notice.deadline_mono)
            for r in runners:
                if r.abandoned:
                    continue  # already ended without its stuck thread
                if not r.done.is_set():
                    code |= self._force_stop(r, r.stop_reason or self._reason_for(notice))
                elif r.write_failed:
                    code |= 1
        else:
            self._wait_runners(None)
        self._stop_reporter.set()
        code |= self.exit_code
        if notice is not None:
            outcome = self.coordinator.run_hooks()
            if outcome:
                log.info("shutdown hooks: %s", ", ".join(f"{k} {v}" for k, v in
                                                          outcome.items()))
        try:
            self.db.call(lambda: self.store.set_worker_state(self.worker_id, "stopped"),
                         give_up_at=time.monotonic() + 1.0)
        except Exception:
            log.warning("could not mark worker %s stopped", self.name)
        if notice is not None:
            log.info("worker %s exits %.2f s after the notice (%s)", self.name,
                     time.monotonic() - notice.received_mono, notice.reason)
        return code

    def _wait_runners(self, deadline_mono: float | None) -> list[JobRunner]:
        """Wait for every runner, including one a finishing runner started meanwhile."""
        seen: list[JobRunner] = []
        while True:
            with self._lock:
                new = [r for r in self.runners.values() if r not in seen and not r.abandoned]
            if not new:
                return seen
            for r in new:
                r.done.wait(None if deadline_mono is None
                            else max(0.0, deadline_mono - time.monotonic()))
            seen += new

    def _force_stop(self, r: JobRunner, reason: StopReason) -> int:
        """End a job whose pipeline is stuck in a step, by the policy of a step boundary.

        From here on the runner is abandoned: the reporter no longer renews its lease and
        nothing the pipeline does later reaches the store.
        """
        r.abandoned = True
        if r.ctx is not None and r.ctx.on_abandon is not None:
            # Work outside this process (a command job's program) ends with the job here.
            try:
                r.ctx.on_abandon()
            except Exception as exc:
                log.warning("job %s: could not end its work: %s", r.job.id, exc)
        if reason is StopReason.LEASE_LOST:
            return 0  # another attempt owns the job: nothing of this one may be written
        out = stop_outcome(reason, r.job.on_preempt, worker=self.name, where=r.where(),
                           detail=r.stop_detail, resume=r._checkpoint_words(), in_flight=True)
        try:
            r.apply(out, self.hb_store, give_up_at=time.monotonic() + 1.0,
                    forced=self.coordinator.stopping)
            return 0
        except LeaseLost as exc:
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
            hung = [r for r in self.runners.values()
                    if r.stop_reason in _UNWAITED
                    and r.stop_mono is not None and now - r.stop_mono > grace
                    and not r.done.is_set() and not r.abandoned and not r.finishing]
        for r in hung:
            assert r.stop_reason is not None
            log.error("job %s: the pipeline did not stop within %.1f s (SPOTRUN_GRACE_SECONDS) "
                      "after its %s, stuck at %s; ending the job without it", r.job.id, grace,
                      _UNWAITED[r.stop_reason], r.where())
            self._force_stop(r, r.stop_reason)
            self.exit_code = EXIT_STUCK
        if hung and not self.coordinator.stopping:
            log.error("worker %s: a pipeline thread is stuck and cannot be stopped; handing "
                      "back the other jobs and exiting %d so that a supervisor starts a "
                      "fresh worker", self.name, EXIT_STUCK)
            self.coordinator.notify("a pipeline thread is stuck", source="worker")

    # ---------------------------------------------------------------- reporter

    def _report_loop(self) -> None:
        hb = _Retrier(f"heartbeat of {self.name}")
        next_beat = 0.0
        tick = min(0.25, self.settings.heartbeat_seconds / 2)
        # After an outage every lease may have lapsed; sweeping before the other workers
        # had a full lease to beat again would requeue the jobs of live workers.
        ok_since: float | None = time.monotonic()
        # A call slower than this counts as an outage: the database, not the workers, was
        # late, and every heartbeat waited on it as this one did.
        slow = max(self.settings.heartbeat_seconds,
                   (self.settings.lease_seconds - self.settings.heartbeat_seconds) / 2)
        slow_logged = False
        while not self._stop_reporter.wait(tick):
            now = time.monotonic()
            touched = False
            with self._lock:
                runners = [r for r in self.runners.values()
                           if not r.done.is_set() and not r.abandoned and not r.finishing]
            try:
                for r in runners:
                    self._check_timeout(r)
                    if r.dirty and now - r.last_flush >= PROGRESS_FLUSH_SECONDS:
                        touched = True
                        self._flush_progress(r)
                if now >= next_beat:
                    next_beat = now + self.settings.heartbeat_seconds
                    touched = True
                    self._beat(runners)
                    if ok_since is None:
                        ok_since = now
                    took = time.monotonic() - now
                    if took > slow:
                        ok_since = time.monotonic()
                        if not slow_logged:
                            slow_logged = True
                            log.warning("heartbeat of %s: the database took %.1f s to answer; "
                                        "no sweep until it has answered in time for a lease",
                                        self.name, took)
                    else:
                        # Inside the guard the sweep only probes: a stall that goes on must
                        # keep the guard closed until a lease after it ends.
                        guard_ok = time.monotonic() - ok_since >= self.settings.lease_seconds
                        if guard_ok:
                            slow_logged = False
                        try:
                            self.hb_store.sweep_expired(within=slow, probe=not guard_ok)
                        except DatabaseSlow as exc:
                            ok_since = time.monotonic()
                            if not slow_logged:
                                slow_logged = True
                                log.warning("heartbeat of %s: %s (the database was slow); "
                                            "no sweep until it has answered in time for a "
                                            "lease", self.name, exc)
                if touched and hb.down_since is not None:
                    log.warning("heartbeat of %s: database reachable again", self.name)
                    hb.down_since = None
            except Exception as exc:
                if not _is_db_error(exc):
                    log.exception("reporter error")
                    continue
                ok_since = None
                if hb.down_since is None:
                    hb.down_since = now
                    log.warning("heartbeat of %s: database unreachable (%s); retrying",
                                self.name, str(exc).splitlines()[0][:200])

    def _check_timeout(self, r: JobRunner) -> None:
        limit = r.job.timeout
        if limit and r.stop_reason is None and r.job.run_seconds + r.run_seconds() > limit:
            r.request_stop(StopReason.TIMED_OUT,
                           f"the job ran longer than its time limit of {limit:g} s")

    def _flush_progress(self, r: JobRunner) -> None:
        with r.lock:
            step, total, metrics = r.step, r.total, dict(r.metrics)
            r.dirty = False
        r.last_flush = time.monotonic()
        try:
            cancel = self.hb_store.save_progress(r.lease, step, total, metrics, r.logs.take())
        except LeaseLost as exc:
            r.request_stop(StopReason.LEASE_LOST, str(exc))
            log.warning("job %s: %s; stopping it", r.job.id, exc)
            return
        if cancel:
            r.request_stop(StopReason.CANCELLED, "cancel requested")

    def _beat(self, runners: list[JobRunner]) -> None:
        status = self.hb_store.heartbeat(self.worker_id, [r.lease for r in runners],
                                         self.settings.lease_seconds)
        for r in runners:
            st = status.get(r.job.id)
            if st is None and r.finishing:
                continue  # its result was written between our snapshot and this heartbeat
            if st is None:
                msg = (f"heartbeat of job {r.job.id} refused: attempt {r.lease.attempt} no "
                       "longer holds the lease")
                log.warning("%s; stopping it", msg)
                r.request_stop(StopReason.LEASE_LOST, msg)
            elif st:
                r.request_stop(StopReason.CANCELLED, "cancel requested")
