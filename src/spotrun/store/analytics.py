"""Reads for reports: counts, metric series, preemption hand-offs, pool interruptions.

Reads only: nothing here changes the queue. Reached as ``store.analytics``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from spotrun.jobs import EventKind, JobState, MetricPoint, from_epoch
from spotrun.schema import events, job_metrics, jobs, workers
from spotrun.store.core import StoreCore
from spotrun.store.errors import MapsDriverErrors
from spotrun.store.records import loads


class Analytics(MapsDriverErrors):
    """The queue's history, read for reports, metrics and policies."""

    def __init__(self, store: StoreCore) -> None:
        self._s = store

    def count_by_state(self, states: Sequence[JobState] | None = None) -> dict[str, int]:
        """Jobs per state; with ``states``, only those (an index range: cheap for the
        live states whatever the size of the history)."""
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        if states is not None:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        with self._s._tx(write=False) as conn:
            rows = conn.execute(query).all()
        counts = {s.value: 0 for s in (JobState if states is None else states)}
        counts.update({state: int(n) for state, n in rows})
        return counts

    def event_kinds_after(self, event_id: int, *, limit: int = 5000
                          ) -> list[tuple[int, str, str, float]]:
        """Events of every job after ``event_id`` by primary key: (id, job id, kind, at),
        for counters that follow the history instead of re-reading it."""
        with self._s._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(events.c.id, events.c.job_id, events.c.kind, events.c.at)
                .where(events.c.id > event_id).order_by(events.c.id).limit(limit)).all()
        return [(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

    def metric_series(self, job_id: str) -> list[MetricPoint]:
        """The job's metric series, oldest step first (at most MAX_METRIC_POINTS points)."""
        with self._s._tx(write=False) as conn:
            rows = conn.execute(sa.select(job_metrics)
                                .where(job_metrics.c.job_id == job_id)
                                .order_by(job_metrics.c.step, job_metrics.c.id)).all()
        return [MetricPoint(r.step, r.attempt, from_epoch(r.at), loads(r.metrics))
                for r in rows]

    def pool_interruptions(self, pool: str) -> tuple[float, int]:
        """(worker-seconds lived, unannounced interruptions) in a pool.

        Unannounced interruptions are expired leases of that pool's workers: the losses a
        periodic checkpoint insures against (a notice is covered by its own checkpoint).
        """
        with self._s._tx(write=False) as conn:
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
        with self._s._tx(write=False) as conn:
            return [None if r[1] is None else max(0.0, float(r[1]) - float(r[0]))
                    for r in conn.execute(query).all()]

