"""What every part of the store stands on: the engine, transactions, the database clock,
an event row, and the dialect's hooks that the shared SQLAlchemy Core code calls."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from spotrun.events import Payload, render
from spotrun.schema import events, jobs
from spotrun.store.errors import MapsDriverErrors
from spotrun.store.records import JobRecord, Lease, dumps, job_from_row


class StoreCore(MapsDriverErrors, abc.ABC):
    """The engine and its transactions; a dialect's store fills in the hooks below."""

    is_postgres: ClassVar[bool] = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._closed = False
        self._bounded_ms: int | None = None  # see bound_lock_waits
        # Request ids of writes that raised: committed or not, nobody knows (see claim).
        self._unsure: set[str] = set()
        self._sweeper_row_seen = False  # see LeaseWrites.beat
        self._now: sa.ColumnElement[float] = self._clock()

    # ------------------------------------------------------------ dialect hooks

    @abc.abstractmethod
    def _clock(self) -> sa.ColumnElement[float]:
        """The database clock as an SQL expression, in seconds since the epoch."""

    def _begin_write(self, conn: Connection) -> Connection:
        """The connection a write transaction begins on (SQLite takes its lock at BEGIN)."""
        return conn

    def _bound_on_checkout(self, dbapi_conn: Any, ms: int) -> None:
        """Bound the lock waits of a connection checked out (see bound_lock_waits)."""

    def _wake_idle(self, conn: Connection, job_id: str | None = None, *, jobs: int = 1
                   ) -> None:
        """Wake, with the commit, as many idle workers as a queued job needs (the one
        ``job_id`` names, or ``jobs`` jobs any worker may run) and one more: not all."""

    def _close_own(self) -> None:
        """Close the connections the dialect holds outside the engine's pool."""

    # ------------------------------------------------------------------ basics

    def close(self) -> None:
        self._closed = True
        self._close_own()
        self.engine.dispose()

    @contextlib.contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if write:
                conn = self._begin_write(conn)
            with conn.begin():
                yield conn

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
            assert self._bounded_ms is not None
            self._bound_on_checkout(dbapi_conn, self._bounded_ms)

        sa_event.listen(self.engine, "checkout", on_checkout)

    def now(self) -> float:
        """The database's clock, in seconds since the epoch."""
        with self.engine.connect() as conn:
            return float(conn.execute(sa.select(self._now)).scalar_one())

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None before the first migration)."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    # ------------------------------------------- writes unsure of their commit

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
        job = job_from_row(row, ())
        return Lease(job.id, job.attempt, worker_id, worker_name), job

    def _record(self, conn: Connection, job_id: str, payload: Payload, *,
                worker: str | None, attempt: int) -> None:
        """Add the event a payload renders (its kind, its words, its data)."""
        kind, message, data = render(payload)
        self._event(conn, job_id, kind, message, worker=worker, attempt=attempt, data=data)

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
                data=None if data is None else dumps(data),
            )
        )
