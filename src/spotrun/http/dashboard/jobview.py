"""What the job page shows beyond the job's own row: its cost, and whether it can run."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from spotrun.capacity import job_unrunnable
from spotrun.cost import Prices, job_cost
from spotrun.jobs import Job, JobState
from spotrun.policy import ON_DEMAND
from spotrun.store import JobStore


@dataclass(frozen=True)
class CostView:
    """A job's cost in words: seconds paid per kind of machine, redone, and the saving."""

    spot_seconds: str
    on_demand_seconds: str
    redone_seconds: str
    cost: str
    on_demand_cost: str
    saving: str


def _seconds(x: float) -> str:
    if x < 120:
        return f"{x:.1f} s"
    return f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.2f} h"


def _money(x: float) -> str:
    if abs(x) >= 10:
        return f"${x:,.2f}"
    return f"${x:.4f}" if abs(x) >= 0.01 or x == 0 else f"${x:.6f}"


def cost_view(job: Job, store: JobStore) -> CostView | None:
    """The job's cost from its events and the workers that ran it (None if the prices in
    the environment cannot be read: the page still shows everything else)."""
    try:
        prices = Prices.from_env()
    except ValueError:
        return None
    c = job_cost(job, store.list_workers(), prices, dt.datetime.now(dt.UTC))
    on_demand = sum(s for pool, s in c.paid_seconds_by_pool.items() if pool == ON_DEMAND)
    spot = c.paid_seconds - on_demand
    pct = f" ({100 * c.saving / c.on_demand_cost:.0f} %)" if c.on_demand_cost > 0 else ""
    return CostView(_seconds(spot), _seconds(on_demand), _seconds(c.redone_seconds),
                    _money(c.cost), _money(c.on_demand_cost), f"{_money(c.saving)}{pct}")


def worker_words(job: Job) -> str:
    """Where the job runs, ran, or last ran."""
    if not job.worker:
        return ""
    if job.state is JobState.RUNNING:
        return f"Running on worker {job.worker}."
    if job.state.is_final:
        return f"Ran on worker {job.worker}."
    return f"Last ran on worker {job.worker}."


def unrunnable(job: Job, store: JobStore) -> str | None:
    if job.state.is_final:
        return None
    reason = job_unrunnable(job, store.list_workers(include_stopped=False))
    return None if reason is None else reason[0].upper() + reason[1:] + "."


# Events that end an attempt early, and the one that starts the next from a checkpoint.
CURVE_MARKS = ("preempted", "lease_expired", "handed_back", "resumed")


def curve_data(job: Job, store: JobStore) -> tuple[str, str]:
    """The job's metric series and the events the curve marks, as JSON for the page."""
    series = [{"step": p.step, "attempt": p.attempt, "metrics": p.metrics}
              for p in store.metric_series(job.id)]
    marks = [{"kind": e.kind, "attempt": e.attempt, "message": e.message}
             for e in job.events if e.kind in CURVE_MARKS]
    return json.dumps(series), json.dumps(marks)
