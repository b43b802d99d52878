"""The store on SQLite: its claim (with the fair-share pick), its result, its
``BEGIN IMMEDIATE`` transactions and its ``PRAGMA data_version`` wake-up.

SQLite runs one writer at a time: each write transaction takes the write lock at BEGIN
(a deferred one that later writes could fail with "database is locked" instead of
waiting), so the claim and the result need no row locks. Everything else is the shared
SQLAlchemy Core code of :mod:`spotrun.store.base` and :mod:`spotrun.store.leases`.
"""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from spotrun import migrations
from spotrun.jobs import JobState
from spotrun.schema import jobs, quotas
from spotrun.store.base import JobStore, Waker, register_dialect
from spotrun.store.claim_event import claim_payload
from spotrun.store.records import ClaimRequest, JobRecord, Lease, job_from_row


class SqliteStore(JobStore):
    """The queue on SQLite (the embedded default)."""

    # ------------------------------------------------------------ the hooks

    def _clock(self) -> sa.ColumnElement[float]:
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)

    def _begin_write(self, conn: Connection) -> Connection:
        return conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")

    def _bound_on_checkout(self, dbapi_conn: Any, ms: int) -> None:
        dbapi_conn.execute(f"PRAGMA busy_timeout = {ms}")

    def migrate(self) -> None:
        if self.current_revision() == migrations.head_revision():
            return
        with self._migration_lock(), self.engine.connect() as conn:
            migrations.upgrade(conn)
            conn.commit()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
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

    def waker(self, worker_id: str, *, shared: bool = False) -> Waker:
        return DataVersionWaker(self)

    def stall_writes(self, seconds: float) -> None:
        conn = sqlite3.connect(self.engine.url.database or "", isolation_level=None,
                               timeout=30)
        try:
            conn.execute("BEGIN IMMEDIATE")  # a writer holding the lock
            time.sleep(seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    # ------------------------------------------------------------------ sweep

    @contextlib.contextmanager
    def _sweep_tx(self, within: float | None) -> Iterator[Connection]:
        if within is None:
            with self._tx() as conn:
                yield conn
            return
        wait_ms = max(1, min(200, int(within * 1000)))
        with self.engine.connect() as conn:
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

    # ------------------------------------------------------- claim and result

    def _claim(self, *, worker_id: str, worker_name: str, lease_seconds: float,
               has_cuda: bool, pool: str | None, request_id: str | None,
               idle_if_empty: bool) -> tuple[Lease, JobRecord] | None:
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
            next_id = fair_share_pick(conn, has_cuda=has_cuda, pool=pool)
            if next_id is None:
                return None
            row = conn.execute(stmt, {"picked": next_id}).mappings().first()
            if row is None:
                return None
            job = job_from_row(row, ())
            said = claim_payload(worker=worker_name, attempt=job.attempt,
                                 checkpoint=job.checkpoint,
                                 checkpoint_step=job.checkpoint_step,
                                 progress_total=job.progress.total)
            # The worker's row (busy, current job) follows at its next heartbeat: the claim
            # is the queue's hot path, and keeps to the job's row and its event (on SQLite
            # every idle worker sees each commit, so no wake-up depends on the row).
            self._record(conn, job.id, said, worker=worker_name, attempt=job.attempt)
        return Lease(job.id, job.attempt, worker_id, worker_name), job

    def _write_result(self, lease: Lease, state: JobState, kind: str, message: str, *,
                      run_seconds: float, logs: Sequence[tuple[float, str, str]],
                      then_claim: ClaimRequest | None, values: dict[str, Any],
                      data: dict[str, Any] | None
                      ) -> tuple[Lease, JobRecord] | None:
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
                        attempt=lease.attempt, data=data)
        if then_claim is None:
            return None
        return self.claim(**then_claim.params())


class DataVersionWaker(Waker):
    """``PRAGMA data_version`` on a connection of its own: it changes when another
    connection commits, checked every few milliseconds."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self._sqlite: sqlite3.Connection | None = None
        self._last_version: int | None = None

    def wait(self, timeout: float) -> bool:
        try:
            if self._sqlite is None:
                self._sqlite = sqlite3.connect(
                    self.store.engine.url.database or ":memory:", timeout=30,
                    check_same_thread=False, isolation_level=None,
                )
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

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._sqlite is not None:
                self._sqlite.close()
        self._sqlite = None


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


def fair_share_pick(conn: Connection, *, has_cuda: bool, pool: str | None) -> str | None:
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




register_dialect("sqlite", SqliteStore)
