"""Intake records: the bus message behind each job, its publication cursor, named leases.

Reached as ``store.intake``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from spotrun.jobs import JobState
from spotrun.schema import events, intake_leases, intake_requests, jobs
from spotrun.store.core import StoreCore
from spotrun.store.errors import MapsDriverErrors
from spotrun.store.records import IntakeEvent, loads


class IntakeRecords(MapsDriverErrors):
    """The jobs that came from a message bus, and what was published of them."""

    def __init__(self, store: StoreCore) -> None:
        self._s = store

    def record(self, job_id: str, *, source: str, message_id: str,
               idempotency_key: str | None) -> None:
        """Remember the bus message that asked for a job; the first one recorded stays."""
        row = {"job_id": job_id, "source": source, "message_id": message_id,
               "idempotency_key": idempotency_key, "created_at": self._s._now}
        try:
            with self._s._tx() as conn:
                if conn.execute(sa.select(intake_requests.c.job_id).where(
                        intake_requests.c.job_id == job_id)).first() is None:
                    conn.execute(intake_requests.insert().values(**row))
        except sa.exc.IntegrityError:
            pass  # a redelivery of the same request recorded it at the same time

    def request(self, job_id: str) -> tuple[str, str, str | None] | None:
        """(source, message id, idempotency key) of a job that came from a bus, else None."""
        with self._s._tx(write=False) as conn:
            row = conn.execute(sa.select(
                intake_requests.c.source, intake_requests.c.message_id,
                intake_requests.c.idempotency_key).where(intake_requests.c.job_id == job_id)
            ).first()
        return None if row is None else (row[0], row[1], row[2])

    def events(self, source: str, *, limit: int = 500) -> list[IntakeEvent]:
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
        with self._s._tx(write=False) as conn:
            rows = conn.execute(query).mappings().all()
        return [IntakeEvent(
            event_id=int(x["id"]), job_id=x["job_id"], kind=x["kind"], at=float(x["at"]),
            worker=x["worker"], attempt=int(x["attempt"]), message=x["message"],
            data=loads(x["data"]), message_id=x["message_id"],
            idempotency_key=x["idempotency_key"], job_state=JobState(x["state"]),
            result=loads(x["result"]), error=x["error"]) for x in rows]

    def mark_published(self, job_id: str, event_id: int, *, done: bool) -> None:
        """Move a job's publication cursor forward (never back); ``done`` after its final
        event."""
        values: dict[str, Any] = {"published_event_id": event_id}
        if done:
            values["done"] = True
        with self._s._tx() as conn:
            conn.execute(intake_requests.update().where(
                intake_requests.c.job_id == job_id,
                intake_requests.c.published_event_id < event_id).values(**values))

    def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew the named lease for ``holder``; True while it holds the lease.

        For work that one process at a time must do, in whichever replica it runs.
        """
        lease = intake_leases
        try:
            with self._s._tx() as conn:
                n = conn.execute(lease.update().where(
                    lease.c.name == name,
                    sa.or_(lease.c.holder == holder, lease.c.expires_at < self._s._now),
                ).values(holder=holder, expires_at=self._s._now + seconds)).rowcount
                if n == 1:
                    return True
                if conn.execute(sa.select(lease.c.name).where(lease.c.name == name)
                                ).first() is not None:
                    return False
                conn.execute(lease.insert().values(name=name, holder=holder,
                                                   expires_at=self._s._now + seconds))
                return True
        except sa.exc.IntegrityError:
            return False  # another process inserted it first

    def release_lease(self, name: str, holder: str) -> None:
        with self._s._tx() as conn:
            conn.execute(intake_leases.delete().where(intake_leases.c.name == name,
                                                      intake_leases.c.holder == holder))

