"""The callback deliverer's records: its leader lease, what it delivered, its secrets.

Reached as ``store.callbacks``. One deliverer at a time leads across every server process
sharing the database; it records each event it delivered (or gave up on) and moves a
settled horizon up past them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import sqlalchemy as sa

from spotrun.schema import callback_deliveries, callback_leader, callback_secrets, events, jobs
from spotrun.store.core import StoreCore
from spotrun.store.errors import MapsDriverErrors


class CallbackRecords(MapsDriverErrors):
    """What the callback deliverer records in the database."""

    def __init__(self, store: StoreCore) -> None:
        self._s = store

    def lead(self, holder: str, seconds: float) -> int | None:
        """Take or renew the callback deliverer's lease for ``seconds`` (database clock).

        Returns the settled horizon if ``holder`` now leads, else None: one deliverer at a
        time across every server process sharing the database.
        """
        with self._s._tx() as conn:
            row = conn.execute(
                callback_leader.update()
                .where(callback_leader.c.id == 1, sa.or_(
                    callback_leader.c.holder.is_(None), callback_leader.c.holder == holder,
                    callback_leader.c.expires_at < self._s._now))
                .values(holder=holder, expires_at=self._s._now + seconds)
                .returning(callback_leader.c.horizon)
            ).first()
        return None if row is None else int(row[0])

    def resign(self, holder: str) -> None:
        """Give the lease up (a server stopping), so another leads at once."""
        with self._s._tx() as conn:
            conn.execute(callback_leader.update().where(
                callback_leader.c.id == 1, callback_leader.c.holder == holder
            ).values(holder=None, expires_at=None))

    def pending(self, horizon: int, kinds: Sequence[str], *, limit: int = 500
                          ) -> list[tuple[int, str, str, str]]:
        """Events above the horizon, of these kinds, of jobs with a callback, that no
        deliverer recorded yet: (event id, job id, kind, URL), in id order.

        Not a cursor: an event whose transaction committed after a later id's is found at
        the next call all the same.
        """
        done = sa.select(callback_deliveries.c.event_id).where(
            callback_deliveries.c.event_id == events.c.id).exists()
        with self._s._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(events.c.id, events.c.job_id, events.c.kind, jobs.c.callback_url)
                .join(jobs, jobs.c.id == events.c.job_id)
                .where(events.c.id > horizon, jobs.c.callback_url.is_not(None),
                       events.c.kind.in_(list(kinds)), ~done)
                .order_by(events.c.id)
                .limit(limit)
            ).all()
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]

    def secret(self, owner: str | None) -> str:
        """The key ``owner``'s callbacks are signed with (made at first use); None: the
        operators' jobs, which have no owner."""
        key = owner or ""
        with self._s._tx() as conn:
            found = conn.execute(sa.select(callback_secrets.c.secret).where(
                callback_secrets.c.owner == key)).scalar()
            if found is not None:
                return str(found)
            secret = "spcs_" + secrets.token_urlsafe(32)
            try:
                with conn.begin_nested():
                    conn.execute(callback_secrets.insert().values(
                        owner=key, secret=secret, created_at=self._s._now))
            except sa.exc.IntegrityError:  # made at the same moment by another process
                return str(conn.execute(sa.select(callback_secrets.c.secret).where(
                    callback_secrets.c.owner == key)).scalar_one())
            return secret

    def done(self, holder: str, event_id: int) -> bool:
        """Record an event delivered (or given up on), if ``holder`` still leads."""
        leads = sa.select(callback_leader.c.id).where(
            callback_leader.c.id == 1, callback_leader.c.holder == holder,
            callback_leader.c.expires_at >= self._s._now).exists()
        with self._s._tx() as conn:
            if not conn.execute(sa.select(leads)).scalar():
                return False
            exists = conn.execute(sa.select(callback_deliveries.c.event_id).where(
                callback_deliveries.c.event_id == event_id)).first()
            if exists is None:
                conn.execute(callback_deliveries.insert().values(event_id=event_id,
                                                                 at=self._s._now))
            return True

    def settle(self, holder: str, kinds: Sequence[str], settle_seconds: float
                        ) -> int | None:
        """Move the horizon up past events all delivered and older than ``settle_seconds``
        (no transaction of spotrun's lasts that long, so none of them can still commit),
        and forget their records. Returns the new horizon (None if not the leader)."""
        with self._s._tx() as conn:
            row = conn.execute(sa.select(callback_leader.c.horizon).where(
                callback_leader.c.id == 1, callback_leader.c.holder == holder)).first()
            if row is None:
                return None
            horizon = int(row[0])
            old = conn.execute(sa.select(sa.func.max(events.c.id)).where(
                events.c.id > horizon, events.c.at < self._s._now - settle_seconds)).scalar()
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

