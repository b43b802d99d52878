"""The writes of a lease's holder, fenced, and the sweep of leases that lapsed.

Where a job's lease is renewed (:meth:`LeaseWrites.heartbeat`), where its holder records
progress, checkpoints, a hand-back and the result, and where a lapsed lease brings the job
back (:meth:`LeaseWrites.sweep_expired`). Every write here goes through ``_fenced``: it is
conditioned on (job id, attempt, state running) and raises :class:`LeaseLost` when no row
matched. The dialects fill in the result's one write (``_write_result``) and the sweep's
locking.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from spotrun.events import (
    CancelCause,
    Cancelled,
    Checkpointed,
    Escalated,
    Failed,
    HandedBack,
    LeaseExpired,
    Payload,
    Preempted,
    Succeeded,
    render,
)
from spotrun.jobs import EventKind, JobState, Progress, WorkerState
from spotrun.schema import events, intake_leases, job_logs, job_metrics, jobs, workers
from spotrun.store.core import StoreCore
from spotrun.store.errors import DatabaseSlow, LeaseLost, StoreError, first_line
from spotrun.store.records import (
    MAX_METRIC_POINTS,
    Beat,
    BeatResult,
    ClaimRequest,
    JobRecord,
    Lease,
    dumps,
    even_sample,
    job_from_row,
)

_IDLE_OR_BUSY = (WorkerState.IDLE.value, WorkerState.BUSY.value)

# The named lease of the fleet's one sweeper (see LeaseWrites.beat).
SWEEPER = "spotrun:sweeper"

# The most lapsed leases a sweep moves in one transaction (see LeaseWrites.sweep_expired).
SWEEP_BATCH = 100


def series_point(metrics: dict[str, Any]) -> str | None:
    """A progress's point of the job's metric series (its finite numbers, as JSON), or
    None when it has none to plot."""
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)
               and math.isfinite(v)}
    return dumps(numeric) if numeric else None


# The workers this process registered: a row with this process's host and pid that is not
# one of them was a process before this one with the same pid (a container restarted in
# its pod: the new worker is pid 1 again), so that process is gone.
_REGISTERED_HERE: set[str] = set()


def registered_here(worker_id: str) -> None:
    """Note that this process registered ``worker_id`` (see :func:`process_gone`)."""
    _REGISTERED_HERE.add(worker_id)


def process_gone(worker_id: str, host: str | None, pid: int | None) -> bool:
    """Whether the process of worker ``worker_id`` (``pid`` of ``host``) is known to be
    dead: only on this very host (another host's pids cannot be seen); a zombie not yet
    reaped is dead. False when not known; a pid reused by another process reads as alive
    (a plain expiry)."""
    if not host or not pid or host != socket.gethostname():
        return False
    if pid == os.getpid():
        return worker_id not in _REGISTERED_HERE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class LeaseWrites(StoreCore):
    """A lease holder's fenced writes, and the sweep that ends lapsed leases."""

    def _fenced(self, lease: Lease) -> sa.ColumnElement[bool]:
        return sa.and_(
            jobs.c.id == lease.job_id,
            jobs.c.attempt == lease.attempt,
            jobs.c.state == JobState.RUNNING.value,
        )

    def _refused(self, conn: Connection, lease: Lease, what: str) -> LeaseLost:
        row = conn.execute(
            sa.select(jobs.c.state, jobs.c.attempt, jobs.c.worker_name).where(
                jobs.c.id == lease.job_id
            )
        ).first()
        if row is None:
            now = "is gone"
        else:
            now = f"is now {row.state} at attempt {row.attempt}"
            if row.worker_name:
                now += f" on {row.worker_name}"
        return LeaseLost(
            f"{what} of job {lease.job_id} refused: attempt {lease.attempt} no longer holds "
            f"the lease (the job {now})", write=what, job_id=lease.job_id,
            attempt=lease.attempt)

    def heartbeat(self, worker_id: str, leases: Sequence[Lease], lease_seconds: float
                  ) -> dict[str, bool | None]:
        """Renew the worker's leases. Per job: cancel requested (bool), or None if lost."""
        return self.beat(worker_id, [Beat(lease) for lease in leases], lease_seconds).held

    def beat(self, worker_id: str, beats: Sequence[Beat], lease_seconds: float, *,
             alive_for: float | None = None, sweeper: bool = False) -> BeatResult:
        """A worker's heartbeat, one transaction for everything it says each beat.

        Renews every lease (fenced), with the progress and the log lines of the jobs that
        moved; refreshes the worker's row (busy or idle, due again within ``alive_for``
        seconds, by default one lease); and with ``sweeper``, takes or keeps the fleet's
        sweeper lease for one lease (:meth:`sweep_expired` is that holder's to call).
        """
        held: dict[str, bool | None] = {}
        leads = False
        with self._tx() as conn:
            for b in beats:
                values: dict[str, Any] = {"lease_expires_at": self._now + lease_seconds}
                if b.progress is not None:
                    values.update(
                        progress_step=b.progress.step, progress_total=b.progress.total,
                        progress_metrics=dumps(b.progress.metrics) if b.progress.metrics
                        else None, updated_at=self._now)
                row = conn.execute(
                    jobs.update().where(self._fenced(b.lease)).values(**values)
                    .returning(jobs.c.cancel_requested)
                ).first()
                held[b.lease.job_id] = None if row is None else bool(row[0])
                if row is not None:
                    self._insert_logs(conn, b.lease, b.logs)
                    if b.progress is not None:
                        self._record_metrics(conn, b.lease, b.progress.step,
                                             b.progress.metrics)
            mine = [b.lease.job_id for b in beats if held.get(b.lease.job_id) is not None]
            conn.execute(
                workers.update()
                .where(workers.c.id == worker_id)
                .values(last_heartbeat=self._now,
                        alive_until=self._now + (lease_seconds if alive_for is None
                                                 else alive_for),
                        current_job=mine[0] if mine else None,
                        state=sa.case((workers.c.state.in_(_IDLE_OR_BUSY),
                                       (WorkerState.BUSY if mine else WorkerState.IDLE).value),
                                      else_=workers.c.state))
            )
            if sweeper:
                leads = self._keep_sweeper(conn, worker_id, lease_seconds)
            # The sweeper learns in the same transaction whether a sweep has work: a fleet
            # with nothing lapsed pays nothing for its sweeper but that one row.
            to_sweep = leads and self._sweep_has_work(conn)
        if sweeper and not leads and not self._sweeper_row_seen:
            leads, to_sweep = self._first_sweeper_beat(worker_id, lease_seconds)
        return BeatResult(held, leads, to_sweep)

    def _first_sweeper_beat(self, worker_id: str, lease_seconds: float) -> tuple[bool, bool]:
        """A new database has no sweeper lease yet: its row made, then taken. Whether this
        worker leads the sweep, and whether a sweep would find work."""
        self._seed_sweeper()
        with self._tx() as conn:
            leads = self._keep_sweeper(conn, worker_id, lease_seconds)
            return leads, leads and self._sweep_has_work(conn)

    def _sweep_has_work(self, conn: Connection) -> bool:
        """Whether a lease has lapsed or a live worker is overdue (two index probes)."""
        if conn.execute(sa.select(jobs.c.id).where(self._lapsed()).limit(1)).first():
            return True
        return conn.execute(sa.select(workers.c.id).where(*self._overdue()).limit(1)
                            ).first() is not None

    def _lapsed(self) -> sa.ColumnElement[bool]:
        """Running jobs whose lease lapsed, by the database clock (the partial index)."""
        return sa.and_(sa.text("jobs.state = 'running'"), jobs.c.lease_expires_at < self._now)

    def _overdue(self) -> tuple[sa.TextClause, sa.ColumnElement[bool]]:
        """Live workers past the window their last heartbeat promised (the partial index)."""
        return (sa.text("workers.state IN ('idle', 'busy', 'stopping')"),
                workers.c.alive_until < self._now)

    def _keep_sweeper(self, conn: Connection, worker_id: str, seconds: float) -> bool:
        """Take or renew the sweeper lease for ``worker_id``; whether it holds it.

        A worker that does not hold it matches no row and writes nothing: the lease costs
        the fleet one row's write a beat, its holder's.
        """
        lease = intake_leases
        n = conn.execute(lease.update().where(
            lease.c.name == SWEEPER,
            sa.or_(lease.c.holder == worker_id, lease.c.expires_at < self._now),
        ).values(holder=worker_id, expires_at=self._now + seconds)).rowcount
        if n == 1:
            self._sweeper_row_seen = True
        return n == 1

    def _seed_sweeper(self) -> None:
        """Make the sweeper lease's row if there is none (a new database), once a store."""
        try:
            with self._tx() as conn:
                if conn.execute(sa.select(intake_leases.c.name)
                                .where(intake_leases.c.name == SWEEPER)).first() is None:
                    conn.execute(intake_leases.insert().values(
                        name=SWEEPER, holder="", expires_at=0.0))
        except sa.exc.IntegrityError:
            pass  # another worker made it first
        self._sweeper_row_seen = True

    def _release_sweeper(self, conn: Connection, worker_id: str) -> None:
        """Hand the sweeper lease on at once if ``worker_id`` holds it (else it lapses)."""
        conn.execute(intake_leases.update().where(
            intake_leases.c.name == SWEEPER, intake_leases.c.holder == worker_id,
        ).values(expires_at=0.0))

    def save_progress(
        self,
        lease: Lease,
        step: int,
        total: int | None,
        metrics: dict[str, Any],
        logs: Sequence[tuple[float, str, str]] = (),
    ) -> bool:
        """Record progress (and buffered log lines); return whether a cancel was asked."""
        with self._tx() as conn:
            row = conn.execute(
                jobs.update()
                .where(self._fenced(lease))
                .values(
                    progress_step=step,
                    progress_total=total,
                    progress_metrics=dumps(metrics) if metrics else None,
                    updated_at=self._now,
                )
                .returning(jobs.c.cancel_requested)
            ).first()
            if row is None:
                raise self._refused(conn, lease, "progress")
            # No NOTIFY: no waiter needs progress (live views read changed rows).
            self._insert_logs(conn, lease, logs)
            self._record_metrics(conn, lease, step, metrics)
            return bool(row[0])

    def _record_metrics(self, conn: Connection, lease: Lease, step: int,
                        metrics: dict[str, Any]) -> None:
        """Add a point to the job's metric series, thinned by half past the bound."""
        point = series_point(metrics)
        if point is None:
            return
        conn.execute(job_metrics.insert().values(
            job_id=lease.job_id, attempt=lease.attempt, step=step, at=self._now,
            metrics=point))
        count = conn.execute(sa.select(sa.func.count()).select_from(job_metrics)
                             .where(job_metrics.c.job_id == lease.job_id)).scalar_one()
        if count > MAX_METRIC_POINTS:
            self._thin_metrics(conn, lease.job_id)

    def _thin_metrics(self, conn: Connection, job_id: str) -> None:
        """Halve a job's metric series, evenly over its whole span of steps."""
        rows = conn.execute(sa.select(job_metrics.c.id, job_metrics.c.step)
                            .where(job_metrics.c.job_id == job_id)
                            .order_by(job_metrics.c.step, job_metrics.c.id)).all()
        keep = even_sample([r.step for r in rows], MAX_METRIC_POINTS // 2)
        conn.execute(job_metrics.delete().where(job_metrics.c.id.in_(
            [r.id for i, r in enumerate(rows) if i not in keep])))

    def _insert_logs(self, conn: Connection, lease: Lease,
                     logs: Sequence[tuple[float, str, str]]) -> None:
        if logs:
            conn.execute(job_logs.insert(), [
                {"job_id": lease.job_id, "attempt": lease.attempt, "at": at, "level": level,
                 "message": msg} for at, level, msg in logs])

    def add_event(self, lease: Lease, payload: Payload) -> None:
        """Append the event ``payload`` renders on behalf of the lease holder (refused for
        a zombie)."""
        with self._tx() as conn:
            n = conn.execute(
                jobs.update().where(self._fenced(lease)).values(updated_at=self._now)
            ).rowcount
            if n != 1:
                raise self._refused(conn, lease, "event")
            self._record(conn, lease.job_id, payload, worker=lease.worker_name,
                         attempt=lease.attempt)

    def commit_checkpoint(
        self, lease: Lease, path: str, step: int, *, event: Checkpointed | None = None
    ) -> str | None:
        """Point the job at a committed checkpoint; return the pointer that fell off.

        ``event``: the history's line for a periodic checkpoint (one saved on a notice is
        told by the stop's event, so it has none).

        Idempotent: a retry of a commit whose reply was lost finds the pointer moved and
        changes nothing. The path returned is named by neither pointer, so its caller may
        delete it.
        """
        with self._tx() as conn:
            row = conn.execute(
                sa.select(jobs.c.checkpoint, jobs.c.checkpoint_step, jobs.c.checkpoint_prev)
                .where(self._fenced(lease))
            ).first()
            if row is None:
                raise self._refused(conn, lease, "checkpoint pointer")
            if row.checkpoint == path:
                return None
            n = conn.execute(
                jobs.update()
                .where(self._fenced(lease))
                .values(
                    checkpoint=path,
                    checkpoint_step=step,
                    checkpoint_prev=row.checkpoint,
                    checkpoint_prev_step=row.checkpoint_step,
                    updated_at=self._now,
                )
            ).rowcount
            if n != 1:
                raise self._refused(conn, lease, "checkpoint pointer")
            if event is not None:
                self._record(conn, lease.job_id, event, worker=lease.worker_name,
                             attempt=lease.attempt)
            dropped: str | None = row.checkpoint_prev
            return None if dropped in (path, row.checkpoint) else dropped

    def drop_checkpoint_pointer(self, lease: Lease, path: str) -> None:
        """Forget a pointer found corrupt, so that no later attempt tries it again."""
        with self._tx() as conn:
            row = conn.execute(
                sa.select(jobs.c.checkpoint, jobs.c.checkpoint_prev, jobs.c.checkpoint_prev_step)
                .where(self._fenced(lease))
            ).first()
            if row is None:
                raise self._refused(conn, lease, "checkpoint pointer")
            values: dict[str, Any] = {}
            if row.checkpoint == path:
                values = {"checkpoint": row.checkpoint_prev,
                          "checkpoint_step": row.checkpoint_prev_step,
                          "checkpoint_prev": None, "checkpoint_prev_step": None}
            elif row.checkpoint_prev == path:
                values = {"checkpoint_prev": None, "checkpoint_prev_step": None}
            if values:
                conn.execute(jobs.update().where(self._fenced(lease)).values(**values))

    def hand_back(
        self,
        lease: Lease,
        event: Preempted | HandedBack,
        *,
        keep_checkpoint: bool = True,
        run_seconds: float = 0.0,
        escalation: Escalated | None = None,
    ) -> None:
        """Return a running job to the queue: a preemption (``Preempted``, counted in its
        preemptions) or a worker stopping (``HandedBack``); ``event`` goes into its history.

        With ``escalation``, the job may from now on run only on workers of its
        ``to_pool``, and why goes into its history too.
        """
        preempted = isinstance(event, Preempted)
        values: dict[str, Any] = {
            "state": JobState.QUEUED.value,
            "worker_id": None,
            "worker_name": None,
            "lease_expires_at": None,
            "updated_at": self._now,
            "run_seconds": jobs.c.run_seconds + run_seconds,
        }
        if preempted:
            values["preemptions"] = jobs.c.preemptions + 1
        if not keep_checkpoint:
            values.update(checkpoint=None, checkpoint_step=None, checkpoint_prev=None,
                          checkpoint_prev_step=None)
        if escalation is not None:
            values["pool"] = escalation.to_pool
        with self._tx() as conn:
            n = conn.execute(jobs.update().where(self._fenced(lease)).values(**values)).rowcount
            if n != 1:
                raise self._refused(conn, lease, "hand-back")
            self._record(conn, lease.job_id, event, worker=lease.worker_name,
                         attempt=lease.attempt)
            if escalation is not None:
                self._record(conn, lease.job_id, escalation, worker=lease.worker_name,
                             attempt=lease.attempt)
            self._release_worker(conn, lease)
            self._wake_idle(conn, lease.job_id)

    def complete(self, lease: Lease, result: Any, *, run_seconds: float = 0.0,
                 progress: Progress | None = None,
                 logs: Sequence[tuple[float, str, str]] = (),
                 then_claim: ClaimRequest | None = None) -> tuple[Lease, JobRecord] | None:
        """Record the result, with the last progress and log lines, in one write.

        With ``then_claim``, also claim the worker's next job (returned), in the same
        write on PostgreSQL: a worker's loop costs one round trip a job, not two.
        """
        return self._finish(lease, JobState.SUCCEEDED, Succeeded(run_seconds=run_seconds),
                            result=dumps(result), run_seconds=run_seconds,
                            progress=progress, logs=logs, then_claim=then_claim)

    def fail(self, lease: Lease, failed: Failed, traceback: str | None = None, *,
             run_seconds: float = 0.0, progress: Progress | None = None,
             logs: Sequence[tuple[float, str, str]] = (),
             then_claim: ClaimRequest | None = None) -> tuple[Lease, JobRecord] | None:
        """Record the failure: the job's error is ``failed.error``, its event ``failed``;
        ``then_claim`` as for :meth:`complete`."""
        return self._finish(lease, JobState.FAILED, failed, error=failed.error,
                            error_traceback=traceback, run_seconds=run_seconds,
                            progress=progress, logs=logs, then_claim=then_claim)

    def finish_cancelled(self, lease: Lease, *, run_seconds: float = 0.0) -> None:
        """Record that the running job stopped at its user's request."""
        self._finish(lease, JobState.CANCELLED,
                     Cancelled(CancelCause.RUNNING, run_seconds=run_seconds),
                     error="cancelled", run_seconds=run_seconds)

    def _finish(self, lease: Lease, state: JobState, event: Payload, *,
                run_seconds: float, progress: Progress | None = None,
                logs: Sequence[tuple[float, str, str]] = (),
                then_claim: ClaimRequest | None = None,
                **values: Any) -> tuple[Lease, JobRecord] | None:
        # The result is recorded with a request id, its chained claim's or else one of its
        # own (an attempt has one result): a retry after a lost reply finds its result,
        # and the job it claimed, instead of being refused.
        rid = then_claim.request_id if then_claim is not None else _result_id(lease)
        if rid in self._unsure and self._finished_by(lease, state, rid):
            self._unsure.discard(rid)
            if then_claim is None:
                return None
            return self._claimed_by(rid, then_claim.worker_id, then_claim.worker_name)
        kind, message, data = render(event)
        try:
            got = self._finish_once(lease, state, kind, message, run_seconds=run_seconds,
                                    progress=progress, logs=logs, then_claim=then_claim,
                                    request_id=rid, data=data, **values)
        except StoreError:
            raise
        except Exception:
            self._unsure_of(rid)
            raise
        self._unsure.discard(rid)
        return got

    def _finished_by(self, lease: Lease, state: JobState, request_id: str) -> bool:
        """Whether the result this request id wrote (the job's attempt, in ``state``)."""
        with self._tx(write=False) as conn:
            return conn.execute(sa.select(jobs.c.id).where(
                jobs.c.id == lease.job_id, jobs.c.attempt == lease.attempt,
                jobs.c.state == state.value, jobs.c.request_id == request_id)).first() \
                is not None

    def _finish_once(self, lease: Lease, state: JobState, kind: str, message: str, *,
                     run_seconds: float, progress: Progress | None,
                     logs: Sequence[tuple[float, str, str]],
                     then_claim: ClaimRequest | None, request_id: str | None,
                     data: dict[str, Any] | None, **values: Any
                     ) -> tuple[Lease, JobRecord] | None:
        values["request_id"] = request_id
        if progress is not None:
            values.update(progress_step=progress.step, progress_total=progress.total,
                          progress_metrics=dumps(progress.metrics) if progress.metrics
                          else None)
        return self._write_result(lease, state, kind, message, run_seconds=run_seconds,
                                  logs=logs, then_claim=then_claim, values=values,
                                  data=data)

    @abc.abstractmethod
    def _write_result(self, lease: Lease, state: JobState, kind: str, message: str, *,
                      run_seconds: float, logs: Sequence[tuple[float, str, str]],
                      then_claim: ClaimRequest | None, values: dict[str, Any],
                      data: dict[str, Any] | None
                      ) -> tuple[Lease, JobRecord] | None:
        """The fenced result (the row, its event, its log lines, a wake-up) in one
        transaction, and with ``then_claim`` the worker's next job (or None)."""

    def _release_worker(self, conn: Connection, lease: Lease) -> None:
        conn.execute(
            workers.update()
            .where(workers.c.id == lease.worker_id, workers.c.current_job == lease.job_id)
            .values(current_job=None,
                    state=sa.case(
                        (workers.c.state == WorkerState.BUSY.value, WorkerState.IDLE.value),
                        else_=workers.c.state))
        )

    def sweep_expired(self, *, within: float | None = None, probe: bool = False) -> list[str]:
        """Put jobs whose lease expired back in the queue (or end them); mark workers gone.

        Returns the ids of the jobs it moved. Any live worker may call it.

        With ``within`` (seconds), a sweep that took longer than that is rolled back and
        raises :class:`DatabaseSlow`: a sweep slowed down by a stall (a long lock on
        ``jobs``, a writer holding SQLite's lock) finds every lease lapsed by the database
        clock while their holders' heartbeats were waiting on that same stall.

        With ``probe``, nothing is moved: if a lease has lapsed, the sweep only checks that
        it could take its locks at once (else :class:`DatabaseSlow`); a
        caller that waits out a stall learns whether the stall goes on.
        """
        start = time.monotonic()
        expired = self._lapsed()
        with self._tx(write=False) as conn:
            any_expired = conn.execute(sa.select(jobs.c.id).where(expired).limit(1)).first()
        moved: list[str] = []
        # In batches, a transaction each: many leases lapsed at once (a zone's workers
        # gone together) must not hold the fleet's rows, and the heartbeats waiting on
        # them, for the whole sweep; ``within`` bounds each batch, checked as it goes.
        pick = self._lock_expired(sa.select(jobs).where(expired).order_by(
            jobs.c.lease_expires_at).limit(SWEEP_BATCH))
        batch_start = start  # the first batch's bound counts the look before it
        while any_expired is not None:
            try:
                with self._sweep_tx(within) as conn:
                    if probe:
                        self._probe_locks(conn)
                        return []  # nothing written: the commit only ends the probe
                    rows = conn.execute(pick).mappings().all()
                    for row in rows:
                        self._expire(conn, row)
                        took = time.monotonic() - batch_start
                        if within is not None and took > within:
                            raise DatabaseSlow(f"a sweep's batch took {took:.1f} s; "
                                               "rolled back")
                moved += [row["id"] for row in rows]
            except sa.exc.OperationalError as exc:
                if within is None:
                    raise
                raise DatabaseSlow(f"a sweep could not take its locks at once "
                                   f"({first_line(exc)}); rolled back") from None
            if len(rows) < SWEEP_BATCH:
                break
            batch_start = time.monotonic()
            if within is not None and batch_start - start > 4 * within:
                break  # the rest is the next beat's sweep: this one yields the thread
        if probe:
            return moved
        self.mark_gone_workers()
        return moved

    def _lock_expired(self, pick: sa.Select[Any]) -> sa.Select[Any]:
        """The sweep's read of expired jobs, locking what it moves where rows lock."""
        return pick

    def _probe_locks(self, conn: Connection) -> None:
        """Take at once the locks a sweep's writes would take (see sweep_expired)."""

    @abc.abstractmethod
    def _sweep_tx(self, within: float | None) -> contextlib.AbstractContextManager[Connection]:
        """The sweep's write transaction; with ``within``, its lock waits are short.

        A sweep that waits on a lock is waiting on what also holds the heartbeats back: it
        gives up at once rather than win the rows when the lock goes.
        """

    def _expire(self, conn: Connection, row: Any) -> None:
        job = job_from_row(row, ())
        who = job.worker or "?"
        step, total = job.progress.step, job.progress.total
        lease = Lease(job.id, job.attempt, job.worker_id or "", who)
        cond = self._fenced(lease)
        said: Cancelled | Failed | LeaseExpired
        died = self._worker_died(conn, job.worker_id)
        if job.cancel_requested:
            said = Cancelled(CancelCause.LEASE_EXPIRED, worker=who, step=step, total=total)
            conn.execute(jobs.update().where(cond).values(
                state=JobState.CANCELLED.value, error="cancelled", lease_expires_at=None,
                finished_at=self._now, updated_at=self._now))
        elif job.retries + 1 > job.max_retries:
            crashes = self._crashes_in_a_row(conn, job.id) + 1 if died else 0
            said = (Failed.worker_died(worker=who, step=step, total=total, crashes=crashes,
                                       retries=job.retries + 1, max_retries=job.max_retries)
                    if died else
                    Failed.lease_expired(worker=who, step=step, total=total,
                                         retries=job.retries + 1, max_retries=job.max_retries))
            conn.execute(jobs.update().where(cond).values(
                state=JobState.FAILED.value, retries=jobs.c.retries + 1, error=said.error,
                lease_expires_at=None, finished_at=self._now, updated_at=self._now))
        else:
            said = LeaseExpired(who, step, total, retries=job.retries + 1,
                                max_retries=job.max_retries, died=died)
            conn.execute(jobs.update().where(cond).values(
                state=JobState.QUEUED.value, retries=jobs.c.retries + 1, worker_id=None,
                worker_name=None, lease_expires_at=None, updated_at=self._now))
            self._wake_idle(conn, job.id)
        self._release_worker(conn, lease)
        self._record(conn, job.id, said, worker=job.worker, attempt=job.attempt)

    def _worker_died(self, conn: Connection, worker_id: str | None) -> bool:
        """Whether the process of the worker that held a lapsed lease is known dead."""
        if not worker_id:
            return False
        row = conn.execute(sa.select(workers.c.host, workers.c.pid)
                           .where(workers.c.id == worker_id)).first()
        return row is not None and process_gone(worker_id, row.host, row.pid)

    def _crashes_in_a_row(self, conn: Connection, job_id: str) -> int:
        """How many of the job's last attempts ended with their worker's process dead,
        newest first: a graceful hand-back or an expiry not known as a death ends the run."""
        ends = (EventKind.LEASE_EXPIRED.value, EventKind.PREEMPTED.value,
                EventKind.HANDED_BACK.value)
        rows = conn.execute(sa.select(events.c.kind, events.c.data)
                            .where(events.c.job_id == job_id, events.c.kind.in_(ends))
                            .order_by(events.c.id.desc())).all()
        n = 0
        for row in rows:
            try:
                data = json.loads(row.data) if row.data else {}
            except ValueError:
                data = {}
            if row.kind != EventKind.LEASE_EXPIRED.value or not data.get("died"):
                break
            n += 1
        return n

    def mark_gone_workers(self) -> int:
        """Live workers overdue (past the window their last heartbeat promised) are marked
        gone."""
        overdue = self._overdue()
        with self._tx(write=False) as conn:
            if conn.execute(sa.select(workers.c.id).where(*overdue).limit(1)).first() is None:
                return 0
        with self._tx() as conn:
            return conn.execute(
                workers.update().where(*overdue).values(state=WorkerState.GONE.value,
                                                        current_job=None)
            ).rowcount


def _result_id(lease: Lease) -> str:
    """The request id of an attempt's result written without a chained claim: the same for
    every try of it, and never a claim's (those are random hex of the same length)."""
    return hashlib.sha256(f"result:{lease.job_id}:{lease.attempt}".encode()).hexdigest()[:32]
