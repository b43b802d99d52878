"""A job's runner: runs one claimed job's pipeline on its own thread and reports.

The runner implements the pipeline's ``Driver`` (progress, checkpoints, models, notes),
shares what other threads need in its ``RunnerState``, and at the end makes the job's one
fenced write: the result, the failure, or the outcome of a stop, which ``outcome.py``
decides. When the write also claims this worker's next job, that job runs next on the
same thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotrun import preload
from spotrun.checkpoints import CheckpointCorrupt, CheckpointUnavailable, Loaded, Saved
from spotrun.events import (
    Checkpointed,
    CheckpointUnusable,
    Escalated,
    FailCause,
    Failed,
    HandBackCause,
    HandedBack,
    Note,
    Preempted,
)
from spotrun.jobs import JobState, Progress
from spotrun.pipelines.base import JobContext, JobStopped, Pipeline, State
from spotrun.pipelines.registry import get as get_pipeline
from spotrun.store import ClaimRequest, JobRecord, JobStore, Lease, LeaseLost
from spotrun.worker import refusals
from spotrun.worker.memory import allocation_error, out_of_memory
from spotrun.worker.outcome import (
    NOTICES,
    CheckpointState,
    NoticeCheckpoint,
    StopOutcome,
    StopReason,
    decide,
    escalation_for,
)
from spotrun.worker.retry import is_db_error
from spotrun.worker.schedule import CheckpointSchedule, notice_checkpoint_due
from spotrun.worker.state import JobLogHandler, RunnerState

if TYPE_CHECKING:
    from spotrun.worker.loop import Worker

log = logging.getLogger("spotrun.worker")


class JobRunner:
    """Runs one claimed job on its own thread; implements the pipeline's Driver."""

    def __init__(self, worker: Worker, lease: Lease, job: JobRecord) -> None:
        self.worker = worker
        self.store = worker.store
        self.lease = lease
        self.job = job
        self.started = time.monotonic()
        self.state = RunnerState(job.progress,
                                 CheckpointState(job.checkpoint_step, job.checkpoint),
                                 self.started)
        self.logs = JobLogHandler()
        # Not logging.getLogger: that registers every job's logger for the life of the
        # process, a leak in a worker that runs millions of jobs.
        # The level is set here: Logger.setLevel clears every logger's cache under the
        # logging module's lock, once per job.
        self.logger = logging.Logger(f"spotrun.job.{job.id}", logging.INFO)
        self.schedule = CheckpointSchedule.for_job(
            job.checkpoint_every_steps, job.checkpoint_every_seconds, worker.settings)
        # Files of this job may exist in the checkpoint store: an earlier attempt may have
        # written some (with or without a pointer), or this one did.
        self.may_have_files = lease.attempt > 1 or job.checkpoint is not None
        self.successor: JobRunner | None = None  # claimed by this runner's final write
        self.ctx: JobContext | None = None  # set once, before the pipeline starts
        self.model_saved = False  # the pipeline wrote a final model (of this attempt)
        self.won = False  # the store accepted this attempt's result
        # (step, seconds) of the checkpoint this attempt resumed from, until its first
        # step is logged: the store sees that step only at the next heartbeat.
        self._resumed: tuple[int, float] | None = None

    # ------------------------------------------------------------- Driver API

    def report(self, step: int, total: int | None, metrics: dict[str, Any]) -> None:
        self.state.report(step, total, metrics)
        if self._resumed is not None:
            (from_step, loaded_s), self._resumed = self._resumed, None
            log.info("job %s: stepping again from step %d, %.3f s after its claim "
                     "(checkpoint loaded in %.3f s)", self.job.id, from_step,
                     time.monotonic() - self.started, loaded_s)

    def stop_requested(self) -> bool:
        return self.state.stop_reason is not None

    def checkpoint_due(self, step: int) -> bool:
        reason, ck = self.state.stop_reason, self.state.checkpoint
        if reason in NOTICES:
            return notice_checkpoint_due(self.job.on_preempt, ck,
                                         abandoned=self.state.abandoned)
        if reason is not None or not self.schedule.may_checkpoint(step, ck.step):
            return False
        if self.state.take_checkpoint_request():
            return True
        if self.schedule.needs_interval(self.run_seconds()):
            # The choice is explained once, on the job's first attempt.
            self._set_interval(explain=self.lease.attempt == 1)
        return self.schedule.periodic_due(step, ck.step,
                                          time.monotonic() - self.state.checkpoint_mono)

    def checkpoint(self, state: State) -> None:
        """Save and commit a checkpoint; a failure is the worker's, never the pipeline's."""
        notice = self.state.stop_reason in NOTICES
        try:
            self._checkpoint(state, notice)
        except LeaseLost as exc:
            refusals.record(exc)
            log.warning("job %s: %s; stopping it", self.job.id, exc)
            self.request_stop(StopReason.LEASE_LOST, str(exc))
        except Exception as exc:
            # The job goes on (or is handed back) with its previous checkpoint.
            log.warning("job %s: checkpoint at step %d failed: %s: %s", self.job.id,
                        state.step, type(exc).__name__, exc)
            if notice:
                self.state.update_checkpoint(error=f"{type(exc).__name__}: {exc}"[:300])
            else:
                self.state.update_checkpoint(now=time.monotonic())  # retry after a period

    def _checkpoint(self, state: State, notice: bool) -> None:
        ck = self.state.checkpoint
        if state.step == ck.step and ck.path is not None and state.directory is None:
            # The checkpoint of this very step is committed already (a periodic one, then
            # the notice at the same boundary): it is the notice's checkpoint. Writing it
            # again would rewrite files a pointer names. (A directory's files may have
            # changed at the same step, a command job's above all: each of its commits
            # gets a path of its own instead.)
            if notice:
                self.state.update_checkpoint(
                    notice=NoticeCheckpoint(state.step, ck.path, 0.0, reused=True))
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
        event = None if notice else Checkpointed(state.step, saved.seconds)
        dropped = self.worker.db.call(lambda: self.store.commit_checkpoint(
            self.lease, saved.path, state.step, event=event),
            give_up_at=self.worker.deadline() if notice else None)
        elapsed = time.perf_counter() - start
        if self.schedule.measured(elapsed):
            self._set_interval(explain=False)
        self.state.update_checkpoint(
            step=state.step, path=saved.path, now=time.monotonic(),
            **({"notice": NoticeCheckpoint(state.step, saved.path, elapsed)} if notice else {}))
        if dropped and dropped != saved.path:
            with contextlib.suppress(Exception):
                self.worker.checkpoints.delete(dropped)

    def note(self, message: str) -> None:
        self.worker.db.call(functools.partial(self.store.add_event, self.lease, Note(message)))

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
        lived, hits = self.worker.db.call(
            lambda: self.store.analytics.pool_interruptions(self.worker.pool))
        chosen = self.schedule.choose(lived_seconds=lived, interruptions=hits)
        if explain:
            note = Note(chosen.summary, chosen.explanation)
            self.worker.db.call(functools.partial(self.store.add_event, self.lease, note))

    def request_stop(self, reason: StopReason, detail: str = "") -> None:
        """Ask the pipeline to stop at its next step boundary; the first request wins."""
        if self.state.request_stop(reason, detail, time.monotonic()) and \
                reason is not StopReason.PREEMPTED:
            log.info("job %s: stopping (%s) %s", self.job.id, reason.value, detail)

    def run_seconds(self) -> float:
        return time.monotonic() - self.started

    def where(self) -> str:
        return self.state.where()

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
            refusals.record(exc)
            log.warning("job %s: %s; stopping it", self.job.id, exc)
        except Exception as exc:
            if is_db_error(exc):
                # The database is out of reach: the lease will expire and bring the job
                # back; the process must not claim it handed the job back.
                self.state.write_failed = True
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
                failed = Failed.worker_error(worker=self.lease.worker_name,
                                             error_type=type(exc).__name__)
                self.store.fail(self.lease, failed, None, run_seconds=self.run_seconds())
        finally:
            self.logger.removeHandler(self.logs)
            self._settle_model()
            self.state.done.set()
            if self.successor is None:  # else the successor took over this one's slot
                self.worker.wake()

    def _run(self) -> None:
        # Not while the worker's preload imports the ML stack: two threads importing it at
        # once can see half-initialised modules. A stop meanwhile hands the job back.
        if not preload.wait(self.stop_requested):
            self._stopped()
            return
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
        loading = time.monotonic()
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
        if resume is not None:
            self._resumed = (resume.step, time.monotonic() - loading)
        ctx = JobContext(job_id=self.job.id, attempt=self.lease.attempt, params=params,
                         driver=self, resume=resume, logger=self.logger,
                         worker=self.lease.worker_name, has_cuda=self.worker.has_cuda,
                         state_dir=state_dir, deadline=self.worker.deadline)
        self.ctx = ctx
        over_limit: str | None = None
        try:
            result = pipe.run(ctx)
        except JobStopped:
            self._stopped()
            return
        except Exception as exc:
            reason = self.state.stop_reason
            if reason is StopReason.LEASE_LOST or self.state.abandoned:
                log.warning("job %s: pipeline ended after its lease was lost: %r",
                            self.job.id, exc)
                return
            if reason is not None:
                # Asked to stop, the pipeline failed on the way out (its DataLoader or child
                # process heard the same SIGTERM, say): the stop decides, not the error.
                unwinding = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("job %s: the pipeline raised %s while it unwound after the stop "
                            "(%s)", self.job.id, unwinding, reason.value)
                self._stopped(unwinding=unwinding)
                return
            if self.worker.settings.job_memory_gb is not None and out_of_memory(exc):
                over_limit = allocation_error(exc)
            else:
                error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
                progress, lines = self._take()
                run = self.run_seconds()
                failed = Failed(error, FailCause.PIPELINE, worker=self.lease.worker_name,
                                step=progress.step, total=progress.total, run_seconds=run)
                self._finish_then_next(lambda then: self.store.fail(
                    self.lease, failed, tb, run_seconds=run, progress=progress,
                    logs=lines, then_claim=then))
                return
        if over_limit is not None:
            # Written out of the except block: the pipeline's frames, and what they
            # allocated, are freed first, so the write has memory to run in.
            self._over_memory_limit(over_limit)
            return
        if self.state.abandoned or self.state.stop_reason is StopReason.LEASE_LOST:
            return
        progress, lines = self._take()
        self._finish_then_next(lambda then: self.store.complete(
            self.lease, result, run_seconds=self.run_seconds(), progress=progress,
            logs=lines, then_claim=then))
        self.won = True

    def _over_memory_limit(self, error: str) -> None:
        """Fail the job that hit the worker's per-job memory limit; the worker goes on."""
        limit = self.worker.settings.job_memory_gb or 0.0
        log.warning("job %s: an allocation failed at the job memory limit of %g GB (%s)",
                    self.job.id, limit, error)
        progress, lines = self._take()
        run = self.run_seconds()
        failed = Failed.memory_limit(limit_gb=limit, error=error, step=progress.step,
                                     total=progress.total)
        self._finish_then_next(lambda then: self.store.fail(
            self.lease, failed, None, run_seconds=run,
            progress=progress, logs=lines, then_claim=then))

    def _finish_then_next(
        self, write: Callable[[ClaimRequest | None], tuple[Lease, JobRecord] | None]
    ) -> None:
        """Write the outcome and, in the same write, claim this worker's next job."""
        then = self.worker.reserve_claim(self)
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
        kept = HandedBack(self.lease.worker_name, cause=HandBackCause.CHECKPOINT_UNREADABLE,
                          error=why)
        self.worker.db.call(lambda: self.store.hand_back(self.lease, kept))

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
                unusable = CheckpointUnusable(step, str(exc), previous=bool(nxt[0]),
                                              previous_step=nxt[1])
                self.worker.db.call(functools.partial(
                    self.store.drop_checkpoint_pointer, self.lease, path))
                self.worker.db.call(functools.partial(
                    self.store.add_event, self.lease, unusable))
        return None

    # ------------------------------------------------------------- the stop

    def outcome(self, *, in_flight: bool = False, unwinding: str | None = None,
                reason: StopReason | None = None) -> StopOutcome:
        """What this job's stop writes (``reason``: else the stop asked for), escalation
        aside (``apply`` asks the store's clock for that)."""
        why = self.state.stop_reason if reason is None else reason
        return decide(why, self.job.on_preempt, self.state.checkpoint,
                      worker=self.lease.worker_name, step=self.state.step,
                      total=self.state.total, detail=self.state.stop_detail,
                      in_flight=in_flight, unwinding=unwinding)

    def _stopped(self, unwinding: str | None = None) -> None:
        """The pipeline stopped at a step boundary (or unwound): carry out the outcome."""
        out = self.outcome(unwinding=unwinding)
        if self.state.abandoned or out.action == "none":
            return  # the stop path ended the job already, or another attempt owns it
        if self.state.stop_reason is not None:
            self._flush()
        self.apply(out, self.store, give_up_at=self.worker.deadline())

    def apply(self, out: StopOutcome, store: JobStore, *, give_up_at: float | None,
              forced: bool = False) -> None:
        """Carry out a stop's outcome with one fenced write (``store``: whose connection).

        ``forced``: at the deadline, where no round trip may be spent but the write's.
        """
        run = self.run_seconds()
        if out.may_escalate:
            out = out.escalated(self._escalation(None if forced else store))
        ev = out.event
        if out.action == "cancel":
            self.worker.db.call(lambda: store.finish_cancelled(self.lease, run_seconds=run),
                                give_up_at=give_up_at)
        elif out.action == "fail":
            assert isinstance(ev, Failed)
            failed = dataclasses.replace(ev, run_seconds=run)
            self.worker.db.call(lambda: store.fail(self.lease, failed, run_seconds=run),
                                give_up_at=give_up_at)
        elif out.action == "hand_back":
            assert isinstance(ev, Preempted | HandedBack)
            self.worker.db.call(lambda: store.hand_back(
                self.lease, ev, keep_checkpoint=out.keep_checkpoint, run_seconds=run,
                escalation=out.escalation), give_up_at=give_up_at)
        if out.cleanup and not forced:  # at the deadline, exiting in time comes first
            self._cleanup()

    def _escalation(self, store: JobStore | None) -> Escalated | None:
        """Why this preempted job moves to on-demand, by the store's clock if given."""
        try:
            now = store.now() if store is not None else time.time()
        except Exception:
            now = time.time()
        job = self.job
        return escalation_for(
            preemptions=job.preemptions, max_preemptions=job.max_preemptions,
            default_max_preemptions=self.worker.settings.max_preemptions,
            deadline=job.deadline, created=job.created_epoch, job_pool=job.pool,
            worker_pool=self.worker.pool, step=self.state.step,
            total=self.state.total, now=now)

    def _take(self) -> tuple[Progress, list[tuple[float, str, str]]]:
        """The last progress and the buffered log lines, for the final write."""
        self.state.finish()
        return self.state.take_progress(), self.logs.take()

    def _flush(self) -> None:
        """Write the last progress and log lines (fenced)."""
        self.state.finish()
        p = self.state.take_progress()
        lines = self.logs.take()
        self.worker.db.call(lambda: self.store.save_progress(
            self.lease, p.step, p.total, p.metrics, lines))

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
