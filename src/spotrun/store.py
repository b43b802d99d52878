"""The job store: the only code that speaks SQL.

One SQLAlchemy Core implementation runs on SQLite (the embedded default) and PostgreSQL.
It is dialect-specific only where it must be: the queue's hot path (on PostgreSQL the claim
and the result are one hand-written statement each, see :meth:`JobStore._pg_one`; on
SQLite one ``BEGIN IMMEDIATE`` transaction each), the database clock, and wake-ups
(LISTEN/NOTIFY on PostgreSQL, ``PRAGMA data_version`` on SQLite).

Every write a worker makes to a job goes through :meth:`JobStore._fenced`, which conditions
it on (job id, attempt, state running) and raises :class:`LeaseLost` when no row matched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine, make_url

from spotrun.jobs import (
    Event,
    EventKind,
    Job,
    JobState,
    LogLine,
    MetricPoint,
    OnPreempt,
    Progress,
    Worker,
    from_epoch,
)
from spotrun.quotas import LIMIT_NAMES, Quota, QuotaExceeded
from spotrun.schema import (
    api_tokens,
    callback_deliveries,
    callback_leader,
    callback_secrets,
    events,
    intake_leases,
    intake_requests,
    job_logs,
    job_metrics,
    jobs,
    quotas,
    web_sessions,
    workers,
)
from spotrun.strictjson import finite

if TYPE_CHECKING:
    import psycopg

NOTIFY_CHANNEL = "spotrun_jobs"
# Points kept of a job's metric series (the training curve): a chart's width's worth.
MAX_METRIC_POINTS = 300
# PostgreSQL ends a session left idle inside a transaction this long (see create_engine).
IDLE_IN_TRANSACTION_MS = 10_000
_MIGRATION_LOCK_KEY = 0x5370_6F74  # "Spot": the advisory lock that serialises migrations


class StoreError(Exception):
    """The store cannot do what was asked; the message is for the user."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached."""


class DatabaseSlow(StoreError):
    """A call took so long that the database, not its callers, was the one late."""


class JobNotFound(StoreError):
    pass


class LeaseLost(StoreError):
    """A fenced write was refused: this attempt no longer holds the job's lease."""


@dataclass(frozen=True)
class Lease:
    """Proof of holding a job: every worker write carries it."""

    job_id: str
    attempt: int
    worker_id: str
    worker_name: str


@dataclass(frozen=True)
class ClaimRequest:
    """What a worker asks of a claim: who it is, how long a lease, what it can run.

    ``request_id`` names this one request: retried with the same id after an error, the
    claim (or the result that chains it) finds its own write if that had committed.
    """

    worker_id: str
    worker_name: str
    lease_seconds: float
    has_cuda: bool = False
    pool: str | None = None
    request_id: str | None = None

    def params(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "worker_name": self.worker_name,
                "lease_seconds": float(self.lease_seconds), "has_cuda": self.has_cuda,
                "pool": self.pool, "request_id": self.request_id}


@dataclass(frozen=True)
class Token:
    name: str
    is_admin: bool
    created_at: dt.datetime
    revoked: bool
    expires_at: dt.datetime | None = None


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use psycopg 3 for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def new_id() -> str:
    """A job id: time-ordered (so ids sort like submissions), 16 hex digits of randomness."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def _dumps(value: Any) -> str:
    """JSON text; NaN and infinities (a diverged loss) become null, as JSON has none."""
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except ValueError:
        return json.dumps(finite(value), separators=(",", ":"), sort_keys=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JobStore:
    """Durable queue of jobs with leases, fencing, events, logs, workers and API tokens."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.is_postgres = self.dialect == "postgresql"
        self._hot: list[psycopg.Connection[Any]] = []  # see _pg_one
        self._hot_lock = threading.Lock()
        self._hot_columns: dict[str, list[str]] = {}
        self._closed = False
        self._bounded_ms: int | None = None  # see bound_lock_waits
        # Request ids of writes that raised: committed or not, nobody knows (see claim).
        self._unsure: set[str] = set()
        if self.is_postgres:
            self._now: sa.ColumnElement[float] = sa.cast(
                sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float
            )
        else:
            self._now = sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)

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
        except sa.exc.OperationalError as exc:
            engine.dispose()
            raise DatabaseUnavailable(
                f"cannot reach the database at {redact(url)}: {_first_line(exc)}"
            ) from None
        return store

    def close(self) -> None:
        with self._hot_lock:
            self._closed = True
            hot, self._hot = self._hot, []
        for pg in hot:
            with contextlib.suppress(Exception):
                pg.close()
        self.engine.dispose()

    def migrate(self) -> None:
        """Bring the schema to the newest revision, under a lock that serialises starters."""
        from spotrun import migrations

        head = migrations.head_revision()
        if self.current_revision() == head:
            return
        if self.is_postgres:
            with self.engine.connect() as conn, conn.begin():
                # A migration may rewrite a large table: no worker's statement bound.
                conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
                conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
                migrations.upgrade(conn)
        else:
            with self._sqlite_migration_lock(), self.engine.connect() as conn:
                migrations.upgrade(conn)
                conn.commit()

    @contextlib.contextmanager
    def _sqlite_migration_lock(self) -> Iterator[None]:
        # SQLite's own write lock does not cover Alembic's reads of the schema, so a file
        # lock beside the database serialises the processes that start at once.
        db = self.engine.url.database
        if not db or db == ":memory:":
            yield
            return
        with open(f"{db}.migrate-lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None before the first migration)."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    # ------------------------------------------------------------- transactions

    @contextlib.contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if write and not self.is_postgres:
                # Take SQLite's write lock up front: a deferred transaction that later
                # writes can fail with "database is locked" instead of waiting.
                conn = conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
            with conn.begin():
                yield conn

    def _pg_one(self, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run one statement of the hot path on PostgreSQL as its own transaction.

        The claim and the result are one statement each (data-modifying CTEs), sent with
        psycopg on connections of their own, kept in autocommit: SQLAlchemy's per-call
        work (compiling, the pool's checkout and reset) cost the worker more CPU than the
        database spent on the job (measured 4.6 ms against 0.4 ms a job on PostgreSQL).
        These connections are not pinged before use; their callers retry, as the worker
        does. Driver errors are raised as SQLAlchemy's, as the rest of the store raises.
        """
        import psycopg

        with self._hot_lock:
            pg = self._hot.pop() if self._hot else None
        if pg is None:
            try:
                fairy = self.engine.raw_connection()
            except psycopg.Error as exc:
                # A refused or timed-out connect (a restart, a failover) must reach the
                # caller as the store's other errors do, or its retrier cannot know it.
                raise sa.exc.DBAPIError.instance(
                    sql, None, exc, psycopg.Error, hide_parameters=True,
                    connection_invalidated=True) from exc
            pg = fairy.driver_connection
            assert pg is not None
            fairy.detach()  # ours until closed: out of the pool's size and its resets
            pg.autocommit = True
        try:
            with pg.cursor() as cur:
                cur.execute(sql, params)
                row = cur.fetchone()
                # Column names decoded once per statement, not once per row.
                names = self._hot_columns.get(sql)
                if names is None and cur.description is not None:
                    names = self._hot_columns[sql] = [c.name for c in cur.description]
        except psycopg.Error as exc:
            lost = pg.closed or pg.broken
            if lost:
                with contextlib.suppress(Exception):
                    pg.close()
            else:
                self._put_hot(pg)
            raise sa.exc.DBAPIError.instance(
                sql, None, exc, psycopg.Error, hide_parameters=True,
                connection_invalidated=lost) from exc
        self._put_hot(pg)
        return None if row is None or names is None else dict(zip(names, row, strict=True))

    def _put_hot(self, pg: psycopg.Connection[Any]) -> None:
        with self._hot_lock:
            if self._closed:
                pg.close()
            else:
                self._hot.append(pg)

    def bound_lock_waits(self, seconds: float) -> None:
        """From now on a transaction waits at most ``seconds`` for a lock (a stop path).

        On SQLite the busy timeout of every connection checked out from now on; on
        PostgreSQL the lock timeout of pooled connections. Not a cost before it is called.
        """
        ms = max(1, int(seconds * 1000))
        if self._bounded_ms is not None:
            self._bounded_ms = min(self._bounded_ms, ms)
            return
        self._bounded_ms = ms

        def on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
            if self.is_postgres:
                autocommit = dbapi_conn.autocommit
                dbapi_conn.autocommit = True
                dbapi_conn.execute(f"SET lock_timeout = {self._bounded_ms}")
                dbapi_conn.autocommit = autocommit
            else:
                dbapi_conn.execute(f"PRAGMA busy_timeout = {self._bounded_ms}")

        sa_event.listen(self.engine, "checkout", on_checkout)

    def now(self) -> float:
        """The database's clock, in seconds since the epoch."""
        with self.engine.connect() as conn:
            return float(conn.execute(sa.select(self._now)).scalar_one())

    def _notify(self, conn: Connection, payload: str) -> None:
        if self.is_postgres:
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, payload)))

    def _event(
        self,
        conn: Connection,
        job_id: str,
        kind: str,
        message: str,
        *,
        worker: str | None,
        attempt: int,
        data: dict[str, Any] | None = None,
    ) -> None:
        conn.execute(
            events.insert().values(
                job_id=job_id,
                at=self._now,
                kind=kind,
                worker=worker,
                attempt=attempt,
                message=message,
                data=None if data is None else _dumps(data),
            )
        )

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
        job must fit it, or :class:`QuotaExceeded` is raised and nothing is queued.
        """
        job_id = new_id()
        if quota is not None and owner is not None:
            quota.check_request(owner, priority=priority, max_retries=max_retries,
                                params_bytes=len(_dumps(params).encode()))
        with self._tx() as conn:
            if idempotency_key is not None:
                existing = conn.execute(
                    sa.select(jobs.c.id).where(
                        jobs.c.idempotency_key == idempotency_key,
                        jobs.c.owner.is_(None) if owner is None else jobs.c.owner == owner,
                    )
                ).scalar()
                if existing is not None:
                    job_id = existing
                    return self._get(conn, job_id)
            if quota is not None and owner is not None:
                self._check_queued_quota(conn, owner, quota)
            conn.execute(
                jobs.insert().values(
                    id=job_id,
                    pipeline=pipeline,
                    params=_dumps(params),
                    state=JobState.QUEUED.value,
                    priority=priority,
                    max_retries=max_retries,
                    on_preempt=on_preempt.value,
                    timeout_seconds=timeout,
                    requires_cuda=requires_cuda,
                    pool=pool,
                    owner=owner,
                    idempotency_key=idempotency_key,
                    callback_url=callback_url,
                    checkpoint_every_steps=checkpoint_every_steps,
                    checkpoint_every_seconds=checkpoint_every_seconds,
                    max_preemptions=max_preemptions,
                    deadline=deadline,
                    created_at=self._now,
                    updated_at=self._now,
                )
            )
            self._event(
                conn, job_id, EventKind.SUBMITTED, "queued", worker=None, attempt=0
            )
            self._notify(conn, job_id)
            return self._get(conn, job_id)

    def _check_queued_quota(self, conn: Connection, owner: str, quota: Quota) -> None:
        if self.is_postgres:
            # Two submits of one user at once must not both fit the last place; SQLite's
            # BEGIN IMMEDIATE already runs one writer at a time.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                         {"key": f"spotrun-quota:{owner}"})
        queued = int(conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.owner == owner, jobs.c.state == JobState.QUEUED.value)).scalar_one())
        if queued + 1 > quota.max_queued:
            raise QuotaExceeded(owner, "max_queued", quota.max_queued, queued + 1)

    # ------------------------------------------------------------------ quotas

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

    # ------------------------------------------------------------------- reads

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
        return _job_from_row(row, evs)

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
            return [_job_from_row(r, ()) for r in conn.execute(query).mappings()]

    def count_by_state(self, states: Sequence[JobState] | None = None) -> dict[str, int]:
        """Jobs per state; with ``states``, only those (an index range: cheap for the
        live states whatever the size of the history)."""
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        if states is not None:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        with self._tx(write=False) as conn:
            rows = conn.execute(query).all()
        counts = {s.value: 0 for s in (JobState if states is None else states)}
        counts.update({state: int(n) for state, n in rows})
        return counts

    def event_kinds_after(self, event_id: int, *, limit: int = 5000
                          ) -> list[tuple[int, str, str, float]]:
        """Events of every job after ``event_id`` by primary key: (id, job id, kind, at),
        for counters that follow the history instead of re-reading it."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(events.c.id, events.c.job_id, events.c.kind, events.c.at)
                .where(events.c.id > event_id).order_by(events.c.id).limit(limit)).all()
        return [(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

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
            yield Event(
                at=from_epoch(r["at"]),
                kind=r["kind"],
                worker=r["worker"],
                attempt=r["attempt"],
                message=r["message"],
                detail=(_loads(r["data"]) or {}).get("detail") if r["data"] else None,
            )

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

    def change_marker(self) -> tuple[int, float]:
        """A cheap value that changes whenever any job changes (for live views)."""
        with self._tx(write=False) as conn:
            row = conn.execute(
                sa.select(sa.func.count(), sa.func.max(jobs.c.updated_at))
            ).one()
            return int(row[0]), float(row[1] or 0.0)

    # ------------------------------------------------------------------- claim

    def claim(
        self,
        *,
        worker_id: str,
        worker_name: str,
        lease_seconds: float,
        has_cuda: bool = False,
        pool: str | None = None,
        request_id: str | None = None,
    ) -> tuple[Lease, JobRecord] | None:
        """Take the next queued job in (priority, first-in) order, with a fresh lease.

        With ``request_id``, the claim is recorded with it: if a call raised (a reply lost
        after the commit: a cut connection, a failover), its retry with the same id first
        looks for the job that call claimed, instead of taking a second one.
        """
        if request_id is not None and request_id in self._unsure:
            mine = self._claimed_by(request_id, worker_id, worker_name)
            if mine is not None:
                self._unsure.discard(request_id)
                return mine
        try:
            got = self._claim(worker_id=worker_id, worker_name=worker_name,
                              lease_seconds=lease_seconds, has_cuda=has_cuda, pool=pool,
                              request_id=request_id)
        except Exception:
            self._unsure_of(request_id)
            raise
        if request_id is not None:
            self._unsure.discard(request_id)
        return got

    def _unsure_of(self, request_id: str | None) -> None:
        if request_id is not None:
            if len(self._unsure) > 1000:  # ids of requests never retried
                self._unsure.clear()
            self._unsure.add(request_id)

    def _claimed_by(self, request_id: str, worker_id: str, worker_name: str
                    ) -> tuple[Lease, JobRecord] | None:
        """The job a claim with this request id took and still holds, if any."""
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(jobs).where(
                sa.text("jobs.state = 'running'"), jobs.c.request_id == request_id,
                jobs.c.worker_id == worker_id)).mappings().first()
        if row is None:
            return None
        job = _job_from_row(row, ())
        return Lease(job.id, job.attempt, worker_id, worker_name), job

    def _claim(self, *, worker_id: str, worker_name: str, lease_seconds: float,
               has_cuda: bool, pool: str | None, request_id: str | None
               ) -> tuple[Lease, JobRecord] | None:
        if self.is_postgres:
            picked = self._pg_one(_PG_CLAIM, ClaimRequest(
                worker_id, worker_name, lease_seconds, has_cuda, pool, request_id).params())
            if picked is None:
                return None
            job = _job_from_row(picked, ())
            return Lease(job.id, job.attempt, worker_id, worker_name), job
        stmt = (
            jobs.update()
            .where(jobs.c.id == sa.bindparam("picked"), sa.text("jobs.state = 'queued'"))
            .values(
                state=JobState.RUNNING.value,
                attempt=jobs.c.attempt + 1,
                worker_id=worker_id,
                worker_name=worker_name,
                request_id=request_id,
                lease_expires_at=self._now + lease_seconds,
                started_at=sa.func.coalesce(jobs.c.started_at, self._now),
                updated_at=self._now,
            )
            .returning(*jobs.c)
        )
        with self._tx() as conn:
            next_id = _sqlite_pick(conn, has_cuda=has_cuda, pool=pool)
            if next_id is None:
                return None
            row = conn.execute(stmt, {"picked": next_id}).mappings().first()
            if row is None:
                return None
            job = _job_from_row(row, ())
            # _PG_CLAIM words the same event in SQL.
            if job.checkpoint_step is not None and job.checkpoint:
                kind, msg = EventKind.RESUMED, (
                    f"resumed on {worker_name} from step {job.checkpoint_step}"
                    + (f"/{job.progress.total}" if job.progress.total else "")
                )
            elif job.attempt > 1:
                kind, msg = EventKind.STARTED, (
                    f"restarted on {worker_name} from the beginning (attempt {job.attempt})"
                )
            else:
                kind, msg = EventKind.STARTED, f"started on {worker_name}"
            # The worker's row (busy, current job) follows at its next heartbeat: the claim
            # is the queue's hot path, and keeps to the job's row and its event.
            self._event(conn, job.id, kind, msg, worker=worker_name, attempt=job.attempt)
        return Lease(job.id, job.attempt, worker_id, worker_name), job

    # -------------------------------------------------------- fenced job writes

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
            f"the lease (the job {now})"
        )

    def heartbeat(self, worker_id: str, leases: Sequence[Lease], lease_seconds: float
                  ) -> dict[str, bool | None]:
        """Renew the worker's leases. Per job: cancel requested (bool), or None if lost."""
        out: dict[str, bool | None] = {}
        with self._tx() as conn:
            for lease in leases:
                row = conn.execute(
                    jobs.update()
                    .where(self._fenced(lease))
                    .values(lease_expires_at=self._now + lease_seconds)
                    .returning(jobs.c.cancel_requested)
                ).first()
                out[lease.job_id] = None if row is None else bool(row[0])
            held = [lease.job_id for lease in leases if out.get(lease.job_id) is not None]
            conn.execute(
                workers.update()
                .where(workers.c.id == worker_id)
                .values(last_heartbeat=self._now, current_job=held[0] if held else None,
                        state=sa.case((workers.c.state.in_(("idle", "busy")),
                                       "busy" if held else "idle"),
                                      else_=workers.c.state))
            )
        return out

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
                    progress_metrics=_dumps(metrics) if metrics else None,
                    updated_at=self._now,
                )
                .returning(jobs.c.cancel_requested)
            ).first()
            if row is None:
                raise self._refused(conn, lease, "progress")
            self._notify(conn, lease.job_id)
            self._insert_logs(conn, lease, logs)
            self._record_metrics(conn, lease, step, metrics)
            return bool(row[0])

    def _record_metrics(self, conn: Connection, lease: Lease, step: int,
                        metrics: dict[str, Any]) -> None:
        """Add a point to the job's metric series, thinned by half past the bound."""
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if not numeric:
            return
        conn.execute(job_metrics.insert().values(
            job_id=lease.job_id, attempt=lease.attempt, step=step, at=self._now,
            metrics=_dumps(numeric)))
        count = conn.execute(sa.select(sa.func.count()).select_from(job_metrics)
                             .where(job_metrics.c.job_id == lease.job_id)).scalar_one()
        if count > MAX_METRIC_POINTS:
            rows = conn.execute(sa.select(job_metrics.c.id, job_metrics.c.step)
                                .where(job_metrics.c.job_id == lease.job_id)
                                .order_by(job_metrics.c.step, job_metrics.c.id)).all()
            keep = _even_sample([r.step for r in rows], MAX_METRIC_POINTS // 2)
            conn.execute(job_metrics.delete().where(job_metrics.c.id.in_(
                [r.id for i, r in enumerate(rows) if i not in keep])))

    def metric_series(self, job_id: str) -> list[MetricPoint]:
        """The job's metric series, oldest step first (at most MAX_METRIC_POINTS points)."""
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(job_metrics)
                                .where(job_metrics.c.job_id == job_id)
                                .order_by(job_metrics.c.step, job_metrics.c.id)).all()
        return [MetricPoint(r.step, r.attempt, from_epoch(r.at), _loads(r.metrics))
                for r in rows]

    def _insert_logs(self, conn: Connection, lease: Lease,
                     logs: Sequence[tuple[float, str, str]]) -> None:
        if logs:
            conn.execute(job_logs.insert(), [
                {"job_id": lease.job_id, "attempt": lease.attempt, "at": at, "level": level,
                 "message": msg} for at, level, msg in logs])

    def add_event(self, lease: Lease, kind: str, message: str, *,
                  detail: str | None = None) -> None:
        """Append an event on behalf of the lease holder (refused for a zombie); ``detail``
        says how its message was worked out."""
        with self._tx() as conn:
            n = conn.execute(
                jobs.update().where(self._fenced(lease)).values(updated_at=self._now)
            ).rowcount
            if n != 1:
                raise self._refused(conn, lease, "event")
            self._event(conn, lease.job_id, kind, message, worker=lease.worker_name,
                        attempt=lease.attempt,
                        data=None if detail is None else {"detail": detail})

    def commit_checkpoint(
        self, lease: Lease, path: str, step: int, *, message: str | None = None
    ) -> str | None:
        """Point the job at a committed checkpoint; return the pointer that fell off.

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
            if message:
                self._event(conn, lease.job_id, EventKind.CHECKPOINT, message,
                            worker=lease.worker_name, attempt=lease.attempt)
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
        message: str,
        *,
        preempted: bool = True,
        keep_checkpoint: bool = True,
        run_seconds: float = 0.0,
        escalate_to: str | None = None,
        escalation: str = "",
    ) -> None:
        """Return a running job to the queue (a preemption, or a worker stopping).

        With ``escalate_to``, the job may from now on run only on workers of that pool,
        and ``escalation`` (why) goes into its history.
        """
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
        if escalate_to is not None:
            values["pool"] = escalate_to
        with self._tx() as conn:
            n = conn.execute(jobs.update().where(self._fenced(lease)).values(**values)).rowcount
            if n != 1:
                raise self._refused(conn, lease, "hand-back")
            kind = EventKind.PREEMPTED if preempted else EventKind.HANDED_BACK
            self._event(conn, lease.job_id, kind, message, worker=lease.worker_name,
                        attempt=lease.attempt)
            if escalate_to is not None:
                self._event(conn, lease.job_id, EventKind.ESCALATED, escalation,
                            worker=lease.worker_name, attempt=lease.attempt)
            self._release_worker(conn, lease)
            self._notify(conn, lease.job_id)

    def complete(self, lease: Lease, result: Any, *, run_seconds: float = 0.0,
                 message: str = "succeeded", progress: Progress | None = None,
                 logs: Sequence[tuple[float, str, str]] = (),
                 then_claim: ClaimRequest | None = None) -> tuple[Lease, JobRecord] | None:
        """Record the result, with the last progress and log lines, in one write.

        With ``then_claim``, also claim the worker's next job (returned), in the same
        write on PostgreSQL: a worker's loop costs one round trip a job, not two.
        """
        return self._finish(lease, JobState.SUCCEEDED, EventKind.SUCCEEDED, message,
                            result=_dumps(result), run_seconds=run_seconds,
                            progress=progress, logs=logs, then_claim=then_claim)

    def fail(self, lease: Lease, error: str, traceback: str | None = None, *,
             run_seconds: float = 0.0, progress: Progress | None = None,
             logs: Sequence[tuple[float, str, str]] = (),
             then_claim: ClaimRequest | None = None) -> tuple[Lease, JobRecord] | None:
        """Record the failure; ``then_claim`` as for :meth:`complete`."""
        return self._finish(lease, JobState.FAILED, EventKind.FAILED, f"failed: {error}",
                            error=error, error_traceback=traceback, run_seconds=run_seconds,
                            progress=progress, logs=logs, then_claim=then_claim)

    def finish_cancelled(self, lease: Lease, *, run_seconds: float = 0.0) -> None:
        self._finish(lease, JobState.CANCELLED, EventKind.CANCELLED,
                     "cancelled at the user's request", error="cancelled",
                     run_seconds=run_seconds)

    def _finish(self, lease: Lease, state: JobState, kind: str, message: str, *,
                run_seconds: float, progress: Progress | None = None,
                logs: Sequence[tuple[float, str, str]] = (),
                then_claim: ClaimRequest | None = None,
                **values: Any) -> tuple[Lease, JobRecord] | None:
        # The result is recorded with its chained claim's request id: a retry after a lost
        # reply finds both its result and the job it claimed.
        rid = None if then_claim is None else then_claim.request_id
        if rid is not None and rid in self._unsure and self._finished_by(lease, state, rid):
            self._unsure.discard(rid)
            assert then_claim is not None
            return self._claimed_by(rid, then_claim.worker_id, then_claim.worker_name)
        try:
            got = self._finish_once(lease, state, kind, message, run_seconds=run_seconds,
                                    progress=progress, logs=logs, then_claim=then_claim,
                                    request_id=rid, **values)
        except StoreError:
            raise
        except Exception:
            self._unsure_of(rid)
            raise
        if rid is not None:
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
                     **values: Any) -> tuple[Lease, JobRecord] | None:
        values["request_id"] = request_id
        if progress is not None:
            values.update(progress_step=progress.step, progress_total=progress.total,
                          progress_metrics=_dumps(progress.metrics) if progress.metrics
                          else None)
        if self.is_postgres:
            params = dict(values, job_id=lease.job_id, attempt=lease.attempt, state=state.value,
                          run_seconds=float(run_seconds), kind=str(kind),
                          worker=lease.worker_name, message=message)
            if logs:
                params.update(log_at=[at for at, _, _ in logs],
                              log_level=[level for _, level, _ in logs],
                              log_message=[msg for _, _, msg in logs])
            if then_claim is not None:
                params.update(then_claim.params())
            row = self._pg_one(_pg_finish_sql(tuple(sorted(values)), bool(logs),
                                              then_claim is not None), params)
            if row is None or row.get("finished") == 0:
                with self.engine.connect() as conn:
                    raise self._refused(conn, lease, f"{state.value} result")
            if then_claim is None or row["id"] is None:
                return None
            job = _job_from_row(row, ())
            return Lease(job.id, job.attempt, then_claim.worker_id,
                         then_claim.worker_name), job
        with self._tx() as conn:
            n = conn.execute(
                jobs.update()
                .where(self._fenced(lease))
                .values(
                    state=state.value,
                    lease_expires_at=None,
                    finished_at=self._now,
                    updated_at=self._now,
                    run_seconds=jobs.c.run_seconds + run_seconds,
                    **values,
                )
            ).rowcount
            if n != 1:
                raise self._refused(conn, lease, f"{state.value} result")
            self._insert_logs(conn, lease, logs)
            self._event(conn, lease.job_id, kind, message, worker=lease.worker_name,
                        attempt=lease.attempt)
            self._notify(conn, lease.job_id)
        if then_claim is None:
            return None
        return self.claim(**then_claim.params())

    def _release_worker(self, conn: Connection, lease: Lease) -> None:
        conn.execute(
            workers.update()
            .where(workers.c.id == lease.worker_id, workers.c.current_job == lease.job_id)
            .values(current_job=None,
                    state=sa.case((workers.c.state == "busy", "idle"), else_=workers.c.state))
        )

    # ------------------------------------------------------------------ cancel

    def cancel(self, job_id: str, *, owner: str | None = None) -> Job:
        """Cancel a queued job now, or ask a running one to stop at its next step."""
        with self._tx() as conn:
            if self.is_postgres:
                # Lock the row before reading its state: a claim committing between the
                # read and the write would otherwise leave "cancelled before it started"
                # in the history of a job that runs. The claim skips a locked row.
                conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)
                             .with_for_update())
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
                self._event(conn, job_id, EventKind.CANCELLED,
                            "cancelled at the user's request before it started",
                            worker=None, attempt=job.attempt)
                self._notify(conn, job_id)
            elif job.state is JobState.RUNNING and not job.cancel_requested:
                conn.execute(
                    jobs.update().where(jobs.c.id == job_id)
                    .values(cancel_requested=True, updated_at=self._now)
                )
                self._event(conn, job_id, EventKind.CANCEL_REQUESTED,
                            "cancel requested; the job stops at its next step",
                            worker=None, attempt=job.attempt)
            return self._get(conn, job_id)

    # ------------------------------------------------------------------- sweep

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
        expired = sa.and_(sa.text("jobs.state = 'running'"), jobs.c.lease_expires_at < self._now)
        with self._tx(write=False) as conn:
            any_expired = conn.execute(sa.select(jobs.c.id).where(expired).limit(1)).first()
        moved: list[str] = []
        if any_expired is not None:
            pick = sa.select(jobs).where(expired)
            if self.is_postgres:
                pick = pick.with_for_update(skip_locked=True)
            try:
                with self._sweep_tx(within) as conn:
                    if probe:
                        if self.is_postgres:
                            conn.execute(sa.text("LOCK TABLE jobs IN ROW EXCLUSIVE MODE"))
                        return []  # nothing written: the commit only ends the probe
                    for row in conn.execute(pick).mappings().all():
                        self._expire(conn, row)
                        moved.append(row["id"])
                    took = time.monotonic() - start
                    if within is not None and took > within:
                        raise DatabaseSlow(f"a sweep took {took:.1f} s; rolled back")
            except sa.exc.OperationalError as exc:
                if within is None:
                    raise
                raise DatabaseSlow(f"a sweep could not take its locks at once "
                                   f"({_first_line(exc)}); rolled back") from None
        if probe:
            return moved
        self.mark_gone_workers()
        return moved

    @contextlib.contextmanager
    def _sweep_tx(self, within: float | None) -> Iterator[Connection]:
        """The sweep's write transaction; with ``within``, its lock waits are short.

        A sweep that waits on a lock is waiting on what also holds the heartbeats back: it
        gives up at once rather than win the rows when the lock goes.
        """
        if within is None:
            with self._tx() as conn:
                yield conn
            return
        wait_ms = max(1, min(200, int(within * 1000)))
        with self.engine.connect() as conn:
            if self.is_postgres:
                with conn.begin():
                    conn.execute(sa.text(f"SET LOCAL lock_timeout = {wait_ms}"))
                    yield conn
                return
            # On the driver's connection: a statement through SQLAlchemy would begin the
            # transaction before the pragma could shorten its BEGIN IMMEDIATE's wait.
            raw: Any = conn.connection.driver_connection
            raw.execute(f"PRAGMA busy_timeout = {wait_ms}")
            try:
                with conn.execution_options(sqlite_begin="BEGIN IMMEDIATE").begin():
                    yield conn
            finally:
                restore = self._bounded_ms if self._bounded_ms is not None else 30_000
                raw.execute(f"PRAGMA busy_timeout = {restore}")

    def _expire(self, conn: Connection, row: Any) -> None:
        job = _job_from_row(row, ())
        who = job.worker or "?"
        where = job.progress.describe()
        lease = Lease(job.id, job.attempt, job.worker_id or "", who)
        cond = self._fenced(lease)
        if job.cancel_requested:
            conn.execute(jobs.update().where(cond).values(
                state=JobState.CANCELLED.value, error="cancelled", lease_expires_at=None,
                finished_at=self._now, updated_at=self._now))
            msg = f"lease of worker {who} expired at {where}; cancelled as requested"
            kind = EventKind.CANCELLED
        elif job.retries + 1 > job.max_retries:
            error = (f"lost its worker {job.retries + 1} times (last: lease of worker {who} "
                     f"expired at {where}); giving up after max_retries={job.max_retries}")
            conn.execute(jobs.update().where(cond).values(
                state=JobState.FAILED.value, retries=jobs.c.retries + 1, error=error,
                lease_expires_at=None, finished_at=self._now, updated_at=self._now))
            msg, kind = f"failed: {error}", EventKind.FAILED
        else:
            conn.execute(jobs.update().where(cond).values(
                state=JobState.QUEUED.value, retries=jobs.c.retries + 1, worker_id=None,
                worker_name=None, lease_expires_at=None, updated_at=self._now))
            msg = f"lease of worker {who} expired at {where}; back in the queue"
            kind = EventKind.LEASE_EXPIRED
        self._release_worker(conn, lease)
        self._event(conn, job.id, kind, msg, worker=job.worker, attempt=job.attempt)
        self._notify(conn, job.id)

    def pool_interruptions(self, pool: str) -> tuple[float, int]:
        """(worker-seconds lived, unannounced interruptions) in a pool.

        Unannounced interruptions are expired leases of that pool's workers: the losses a
        periodic checkpoint insures against (a notice is covered by its own checkpoint).
        """
        with self._tx(write=False) as conn:
            lived = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(
                    sa.func.coalesce(workers.c.stopped_at, workers.c.last_heartbeat)
                    - workers.c.started_at), 0.0)).where(workers.c.pool == pool)
            ).scalar_one()
            names = sa.select(workers.c.name).where(workers.c.pool == pool)
            hits = conn.execute(
                sa.select(sa.func.count()).select_from(events).where(
                    events.c.kind == EventKind.LEASE_EXPIRED.value,
                    events.c.worker.in_(names))
            ).scalar_one()
        return float(lived), int(hits)

    def mark_gone_workers(self) -> int:
        """Workers whose heartbeat is older than their own lease length are marked gone."""
        stale = workers.c.last_heartbeat + workers.c.lease_seconds < self._now
        live = workers.c.state.in_(("idle", "busy", "stopping"))
        with self._tx(write=False) as conn:
            if conn.execute(sa.select(workers.c.id).where(live, stale).limit(1)).first() is None:
                return 0
        with self._tx() as conn:
            return conn.execute(
                workers.update().where(live, stale).values(state="gone", current_job=None)
            ).rowcount

    # ----------------------------------------------------------------- workers

    def register_worker(self, *, name: str, host: str, pid: int, pool: str,
                        has_cuda: bool, lease_seconds: float,
                        price_per_hour: float | None = None) -> str:
        worker_id = secrets.token_hex(8)
        with self._tx() as conn:
            conn.execute(workers.insert().values(
                id=worker_id, name=name, host=host, pid=pid, pool=pool, state="idle",
                has_cuda=has_cuda, lease_seconds=lease_seconds, price_per_hour=price_per_hour,
                started_at=self._now,
                last_heartbeat=self._now))
        return worker_id

    def set_worker_state(self, worker_id: str, state: str) -> None:
        values: dict[str, Any] = {"state": state, "last_heartbeat": self._now}
        if state in ("stopped", "gone"):
            values.update(stopped_at=self._now, current_job=None)
        with self._tx() as conn:
            conn.execute(workers.update().where(workers.c.id == worker_id).values(**values))

    def list_workers(self, *, include_stopped: bool = True) -> list[Worker]:
        query = sa.select(workers).order_by(workers.c.started_at, workers.c.name)
        if not include_stopped:
            query = query.where(workers.c.state.in_(("idle", "busy", "stopping")))
        with self._tx(write=False) as conn:
            return [_worker_from_row(r) for r in conn.execute(query).mappings()]

    def find_workers(self, name_or_id: str) -> list[Worker]:
        """Live workers with this id or name (a name may be reused by later processes)."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(workers)
                .where(sa.or_(workers.c.id == name_or_id, workers.c.name == name_or_id))
                .order_by(workers.c.started_at.desc())
            ).mappings().all()
        return [_worker_from_row(r) for r in rows]

    def add_note(self, job_id: str, message: str, *, kind: str = EventKind.NOTE) -> None:
        """Append an event that changes nothing (e.g. a callback could not be delivered)."""
        with self._tx() as conn:
            # The job's row lock, as every other write that adds an event takes: a job's
            # events then commit in id order, which the intake's event cursor relies on.
            row = conn.execute(sa.select(jobs.c.attempt).where(jobs.c.id == job_id)
                               .with_for_update()).first()
            if row is None:
                raise JobNotFound(f"no job with id {job_id!r}")
            self._event(conn, job_id, kind, message, worker=None, attempt=row.attempt)

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

    # --------------------------------------------------------------- callbacks

    def callback_lead(self, holder: str, seconds: float) -> int | None:
        """Take or renew the callback deliverer's lease for ``seconds`` (database clock).

        Returns the settled horizon if ``holder`` now leads, else None: one deliverer at a
        time across every server process sharing the database.
        """
        with self._tx() as conn:
            row = conn.execute(
                callback_leader.update()
                .where(callback_leader.c.id == 1, sa.or_(
                    callback_leader.c.holder.is_(None), callback_leader.c.holder == holder,
                    callback_leader.c.expires_at < self._now))
                .values(holder=holder, expires_at=self._now + seconds)
                .returning(callback_leader.c.horizon)
            ).first()
        return None if row is None else int(row[0])

    def callback_resign(self, holder: str) -> None:
        """Give the lease up (a server stopping), so another leads at once."""
        with self._tx() as conn:
            conn.execute(callback_leader.update().where(
                callback_leader.c.id == 1, callback_leader.c.holder == holder
            ).values(holder=None, expires_at=None))

    def callbacks_pending(self, horizon: int, kinds: Sequence[str], *, limit: int = 500
                          ) -> list[tuple[int, str, str, str]]:
        """Events above the horizon, of these kinds, of jobs with a callback, that no
        deliverer recorded yet: (event id, job id, kind, URL), in id order.

        Not a cursor: an event whose transaction committed after a later id's is found at
        the next call all the same.
        """
        done = sa.select(callback_deliveries.c.event_id).where(
            callback_deliveries.c.event_id == events.c.id).exists()
        with self._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(events.c.id, events.c.job_id, events.c.kind, jobs.c.callback_url)
                .join(jobs, jobs.c.id == events.c.job_id)
                .where(events.c.id > horizon, jobs.c.callback_url.is_not(None),
                       events.c.kind.in_(list(kinds)), ~done)
                .order_by(events.c.id)
                .limit(limit)
            ).all()
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]

    def callback_secret(self, owner: str | None) -> str:
        """The key ``owner``'s callbacks are signed with (made at first use); None: the
        operators' jobs, which have no owner."""
        key = owner or ""
        with self._tx() as conn:
            found = conn.execute(sa.select(callback_secrets.c.secret).where(
                callback_secrets.c.owner == key)).scalar()
            if found is not None:
                return str(found)
            secret = "spcs_" + secrets.token_urlsafe(32)
            try:
                with conn.begin_nested():
                    conn.execute(callback_secrets.insert().values(
                        owner=key, secret=secret, created_at=self._now))
            except sa.exc.IntegrityError:  # made at the same moment by another process
                return str(conn.execute(sa.select(callback_secrets.c.secret).where(
                    callback_secrets.c.owner == key)).scalar_one())
            return secret

    def callback_done(self, holder: str, event_id: int) -> bool:
        """Record an event delivered (or given up on), if ``holder`` still leads."""
        leads = sa.select(callback_leader.c.id).where(
            callback_leader.c.id == 1, callback_leader.c.holder == holder,
            callback_leader.c.expires_at >= self._now).exists()
        with self._tx() as conn:
            if not conn.execute(sa.select(leads)).scalar():
                return False
            exists = conn.execute(sa.select(callback_deliveries.c.event_id).where(
                callback_deliveries.c.event_id == event_id)).first()
            if exists is None:
                conn.execute(callback_deliveries.insert().values(event_id=event_id,
                                                                 at=self._now))
            return True

    def callback_settle(self, holder: str, kinds: Sequence[str], settle_seconds: float
                        ) -> int | None:
        """Move the horizon up past events all delivered and older than ``settle_seconds``
        (no transaction of spotrun's lasts that long, so none of them can still commit),
        and forget their records. Returns the new horizon (None if not the leader)."""
        with self._tx() as conn:
            row = conn.execute(sa.select(callback_leader.c.horizon).where(
                callback_leader.c.id == 1, callback_leader.c.holder == holder)).first()
            if row is None:
                return None
            horizon = int(row[0])
            old = conn.execute(sa.select(sa.func.max(events.c.id)).where(
                events.c.id > horizon, events.c.at < self._now - settle_seconds)).scalar()
            if old is None:
                return horizon
            done = sa.select(callback_deliveries.c.event_id).where(
                callback_deliveries.c.event_id == events.c.id).exists()
            first_open = conn.execute(
                sa.select(sa.func.min(events.c.id))
                .join(jobs, jobs.c.id == events.c.job_id)
                .where(events.c.id > horizon, events.c.id <= old,
                       jobs.c.callback_url.is_not(None), events.c.kind.in_(list(kinds)),
                       ~done)).scalar()
            new = int(old) if first_open is None else int(first_open) - 1
            if new > horizon:
                conn.execute(callback_leader.update().where(callback_leader.c.id == 1)
                             .values(horizon=new))
                conn.execute(callback_deliveries.delete().where(
                    callback_deliveries.c.event_id <= new))
            return max(new, horizon)

    def last_event_id(self) -> int:
        with self._tx(write=False) as conn:
            return int(conn.execute(sa.select(sa.func.max(events.c.id))).scalar() or 0)

    # ------------------------------------------------------------------ tokens

    def create_token(self, name: str, *, admin: bool = False,
                     expires_in: float | None = None) -> str:
        """Create an API token; only its hash is stored, the token is returned once.

        With ``expires_in`` (seconds) it stops working then, by the database clock.
        """
        token = "spr_" + secrets.token_urlsafe(32)
        with self._tx() as conn:
            if conn.execute(sa.select(api_tokens.c.name).where(api_tokens.c.name == name)
                            ).first() is not None:
                raise StoreError(f"a token named {name!r} exists already")
            conn.execute(api_tokens.insert().values(
                name=name, token_hash=hash_token(token), is_admin=admin, created_at=self._now,
                expires_at=None if expires_in is None else self._now + expires_in))
        return token

    def extend_token(self, name: str, expires_in: float) -> None:
        """Move an active token's expiry to ``expires_in`` seconds from now."""
        with self._tx() as conn:
            n = conn.execute(api_tokens.update().where(
                api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None)
            ).values(expires_at=self._now + expires_in)).rowcount
            if n != 1:
                raise StoreError(f"no active token named {name!r}")

    def list_tokens(self) -> list[Token]:
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(api_tokens).order_by(api_tokens.c.name)).mappings()
            return [Token(r["name"], bool(r["is_admin"]), from_epoch(r["created_at"]),
                          r["revoked_at"] is not None,
                          None if r["expires_at"] is None else from_epoch(r["expires_at"]))
                    for r in rows]

    def revoke_token(self, name: str) -> None:
        with self._tx() as conn:
            n = conn.execute(api_tokens.update().where(
                api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None)
            ).values(revoked_at=self._now)).rowcount
            if n != 1:
                raise StoreError(f"no active token named {name!r}")

    def verify_token(self, token: str) -> Token | None:
        """The token's record if it is known, not revoked and not expired; else None."""
        with self._tx(write=False) as conn:
            r = conn.execute(sa.select(api_tokens).where(
                api_tokens.c.token_hash == hash_token(token),
                api_tokens.c.revoked_at.is_(None),
                sa.or_(api_tokens.c.expires_at.is_(None), api_tokens.c.expires_at > self._now),
            )).mappings().first()
        if r is None:
            return None
        return Token(r["name"], bool(r["is_admin"]), from_epoch(r["created_at"]), False,
                     None if r["expires_at"] is None else from_epoch(r["expires_at"]))

    # ---------------------------------------------------------------- sessions

    def create_session(self, token_name: str, *, expires_in: float) -> str:
        """Start a dashboard session for an active token; return its id (once)."""
        sid = "sps_" + secrets.token_urlsafe(32)
        with self._tx() as conn:
            # Ended sessions are of no use to anyone: clear them out as new ones come.
            conn.execute(web_sessions.delete().where(web_sessions.c.expires_at < self._now))
            conn.execute(web_sessions.insert().values(
                id_hash=hash_token(sid), token_name=token_name, created_at=self._now,
                expires_at=self._now + expires_in))
        return sid

    def verify_session(self, session_id: str) -> Token | None:
        """The token a live session signed in with; None once the session or the token
        is expired or revoked."""
        query = (sa.select(api_tokens).join(web_sessions,
                                            web_sessions.c.token_name == api_tokens.c.name)
                 .where(web_sessions.c.id_hash == hash_token(session_id),
                        web_sessions.c.revoked_at.is_(None),
                        web_sessions.c.expires_at > self._now,
                        api_tokens.c.revoked_at.is_(None),
                        sa.or_(api_tokens.c.expires_at.is_(None),
                               api_tokens.c.expires_at > self._now)))
        with self._tx(write=False) as conn:
            r = conn.execute(query).mappings().first()
        if r is None:
            return None
        return Token(r["name"], bool(r["is_admin"]), from_epoch(r["created_at"]), False,
                     None if r["expires_at"] is None else from_epoch(r["expires_at"]))

    def revoke_session(self, session_id: str) -> None:
        """End a session (sign-out); unknown or ended sessions are left as they are."""
        with self._tx() as conn:
            conn.execute(web_sessions.update().where(
                web_sessions.c.id_hash == hash_token(session_id),
                web_sessions.c.revoked_at.is_(None)).values(revoked_at=self._now))

    def jobs_updated_since(self, since: float, *, limit: int = 1000) -> list[Job]:
        """Jobs whose row changed at or after ``since`` (database clock), oldest change first.

        For live views: they follow a watermark instead of re-reading every job.
        """
        query = (sa.select(jobs).where(jobs.c.updated_at >= since)
                 .order_by(jobs.c.updated_at, jobs.c.id).limit(limit))
        with self._tx(write=False) as conn:
            return [_job_from_row(r, ()) for r in conn.execute(query).mappings()]

    def preemption_handoffs(self) -> list[float | None]:
        """For each preemption hand-back ("preempted" event): the seconds until the job
        started or resumed on a worker again, or None while it has not (yet)."""
        later = events.alias("later")
        next_start = (
            sa.select(sa.func.min(later.c.at))
            .where(later.c.job_id == events.c.job_id, later.c.id > events.c.id,
                   later.c.kind.in_((EventKind.STARTED.value, EventKind.RESUMED.value)))
            .scalar_subquery()
        )
        query = sa.select(events.c.at, next_start).where(
            events.c.kind == EventKind.PREEMPTED.value)
        with self._tx(write=False) as conn:
            return [None if r[1] is None else max(0.0, float(r[1]) - float(r[0]))
                    for r in conn.execute(query).all()]

    # ------------------------------------------------------------------ intake

    def record_intake(self, job_id: str, *, source: str, message_id: str,
                      idempotency_key: str | None) -> None:
        """Remember the bus message that asked for a job; the first one recorded stays."""
        row = {"job_id": job_id, "source": source, "message_id": message_id,
               "idempotency_key": idempotency_key, "created_at": self._now}
        try:
            with self._tx() as conn:
                if conn.execute(sa.select(intake_requests.c.job_id).where(
                        intake_requests.c.job_id == job_id)).first() is None:
                    conn.execute(intake_requests.insert().values(**row))
        except sa.exc.IntegrityError:
            pass  # a redelivery of the same request recorded it at the same time

    def intake_request(self, job_id: str) -> tuple[str, str, str | None] | None:
        """(source, message id, idempotency key) of a job that came from a bus, else None."""
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(
                intake_requests.c.source, intake_requests.c.message_id,
                intake_requests.c.idempotency_key).where(intake_requests.c.job_id == job_id)
            ).first()
        return None if row is None else (row[0], row[1], row[2])

    def intake_events(self, source: str, *, limit: int = 500) -> list[IntakeEvent]:
        """Events not yet published of the jobs that came from ``source``, oldest first.

        Each job has its own cursor, so an event that commits after a later one of another
        job is still found; within a job, events commit in id order (its row is locked).
        """
        r = intake_requests
        query = (
            sa.select(events, r.c.message_id, r.c.idempotency_key, jobs.c.state,
                      jobs.c.result, jobs.c.error)
            .select_from(r)
            .join(events, sa.and_(events.c.job_id == r.c.job_id,
                                  events.c.id > r.c.published_event_id))
            .join(jobs, jobs.c.id == r.c.job_id)
            .where(r.c.source == source, sa.text("NOT intake_requests.done"))
            .order_by(events.c.id)
            .limit(limit)
        )
        with self._tx(write=False) as conn:
            rows = conn.execute(query).mappings().all()
        return [IntakeEvent(
            event_id=int(x["id"]), job_id=x["job_id"], kind=x["kind"], at=float(x["at"]),
            worker=x["worker"], attempt=int(x["attempt"]), message=x["message"],
            data=_loads(x["data"]), message_id=x["message_id"],
            idempotency_key=x["idempotency_key"], job_state=JobState(x["state"]),
            result=_loads(x["result"]), error=x["error"]) for x in rows]

    def mark_intake_published(self, job_id: str, event_id: int, *, done: bool) -> None:
        """Move a job's publication cursor forward (never back); ``done`` after its final
        event."""
        values: dict[str, Any] = {"published_event_id": event_id}
        if done:
            values["done"] = True
        with self._tx() as conn:
            conn.execute(intake_requests.update().where(
                intake_requests.c.job_id == job_id,
                intake_requests.c.published_event_id < event_id).values(**values))

    def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew the named lease for ``holder``; True while it holds the lease.

        For work that one process at a time must do, in whichever replica it runs.
        """
        lease = intake_leases
        try:
            with self._tx() as conn:
                n = conn.execute(lease.update().where(
                    lease.c.name == name,
                    sa.or_(lease.c.holder == holder, lease.c.expires_at < self._now),
                ).values(holder=holder, expires_at=self._now + seconds)).rowcount
                if n == 1:
                    return True
                if conn.execute(sa.select(lease.c.name).where(lease.c.name == name)
                                ).first() is not None:
                    return False
                conn.execute(lease.insert().values(name=name, holder=holder,
                                                   expires_at=self._now + seconds))
                return True
        except sa.exc.IntegrityError:
            return False  # another process inserted it first

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as conn:
            conn.execute(intake_leases.delete().where(intake_leases.c.name == name,
                                                      intake_leases.c.holder == holder))


_SQLITE_QUEUED_OWNERS = sa.text("""
WITH RECURSIVE named(o) AS (
    SELECT (SELECT owner FROM jobs WHERE state = 'queued' AND owner IS NOT NULL
            ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT owner FROM jobs WHERE state = 'queued' AND owner > named.o
            ORDER BY owner LIMIT 1)
    FROM named WHERE named.o IS NOT NULL
)
SELECT o FROM named WHERE o IS NOT NULL""")


def _sqlite_pick(conn: Connection, *, has_cuda: bool, pool: str | None) -> str | None:
    """The claim's pick on SQLite, shared fairly by owner: the steps of PostgreSQL's
    ``spotrun_next_job`` (migration 0008), inside the claim's BEGIN IMMEDIATE."""
    # The state test is literal so that it matches the partial index.
    queued = sa.text("jobs.state = 'queued'")
    runnable: list[sa.ColumnElement[bool] | sa.TextClause] = [queued]
    if not has_cuda:
        runnable.append(jobs.c.requires_cuda == sa.false())
    if pool is not None:
        runnable.append(sa.or_(jobs.c.pool.is_(None), jobs.c.pool == pool))
    order = (jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)

    def first(*cond: sa.ColumnElement[bool] | sa.TextClause) -> str | None:
        found = conn.execute(sa.select(jobs.c.id).where(*runnable, *cond)
                             .order_by(*order).limit(1)).scalar()
        return None if found is None else str(found)

    urgent = first(jobs.c.priority > 0)  # an operator's right: ahead of every share
    if urgent is not None:
        return urgent
    # The owners with queued jobs by a loose scan of ix_jobs_state_owner (one probe per
    # owner, not a read of the whole queue), then the operators' (no owner) if any.
    owners: list[str | None] = [r[0] for r in conn.execute(_SQLITE_QUEUED_OWNERS).all()]
    if conn.execute(sa.select(jobs.c.id).where(queued, jobs.c.owner.is_(None)).limit(1)
                    ).first() is not None:
        owners.append(None)
    if not owners:
        return None

    def mine(owner: str | None) -> sa.ColumnElement[bool]:
        return jobs.c.owner.is_(None) if owner is None else jobs.c.owner == owner

    ranked = []
    for owner in owners:
        n = int(conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            sa.text("jobs.state = 'running'"), mine(owner))).scalar_one())
        limit = None if owner is None else conn.execute(
            sa.select(quotas.c.max_running).where(quotas.c.owner == owner)).scalar()
        if limit and n >= limit:
            continue
        head = conn.execute(sa.select(jobs.c.created_at).where(queued, mine(owner))
                            .order_by(*order).limit(1)).scalar()
        ranked.append((n, head, owner))
    for _n, _head, owner in sorted(ranked, key=lambda t: (t[0], t[1])):
        picked = first(mine(owner))
        if picked is not None:
            return picked
    return None


# --------------------------------------------------- PostgreSQL's hot path

_PG_NOW = "extract(epoch FROM clock_timestamp())::float8"
_RESUMABLE = "upd.checkpoint_step IS NOT NULL AND coalesce(upd.checkpoint, '') <> ''"

# The claim's common table expressions: pick (migration 0003's function), lease, and the
# event, worded as JobStore.claim words it on SQLite. {pick_from} chains it to a result.
_PG_CLAIM_CTES = f"""
pick AS (
    SELECT spotrun_next_job(%(has_cuda)s::boolean, %(pool)s::varchar) AS id {{pick_from}}
), upd AS (
    UPDATE jobs SET state = '{JobState.RUNNING.value}', attempt = jobs.attempt + 1,
        worker_id = %(worker_id)s, worker_name = %(worker_name)s,
        request_id = %(request_id)s, lease_expires_at = {_PG_NOW} + %(lease_seconds)s,
        started_at = coalesce(jobs.started_at, {_PG_NOW}), updated_at = {_PG_NOW}
    -- The function locked a queued row; matching on the id alone keeps the primary key
    -- as the plan whatever the statistics say.
    WHERE jobs.id = (SELECT id FROM pick)
    RETURNING jobs.*
), ev AS (
    INSERT INTO events (job_id, at, kind, worker, attempt, message)
    SELECT upd.id, {_PG_NOW},
        CASE WHEN {_RESUMABLE} THEN '{EventKind.RESUMED.value}'
             ELSE '{EventKind.STARTED.value}' END,
        upd.worker_name, upd.attempt,
        CASE WHEN {_RESUMABLE}
             THEN 'resumed on ' || upd.worker_name || ' from step ' || upd.checkpoint_step
                  || CASE WHEN coalesce(upd.progress_total, 0) <> 0
                          THEN '/' || upd.progress_total ELSE '' END
             WHEN upd.attempt > 1
             THEN 'restarted on ' || upd.worker_name || ' from the beginning (attempt '
                  || upd.attempt || ')'
             ELSE 'started on ' || upd.worker_name END
    FROM upd
)"""

_PG_CLAIM = "WITH " + _PG_CLAIM_CTES.format(pick_from="") + "\nSELECT * FROM upd"


@functools.cache
def _pg_finish_sql(columns: tuple[str, ...], with_logs: bool, then_claim: bool) -> str:
    """The fenced result in one statement: the row, its event, its last log lines, NOTIFY.

    With ``then_claim``, the same statement claims the worker's next job, only if the
    result was written; it answers one row: ``finished`` (0 when refused) and the job.
    """
    sets = "".join(f", {c} = %({c})s" for c in columns)
    finish = f"""
WITH fin AS (
    UPDATE jobs SET state = %(state)s, lease_expires_at = NULL, finished_at = {_PG_NOW},
        updated_at = {_PG_NOW}, run_seconds = run_seconds + %(run_seconds)s{sets}
    WHERE id = %(job_id)s AND attempt = %(attempt)s
      AND state = '{JobState.RUNNING.value}'
    RETURNING id
), fin_event AS (
    INSERT INTO events (job_id, at, kind, worker, attempt, message)
    SELECT fin.id, {_PG_NOW}, %(kind)s, %(worker)s, %(attempt)s, %(message)s FROM fin
)"""
    if with_logs:
        finish += """, fin_logs AS (
    INSERT INTO job_logs (job_id, attempt, at, level, message)
    SELECT fin.id, %(attempt)s, l.at, l.level, l.message
    FROM fin, unnest(%(log_at)s::float8[], %(log_level)s::varchar[],
                     %(log_message)s::text[]) WITH ORDINALITY AS l(at, level, message, n)
    ORDER BY l.n
)"""
    notify = f"SELECT pg_notify('{NOTIFY_CHANNEL}', fin.id) FROM fin"
    if not then_claim:
        return finish + "\n" + notify
    return (finish + ",\n" + _PG_CLAIM_CTES.format(pick_from="FROM fin")
            + f"\nSELECT n.finished, upd.* FROM (SELECT count(*) AS finished FROM ({notify}) x) n"
            + " LEFT JOIN upd ON true")


# ---------------------------------------------------------------------- helpers

def _even_sample(steps: Sequence[int], n: int) -> set[int]:
    """Indexes of about ``n`` of the sorted ``steps``, spread evenly over their whole span
    (the first and the last always kept): a thinned curve keeps its shape."""
    if len(steps) <= n or n < 2:
        return set(range(len(steps)))
    lo, hi = steps[0], steps[-1]
    keep, j = {0, len(steps) - 1}, 0
    for i in range(1, n - 1):
        target = lo + (hi - lo) * i / (n - 1)
        while j + 1 < len(steps) and abs(steps[j + 1] - target) <= abs(steps[j] - target):
            j += 1
        keep.add(j)
    return keep


def _job_from_row(row: Any, evs: tuple[Event, ...]) -> JobRecord:
    metrics = _loads(row["progress_metrics"]) or {}
    return JobRecord(
        id=row["id"],
        pipeline=row["pipeline"],
        params=_loads(row["params"]),
        state=JobState(row["state"]),
        priority=row["priority"],
        attempt=row["attempt"],
        preemptions=row["preemptions"],
        retries=row["retries"],
        max_retries=row["max_retries"],
        on_preempt=OnPreempt(row["on_preempt"]),
        timeout=row["timeout_seconds"],
        worker_id=row["worker_id"],
        worker=row["worker_name"],
        lease_expires_at=None if row["lease_expires_at"] is None
        else from_epoch(row["lease_expires_at"]),
        progress=Progress(row["progress_step"], row["progress_total"], metrics),
        result=_loads(row["result"]),
        error=row["error"],
        error_traceback=row["error_traceback"],
        checkpoint=row["checkpoint"],
        checkpoint_prev=row["checkpoint_prev"],
        requires_cuda=bool(row["requires_cuda"]),
        cancel_requested=bool(row["cancel_requested"]),
        run_seconds=float(row["run_seconds"] or 0.0),
        owner=row["owner"],
        created_at=from_epoch(row["created_at"]),
        updated_at=from_epoch(row["updated_at"]),
        events=evs,
        checkpoint_step=row["checkpoint_step"],
        checkpoint_prev_step=row["checkpoint_prev_step"],
        checkpoint_every_steps=row["checkpoint_every_steps"],
        checkpoint_every_seconds=row["checkpoint_every_seconds"],
        callback_url=row["callback_url"],
        pool=row["pool"],
        max_preemptions=row["max_preemptions"],
        deadline=row["deadline"],
        started_at=None if row["started_at"] is None else float(row["started_at"]),
        created_epoch=float(row["created_at"]),
    )


@dataclass(frozen=True)
class JobRecord(Job):
    """A job with the fields that only workers and operators need."""

    checkpoint_step: int | None = None
    checkpoint_prev_step: int | None = None
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = None
    callback_url: str | None = None
    pool: str | None = None
    max_preemptions: int | None = None
    deadline: float | None = None
    started_at: float | None = None
    created_epoch: float = 0.0


@dataclass(frozen=True)
class IntakeEvent:
    """An event of a job that came from a message bus, with what its publication needs."""

    event_id: int
    job_id: str
    kind: str
    at: float
    worker: str | None
    attempt: int
    message: str
    data: Any
    message_id: str
    idempotency_key: str | None
    job_state: JobState
    result: Any
    error: str | None

def _worker_from_row(r: Any) -> Worker:
    return Worker(
        id=r["id"], name=r["name"], host=r["host"], pid=r["pid"], pool=r["pool"],
        state=r["state"], has_cuda=bool(r["has_cuda"]), current_job=r["current_job"],
        started_at=from_epoch(r["started_at"]), last_heartbeat=from_epoch(r["last_heartbeat"]),
        price_per_hour=r["price_per_hour"],
    )


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def _create_private(path: Path) -> None:
    """Create ``path`` empty, readable by its owner only, unless it exists."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


# TCP keepalives and a user timeout: a connection whose peer vanished without a reset (a
# partitioned network, a failed-over address) is found dead in about half a minute, idle or
# not, instead of after the kernel's two hours.
PG_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 20_000}
PG_CONNECT_TIMEOUT = 5


def create_engine(url: str, *, pool_size: int = 5, pre_ping: bool = True,
                  statement_timeout: float | None = None) -> Engine:
    """An engine tuned for the queue: WAL and a busy timeout on SQLite, pre-ping on PG.

    On PostgreSQL every connection has a connect timeout and TCP keepalives, and with
    ``statement_timeout`` (seconds) a bound on each statement and each lock wait.
    """
    try:
        u = make_url(url)
    except sa.exc.ArgumentError:
        raise StoreError("the database URL is not one spotrun can use: give sqlite:///PATH "
                         "or postgresql://USER@HOST/DB") from None
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            try:
                # Jobs, params, results and token hashes are the user's alone: a directory
                # spotrun makes is private, and so is a database file it creates (SQLite
                # gives its -wal and -shm files the database's permissions).
                Path(u.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                _create_private(Path(u.database))
            except OSError as exc:
                raise StoreError(f"cannot create the database {u.database}: "
                                 f"{exc.strerror or exc}") from None
        engine = sa.create_engine(
            u, connect_args={"timeout": 30.0, "check_same_thread": False},
            pool_size=pool_size, max_overflow=10,
        )

        @sa_event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's begin event, not the driver, decide how transactions begin.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa_event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))

        return engine
    if u.get_backend_name() == "postgresql":
        engine = sa.create_engine(
            u, pool_pre_ping=pre_ping, pool_size=pool_size, max_overflow=10,
            connect_args={"connect_timeout": PG_CONNECT_TIMEOUT, **PG_KEEPALIVES},
        )
        bound_ms = None if statement_timeout is None else max(1, int(statement_timeout * 1000))

        @sa_event.listens_for(engine, "connect")
        def _on_pg_connect(dbapi_conn: Any, _record: Any) -> None:
            # A worker frozen inside a transaction (SIGSTOP, a paused VM) would hold its
            # job's row lock, and no sweep could requeue the job until it thawed: the
            # server ends such a transaction instead. spotrun's transactions hold SQL only.
            autocommit = dbapi_conn.autocommit
            dbapi_conn.autocommit = True
            dbapi_conn.execute(
                f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
            if bound_ms is not None:
                # A statement or lock wait longer than a lease is an outage to its caller.
                dbapi_conn.execute(f"SET statement_timeout = {bound_ms}")
                dbapi_conn.execute(f"SET lock_timeout = {bound_ms}")
            dbapi_conn.autocommit = autocommit

        return engine
    raise StoreError(
        f"unsupported database URL {redact(url)}: use sqlite:///PATH or postgresql://..."
    )


class Waker:
    """Wakes an idle worker when the queue may have changed, instead of a busy poll.

    PostgreSQL: LISTEN on a dedicated connection. SQLite: ``PRAGMA data_version``, which
    changes when another connection commits, checked every few milliseconds.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._pg: Any = None
        self._listening = False
        self._sqlite: Any = None
        self._last_version: int | None = None

    def _open(self) -> None:
        if self.store.is_postgres:
            import psycopg

            u = self.store.engine.url
            self._pg = psycopg.connect(
                host=u.host or "localhost", port=u.port or 5432, user=u.username,
                password=u.password, dbname=u.database, autocommit=True,
                connect_timeout=PG_CONNECT_TIMEOUT, **PG_KEEPALIVES,
            )
        else:
            import sqlite3

            self._sqlite = sqlite3.connect(
                self.store.engine.url.database or ":memory:", timeout=30,
                check_same_thread=False, isolation_level=None,
            )

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` s; True if something may have changed."""
        try:
            if self._pg is None and self._sqlite is None:
                self._open()
            if self._pg is not None:
                if not self._listening:
                    self._pg.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._listening = True
                got = False
                for _ in self._pg.notifies(timeout=timeout, stop_after=1):
                    got = True
                return got
            deadline = time.monotonic() + timeout
            while True:
                version = self._sqlite.execute("PRAGMA data_version").fetchone()[0]
                if self._last_version is not None and version != self._last_version:
                    self._last_version = version
                    return True
                self._last_version = version
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(min(0.005, left))
        except Exception:
            self.close()
            time.sleep(min(timeout, 0.5))
            return True

    def busy(self) -> None:
        """The worker has work: stop listening until it waits again.

        PostgreSQL signals every listening session of the database on every NOTIFY, and
        each job's result sends one: busy workers would cost the server a wake-up per job.
        """
        if self._listening:
            try:
                self._pg.execute("UNLISTEN *")
                self._listening = False
            except Exception:
                self.close()

    def close(self) -> None:
        for conn in (self._pg, self._sqlite):
            with contextlib.suppress(Exception):
                if conn is not None:
                    conn.close()
        self._pg = self._sqlite = None
        self._listening = False
