"""The store's interface: :class:`JobStore`, the one queue both dialects implement.

``JobStore.open(url)`` gives the dialect's store (:mod:`spotrun.store.postgres` or
:mod:`spotrun.store.sqlite`); this module holds what they share, in SQLAlchemy Core:
submitting, reading, cancelling, workers, and the claim's retry bookkeeping. The lease
holder's writes and the sweep are in :mod:`spotrun.store.leases`; tokens, callbacks'
records, intake records and reads for reports hang off the store as ``store.tokens``,
``store.callbacks``, ``store.intake`` and ``store.analytics``.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from spotrun.events import CancelCause, Cancelled, CancelRequested, Note, Submitted, render
from spotrun.jobs import (
    LIVE_WORKER_STATES,
    Event,
    Job,
    JobState,
    LogLine,
    OnPreempt,
    Worker,
    WorkerState,
    from_epoch,
)
from spotrun.quotas import LIMIT_NAMES, Quota, QuotaExceeded
from spotrun.schema import events, job_logs, jobs, quotas, workers
from spotrun.store.analytics import Analytics
from spotrun.store.callbacks import CallbackRecords
from spotrun.store.connect import create_engine, normalize_url, redact
from spotrun.store.errors import (
    DatabaseUnavailable,
    JobNotFound,
    KeyReused,
    StoreError,
    first_line,
)
from spotrun.store.intake import IntakeRecords
from spotrun.store.leases import LeaseWrites, registered_here
from spotrun.store.records import (
    JobRecord,
    Lease,
    NewJob,
    dumps,
    job_from_row,
    loads,
    new_id,
    worker_from_row,
)
from spotrun.store.tokens import Tokens


class Waker(abc.ABC):
    """Wakes an idle worker when the queue may have changed, instead of a busy poll.

    Made by :meth:`JobStore.waker`: LISTEN on PostgreSQL, ``PRAGMA data_version`` on SQLite.
    """

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` s; True if something may have changed."""

    def busy(self) -> None:  # noqa: B027 (a waker that polls has nothing to stop)
        """The worker has work: stop listening until it waits again."""

    @abc.abstractmethod
    def close(self) -> None: ...


class JobStore(LeaseWrites):
    """Durable queue of jobs with leases, fencing, events, logs and workers.

    ``JobStore(engine)`` and ``JobStore.open(url)`` give the engine's dialect's store.
    """

    def __new__(cls, engine: Engine) -> JobStore:
        if cls is JobStore:
            cls = _dialect_store(engine.dialect.name)
        return super().__new__(cls)

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.tokens = Tokens(self)
        self.callbacks = CallbackRecords(self)
        self.intake = IntakeRecords(self)
        self.analytics = Analytics(self)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, url: str, *, migrate: bool = True, pool_size: int = 5,
             pre_ping: bool = True, statement_timeout: float | None = None) -> JobStore:
        """Connect, and create or upgrade the schema (safe when many processes start).

        Without ``pre_ping`` a connection that died (a database restart) fails on its next
        use instead of being replaced first: for callers that retry, like the worker.
        ``statement_timeout`` (seconds, PostgreSQL) bounds each statement and lock wait.
        """
        url = normalize_url(url)
        engine = create_engine(url, pool_size=pool_size, pre_ping=pre_ping,
                               statement_timeout=statement_timeout)
        store = cls(engine)
        try:
            if migrate:
                store.migrate()
            else:
                with engine.connect():
                    pass
        except (sa.exc.OperationalError, DatabaseUnavailable) as exc:
            engine.dispose()
            raise DatabaseUnavailable(
                f"cannot reach the database at {redact(url)}: {first_line(exc)}"
            ) from None
        return store

    def reopen(self, *, pool_size: int = 5, pre_ping: bool = True,
               statement_timeout: float | None = None) -> JobStore:
        """Another store on the same database (the same URL), with connections of its own:
        for a caller whose calls must not wait behind this store's (a worker's heartbeat).
        The schema is not migrated again."""
        url = self.engine.url.render_as_string(hide_password=False)
        return type(self)(create_engine(url, pool_size=pool_size, pre_ping=pre_ping,
                                        statement_timeout=statement_timeout))

    @property
    def server_port(self) -> int | None:
        """The database server's TCP port (None for SQLite)."""
        return None

    @abc.abstractmethod
    def migrate(self) -> None:
        """Bring the schema to the newest revision, under a lock that serialises starters."""

    @abc.abstractmethod
    def waker(self, worker_id: str, *, shared: bool = False) -> Waker:
        """A waker for the idle worker ``worker_id``: on a connection of its own, or with
        ``shared`` on one of the store's pool (a worker's, so that it holds no
        connection more; the pool must then be the waiting thread's alone while idle).

        It hears what wakes that worker alone: a write that queues jobs wakes as many
        idle workers as the jobs need, not every waker."""

    @abc.abstractmethod
    def stall_writes(self, seconds: float) -> None:
        """Hold every write to jobs back for ``seconds`` while reads go on (a fault for
        drills: what a long schema change or a stuck writer does to the queue)."""

    # ------------------------------------------------------------------ clock

    def expire_lease_now(self, job_id: str) -> None:
        """Move a running job's lease an hour into the past by the database clock, as if
        its holder had stopped renewing it long ago (for tests and drills; the next sweep
        finds it lapsed)."""
        with self._tx() as conn:
            n = conn.execute(jobs.update().where(
                jobs.c.id == job_id, jobs.c.state == JobState.RUNNING.value
            ).values(lease_expires_at=self._now - 3600.0)).rowcount
        if n != 1:
            raise JobNotFound(f"no running job with id {job_id!r}")

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        pipeline: str,
        params: dict[str, Any],
        *,
        priority: int = 0,
        max_retries: int = 4,
        on_preempt: OnPreempt = OnPreempt.RESUME,
        timeout: float | None = None,
        requires_cuda: bool = False,
        pool: str | None = None,
        owner: str | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        checkpoint_every_steps: int | None = None,
        checkpoint_every_seconds: float | None = None,
        max_preemptions: int | None = None,
        deadline: float | None = None,
        quota: Quota | None = None,
    ) -> Job:
        """Queue a job whose params were already validated; return it as stored.

        ``deadline`` is in seconds since the epoch. With ``quota`` (a user's submit) the
        job must fit it, or :class:`QuotaExceeded` is raised and nothing is queued. An
        ``idempotency_key`` that names ``owner``'s job gives that job back; one that names a
        different job (another pipeline or other params) raises :class:`KeyReused`.
        """
        return self.submit_many([NewJob(
            pipeline, params, priority=priority, max_retries=max_retries,
            on_preempt=on_preempt, timeout=timeout, requires_cuda=requires_cuda, pool=pool,
            idempotency_key=idempotency_key, callback_url=callback_url,
            checkpoint_every_steps=checkpoint_every_steps,
            checkpoint_every_seconds=checkpoint_every_seconds,
            max_preemptions=max_preemptions, deadline=deadline)],
            owner=owner, quota=quota)[0]

    def submit_many(self, items: Sequence[NewJob], *, owner: str | None = None,
                    quota: Quota | None = None) -> list[Job]:
        """Queue jobs whose params were already validated, in one transaction: all of them
        or none. Returns them as stored, in the items' order.

        An item whose idempotency key names a job of ``owner`` gives that job and queues
        nothing; items of one batch that share a key are one job. A key that names a
        different job (another pipeline or other params) raises :class:`KeyReused` naming
        the item. With ``quota`` (``owner``'s), each job must fit the request limits and
        the new jobs together the queued limit, or :class:`QuotaExceeded` is raised.
        Nothing is queued when anything is raised.
        """
        if not items:
            return []
        if quota is not None and owner is not None:
            for item in items:
                quota.check_request(owner, priority=item.priority,
                                    max_retries=item.max_retries,
                                    params_bytes=len(dumps(item.params).encode()))
        else:
            quota = None
        # One row per key: a batch that repeats a key asks for one job.
        first: dict[str, int] = {}
        write: list[int] = []  # the items written, by index
        slot: list[int] = []  # each item's place in ``write``
        for i, item in enumerate(items):
            key = item.idempotency_key
            if key is not None and key in first:
                was = items[write[first[key]]]
                if (was.pipeline, dumps(was.params)) != (item.pipeline, dumps(item.params)):
                    raise StoreError(f"items {write[first[key]]} and {i} share an "
                                     "idempotency key but are different jobs")
                slot.append(first[key])
                continue
            if key is not None:
                first[key] = len(write)
            slot.append(len(write))
            write.append(i)
        rows = [items[i].values(new_id(), owner) for i in write]
        written = self._insert_jobs(rows, write, owner=owner, quota=quota)
        return [written[k] for k in slot]

    def _insert_jobs(self, rows: list[dict[str, Any]], indexes: list[int], *,
                     owner: str | None, quota: Quota | None) -> list[Job]:
        """Write the rows of new jobs (:meth:`NewJob.values`, distinct keys) as
        :meth:`submit_many` promises; ``indexes`` are their items' places in the batch.
        Answers each row's job (the one its key already named, if it did)."""
        with self._tx() as conn:
            found = self._keyed_jobs(conn, rows, indexes, owner)
            fresh = [r for k, r in enumerate(rows) if k not in found]
            if quota is not None and owner is not None and fresh:
                self._check_queued_quota(conn, owner, quota, adding=len(fresh))
            if fresh:
                conn.execute(jobs.insert().values(
                    state=JobState.QUEUED.value, created_at=self._now,
                    updated_at=self._now), fresh)
                kind, message, data = render(Submitted())
                conn.execute(events.insert().values(at=self._now), [
                    {"job_id": r["id"], "kind": kind, "worker": None, "attempt": 0,
                     "message": message, "data": dumps(data)} for r in fresh])
            ids = [found.get(k, r["id"]) for k, r in enumerate(rows)]
            got = self._get_many(conn, ids)
        return [got[i] for i in ids]

    def _keyed_jobs(self, conn: Connection, rows: list[dict[str, Any]], indexes: list[int],
                    owner: str | None) -> dict[int, str]:
        """The rows whose idempotency key names a job of ``owner``: row -> that job's id.
        A key naming a different job raises :class:`KeyReused`."""
        keyed = {r["idempotency_key"]: k for k, r in enumerate(rows)
                 if r["idempotency_key"] is not None}
        if not keyed:
            return {}
        found: dict[int, str] = {}
        for row in conn.execute(sa.select(
                jobs.c.id, jobs.c.idempotency_key, jobs.c.pipeline, jobs.c.params).where(
                jobs.c.owner.is_(None) if owner is None else jobs.c.owner == owner,
                jobs.c.idempotency_key.in_(sorted(keyed)))):
            k = keyed[row.idempotency_key]
            if (row.pipeline, loads(row.params)) != (rows[k]["pipeline"],
                                                     loads(rows[k]["params"])):
                raise KeyReused(indexes[k], row.id)
            found[k] = row.id
        return found

    def _lock_owner(self, conn: Connection, owner: str) -> None:
        """Serialise one owner's submits (their quota check and insert) where writers run
        at once; SQLite's BEGIN IMMEDIATE already runs one writer at a time."""

    def _lock_job(self, conn: Connection, job_id: str) -> None:
        """Lock the job's row for the transaction, where rows lock (see cancel)."""

    def _check_queued_quota(self, conn: Connection, owner: str, quota: Quota, *,
                            adding: int = 1) -> None:
        # Two submits of one user at once must not both fit the last place.
        self._lock_owner(conn, owner)
        queued = int(conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.owner == owner, jobs.c.state == JobState.QUEUED.value)).scalar_one())
        if queued + adding > quota.max_queued:
            raise QuotaExceeded(owner, "max_queued", quota.max_queued, queued + adding)

    def quota_for(self, owner: str) -> Quota:
        """The limits that apply to ``owner``: the defaults with their own values."""
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(quotas).where(quotas.c.owner == owner)
                               ).mappings().first()
        return Quota.defaults().with_overrides(dict(row) if row is not None else {})

    def set_quota(self, owner: str, limits: dict[str, int | None]) -> Quota:
        """Set some of ``owner``'s own limits (None: back to the default)."""
        unknown = set(limits) - set(LIMIT_NAMES)
        if unknown:
            raise StoreError(f"unknown quota {sorted(unknown)[0]!r}")
        with self._tx() as conn:
            current = conn.execute(sa.select(quotas).where(quotas.c.owner == owner)
                                   ).mappings().first()
            if current is None:
                conn.execute(quotas.insert().values(owner=owner, **limits))
            else:
                conn.execute(quotas.update().where(quotas.c.owner == owner).values(**limits))
        return self.quota_for(owner)

    def get(self, job_id: str, *, with_events: bool = True) -> Job:
        with self._tx(write=False) as conn:
            return self._get(conn, job_id, with_events=with_events)

    def _get(self, conn: Connection, job_id: str, *, with_events: bool = True) -> Job:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        evs: tuple[Event, ...] = ()
        if with_events:
            evs = tuple(self._events(conn, job_id))
        return job_from_row(row, evs)

    def _get_many(self, conn: Connection, job_ids: Sequence[str]) -> dict[str, Job]:
        """The jobs with these ids, with their histories, by id (two reads, any count)."""
        wanted = sorted(set(job_ids))
        evs: dict[str, list[Event]] = {i: [] for i in wanted}
        for r in conn.execute(sa.select(events).where(events.c.job_id.in_(wanted))
                              .order_by(events.c.id)).mappings():
            evs[r["job_id"]].append(event_of(r))
        rows = conn.execute(sa.select(jobs).where(jobs.c.id.in_(wanted))).mappings()
        return {r["id"]: job_from_row(r, tuple(evs[r["id"]])) for r in rows}

    def find(self, job_id: str) -> Job | None:
        try:
            return self.get(job_id)
        except JobNotFound:
            return None

    def list_jobs(
        self,
        *,
        state: JobState | None = None,
        pipeline: str | None = None,
        owner: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = True,
    ) -> list[Job]:
        query = sa.select(jobs)
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if pipeline is not None:
            query = query.where(jobs.c.pipeline == pipeline)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        order = (jobs.c.created_at.desc(), jobs.c.id.desc()) if newest_first else (
            jobs.c.created_at, jobs.c.id)
        query = query.order_by(*order).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self._tx(write=False) as conn:
            return [job_from_row(r, ()) for r in conn.execute(query).mappings()]

    def events(self, job_id: str, *, after_id: int = 0) -> list[Event]:
        with self._tx(write=False) as conn:
            return list(self._events(conn, job_id, after_id=after_id))

    def _events(self, conn: Connection, job_id: str, *, after_id: int = 0) -> Iterator[Event]:
        rows = conn.execute(
            sa.select(events)
            .where(events.c.job_id == job_id, events.c.id > after_id)
            .order_by(events.c.id)
        ).mappings()
        for r in rows:
            yield event_of(r)

    def logs(self, job_id: str) -> list[LogLine]:
        with self._tx(write=False) as conn:
            self._get(conn, job_id, with_events=False)
            rows = conn.execute(
                sa.select(job_logs).where(job_logs.c.job_id == job_id).order_by(job_logs.c.id)
            ).mappings()
            return [
                LogLine(from_epoch(r["at"]), r["attempt"], r["level"], r["message"])
                for r in rows
            ]

    def change_marker(self) -> float:
        """A cheap value that moves whenever a job is added or changes (for live views):
        the newest ``updated_at``, read off its index."""
        with self._tx(write=False) as conn:
            return float(conn.execute(sa.select(sa.func.max(jobs.c.updated_at))
                                      ).scalar() or 0.0)

    def jobs_updated_since(self, since: float, *, after_id: str | None = None,
                           limit: int = 1000) -> list[JobRecord]:
        """Jobs whose row changed at or after ``since`` (database clock), oldest change
        first (by ``updated_at``, then id), at most ``limit``.

        For live views: they follow a watermark instead of re-reading every job. With
        ``after_id`` the read goes on after the job (``since``, ``after_id``), the last one
        of the page before: a batch stamps its jobs with one time, so a time alone cannot
        say where the next page begins.
        """
        after = (jobs.c.updated_at >= since if after_id is None else
                 sa.or_(jobs.c.updated_at > since,
                        sa.and_(jobs.c.updated_at == since, jobs.c.id > after_id)))
        query = (sa.select(jobs).where(after)
                 .order_by(jobs.c.updated_at, jobs.c.id).limit(limit))
        with self._tx(write=False) as conn:
            return [job_from_row(r, ()) for r in conn.execute(query).mappings()]

    def events_after(self, event_id: int, *, limit: int = 500
                     ) -> list[tuple[int, str, str, str | None]]:
        """Events of every job after ``event_id``: (event id, job id, kind, callback URL).

        For followers of the whole queue (callbacks, live views), in order.
        """
        with self._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(events.c.id, events.c.job_id, events.c.kind, jobs.c.callback_url)
                .join(jobs, jobs.c.id == events.c.job_id)
                .where(events.c.id > event_id)
                .order_by(events.c.id)
                .limit(limit)
            ).all()
        return [(int(r[0]), str(r[1]), str(r[2]), r[3]) for r in rows]

    def last_event_id(self) -> int:
        with self._tx(write=False) as conn:
            return int(conn.execute(sa.select(sa.func.max(events.c.id))).scalar() or 0)

    def add_note(self, job_id: str, note: Note) -> None:
        """Append an event that changes nothing (e.g. a callback could not be delivered)."""
        with self._tx() as conn:
            # The job's row lock, as every other write that adds an event takes: a job's
            # events then commit in id order, which the intake's event cursor relies on.
            row = conn.execute(sa.select(jobs.c.attempt).where(jobs.c.id == job_id)
                               .with_for_update()).first()
            if row is None:
                raise JobNotFound(f"no job with id {job_id!r}")
            self._record(conn, job_id, note, worker=None, attempt=row.attempt)

    def claim(
        self,
        *,
        worker_id: str,
        worker_name: str,
        lease_seconds: float,
        has_cuda: bool = False,
        pool: str | None = None,
        request_id: str | None = None,
        idle_if_empty: bool = False,
    ) -> tuple[Lease, JobRecord] | None:
        """Take the next queued job in (priority, first-in) order, with a fresh lease.

        With ``request_id``, the claim is recorded with it: if a call raised (a reply lost
        after the commit: a cut connection, a failover), its retry with the same id first
        looks for the job that call claimed, instead of taking a second one.

        On PostgreSQL, where a job queued wakes idle workers picked by their rows, the
        worker's row says busy from a claim that took a job, and idle from one that took
        none with ``idle_if_empty`` (the worker holds no other job).
        """
        if request_id is not None and request_id in self._unsure:
            mine = self._claimed_by(request_id, worker_id, worker_name)
            if mine is not None:
                self._unsure.discard(request_id)
                return mine
        try:
            got = self._claim(worker_id=worker_id, worker_name=worker_name,
                              lease_seconds=lease_seconds, has_cuda=has_cuda, pool=pool,
                              request_id=request_id, idle_if_empty=idle_if_empty)
        except Exception:
            self._unsure_of(request_id)
            raise
        if request_id is not None:
            self._unsure.discard(request_id)
        return got

    @abc.abstractmethod
    def _claim(self, *, worker_id: str, worker_name: str, lease_seconds: float,
               has_cuda: bool, pool: str | None, request_id: str | None,
               idle_if_empty: bool) -> tuple[Lease, JobRecord] | None:
        """The claim itself, in one transaction: pick, lease, and the claim's event."""

    def cancel(self, job_id: str, *, owner: str | None = None) -> Job:
        """Cancel a queued job now, or ask a running one to stop at its next step."""
        with self._tx() as conn:
            # Lock the row before reading its state: a claim committing between the read
            # and the write would otherwise leave "cancelled before it started" in the
            # history of a job that runs. The claim skips a locked row.
            self._lock_job(conn, job_id)
            job = self._get(conn, job_id, with_events=False)
            if owner is not None and job.owner != owner:
                raise JobNotFound(f"no job with id {job_id!r}")
            if job.state is JobState.QUEUED:
                n = conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)
                    .values(state=JobState.CANCELLED.value, error="cancelled",
                            finished_at=self._now, updated_at=self._now)
                ).rowcount
                if n != 1:  # cannot happen under the lock; never write a false history
                    raise StoreError(f"job {job_id} changed while it was being cancelled; "
                                     "try again")
                self._record(conn, job_id, Cancelled(CancelCause.QUEUED),
                             worker=None, attempt=job.attempt)
            elif job.state is JobState.RUNNING and not job.cancel_requested:
                conn.execute(
                    jobs.update().where(jobs.c.id == job_id)
                    .values(cancel_requested=True, updated_at=self._now)
                )
                self._record(conn, job_id, CancelRequested(), worker=None,
                             attempt=job.attempt)
            return self._get(conn, job_id)

    def register_worker(self, *, name: str, host: str, pid: int, pool: str,
                        has_cuda: bool, lease_seconds: float,
                        price_per_hour: float | None = None) -> str:
        worker_id = secrets.token_hex(8)
        with self._tx() as conn:
            conn.execute(workers.insert().values(
                id=worker_id, name=name, host=host, pid=pid, pool=pool,
                state=WorkerState.IDLE.value,
                has_cuda=has_cuda, lease_seconds=lease_seconds, price_per_hour=price_per_hour,
                started_at=self._now,
                last_heartbeat=self._now, alive_until=self._now + lease_seconds))
        registered_here(worker_id)
        return worker_id

    def set_worker_state(self, worker_id: str, state: WorkerState | str) -> None:
        state = WorkerState(state)
        values: dict[str, Any] = {"state": state.value, "last_heartbeat": self._now,
                                  "alive_until": self._now + workers.c.lease_seconds}
        if not state.is_live:
            values.update(stopped_at=self._now, current_job=None)
        with self._tx() as conn:
            conn.execute(workers.update().where(workers.c.id == worker_id).values(**values))
            if state not in (WorkerState.IDLE, WorkerState.BUSY):
                self._release_sweeper(conn, worker_id)  # a worker that stops sweeps no more

    def list_workers(self, *, include_stopped: bool = True) -> list[Worker]:
        query = sa.select(workers).order_by(workers.c.started_at, workers.c.name)
        if not include_stopped:
            query = query.where(workers.c.state.in_(sorted(s.value for s in LIVE_WORKER_STATES)))
        with self._tx(write=False) as conn:
            return [worker_from_row(r) for r in conn.execute(query).mappings()]

    def find_workers(self, name_or_id: str) -> list[Worker]:
        """Live workers with this id or name (a name may be reused by later processes)."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(workers)
                .where(sa.or_(workers.c.id == name_or_id, workers.c.name == name_or_id))
                .order_by(workers.c.started_at.desc())
            ).mappings().all()
        return [worker_from_row(r) for r in rows]


def event_of(r: Any) -> Event:
    """An event from its row."""
    data = loads(r["data"]) if r["data"] else None
    return Event(
        at=from_epoch(r["at"]),
        kind=r["kind"],
        worker=r["worker"],
        attempt=r["attempt"],
        message=r["message"],
        detail=data.get("detail") if isinstance(data, dict) else None,
        data=data if isinstance(data, dict) else None,
    )


# Each dialect's module registers its store when the package loads it (spotrun.store
# imports both), so that this interface never imports its implementations.
_DIALECTS: dict[str, type[JobStore]] = {}


def register_dialect(name: str, store: type[JobStore]) -> None:
    """Make ``JobStore.open`` give ``store`` for URLs of the SQLAlchemy dialect ``name``."""
    _DIALECTS[name] = store


def _dialect_store(name: str) -> type[JobStore]:
    try:
        return _DIALECTS[name]
    except KeyError:
        raise StoreError(f"unsupported database {name!r}: use SQLite or PostgreSQL") from None
