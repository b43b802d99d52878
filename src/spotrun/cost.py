"""What jobs cost on spot and on-demand workers, and what spot saved.

Read from the store as a user would: each job's events (their data, never their words)
say which worker ran which attempt from when to when and at which steps it was
interrupted; each worker's row says its pool and hourly price. The model, its estimates
and why they lean conservative are in docs/cost.md; the default prices and their sources
in docs/pricing.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spotrun.config import ConfigError
from spotrun.events import (
    Checkpointed,
    HandedBack,
    Payload,
    Preempted,
    end_step,
    payload_of,
    start_step,
)
from spotrun.jobs import EventKind, Job, Worker, from_epoch, iso
from spotrun.store import JobStore

# A g4dn.xlarge (one T4, 4 vCPU) in us-east-1; see docs/pricing.md for the source and date.
DEFAULT_PRICES: dict[str, float] = {"spot": 0.20, "on-demand": 0.526}
ON_DEMAND_POOL = "on-demand"

START_KINDS = frozenset({EventKind.STARTED.value, EventKind.RESUMED.value})
# The events that end an attempt on its worker.
END_KINDS = frozenset({
    EventKind.PREEMPTED.value, EventKind.HANDED_BACK.value, EventKind.LEASE_EXPIRED.value,
    EventKind.SUCCEEDED.value, EventKind.FAILED.value, EventKind.CANCELLED.value,
})
# The ends after which the job goes back to the queue and some work may be done again.
INTERRUPTED_KINDS = frozenset({
    EventKind.PREEMPTED.value, EventKind.HANDED_BACK.value, EventKind.LEASE_EXPIRED.value,
})

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# ---------------------------------------------------------------------- prices


@dataclass(frozen=True)
class Prices:
    """Hourly prices by pool, and the on-demand price that spot is compared with."""

    by_pool: Mapping[str, float]
    on_demand: float
    source: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Prices:
        """SPOTRUN_PRICES ("spot=0.35,on-demand=1.20") over the defaults, and
        SPOTRUN_ON_DEMAND_PRICE over the table's on-demand entry."""
        env = os.environ if environ is None else environ
        table = dict(DEFAULT_PRICES)
        source = "defaults (docs/pricing.md)"
        raw = env.get("SPOTRUN_PRICES", "").strip()
        if raw:
            table.update(parse_prices(raw))
            source = "SPOTRUN_PRICES"
        on_demand = table[ON_DEMAND_POOL]
        raw_od = env.get("SPOTRUN_ON_DEMAND_PRICE", "").strip()
        if raw_od:
            on_demand = _price("SPOTRUN_ON_DEMAND_PRICE", raw_od)
        return cls(by_pool=table, on_demand=on_demand, source=source)

    def to_json(self) -> dict[str, Any]:
        return {"by_pool": dict(self.by_pool), "on_demand": self.on_demand,
                "source": self.source}


def _price(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a price per hour") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name}: {text!r} must be a finite price, 0 or more")
    return value


def parse_prices(text: str) -> dict[str, float]:
    """``"spot=0.35,on-demand=1.20"`` -> ``{"spot": 0.35, "on-demand": 1.2}``."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        pool, sep, value = item.partition("=")
        if not sep or not pool.strip():
            raise ConfigError(f"SPOTRUN_PRICES: bad entry {item!r}; expected pool=price, "
                              "e.g. spot=0.35,on-demand=1.20")
        out[pool.strip()] = _price(f"SPOTRUN_PRICES ({pool.strip()})", value.strip())
    if not out:
        raise ConfigError("SPOTRUN_PRICES is empty; expected e.g. spot=0.35,on-demand=1.20")
    return out


# ---------------------------------------------------------------------- figures


@dataclass(frozen=True)
class AttemptCost:
    """One attempt of a job on one worker: from its start event to the event that ended it."""

    attempt: int
    worker: str | None
    pool: str
    price_per_hour: float
    started_at: dt.datetime
    ended_at: dt.datetime
    end: str  # the kind of the ending event, or "running"
    start_step: int
    end_step: int | None
    paid_seconds: float
    redone_seconds: float
    checkpoint_seconds: float
    cost: float

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt, "worker": self.worker, "pool": self.pool,
            "price_per_hour": self.price_per_hour, "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at), "end": self.end, "start_step": self.start_step,
            "end_step": self.end_step, "paid_seconds": self.paid_seconds,
            "redone_seconds": self.redone_seconds,
            "checkpoint_seconds": self.checkpoint_seconds, "cost": self.cost,
        }


@dataclass(frozen=True)
class JobCost:
    """A job's paid time by pool, the part of it wasted, and its cost both ways."""

    job_id: str
    pipeline: str
    state: str
    preemptions: int
    attempts: tuple[AttemptCost, ...]
    paid_seconds_by_pool: Mapping[str, float]
    cost_by_pool: Mapping[str, float]
    paid_seconds: float
    redone_seconds: float
    checkpoint_seconds: float
    useful_seconds: float
    cost: float
    on_demand_cost: float

    @property
    def saving(self) -> float:
        return self.on_demand_cost - self.cost

    def to_json(self, *, with_attempts: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.job_id, "pipeline": self.pipeline, "state": self.state,
            "preemptions": self.preemptions,
            "paid_seconds_by_pool": dict(self.paid_seconds_by_pool),
            "cost_by_pool": dict(self.cost_by_pool),
            "paid_seconds": self.paid_seconds, "redone_seconds": self.redone_seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            "useful_seconds": self.useful_seconds, "cost": self.cost,
            "on_demand_cost": self.on_demand_cost, "saving": self.saving,
        }
        if with_attempts:
            out["attempts"] = [a.to_json() for a in self.attempts]
        return out


@dataclass(frozen=True)
class CostReport:
    """Per-job figures and their totals; totals are sums of the per-job figures."""

    generated_at: dt.datetime
    since: dt.datetime | None
    prices: Prices
    jobs: tuple[JobCost, ...]
    warnings: tuple[str, ...] = ()
    paid_seconds_by_pool: Mapping[str, float] = field(init=False)
    cost_by_pool: Mapping[str, float] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "paid_seconds_by_pool",
                           _sum_maps(j.paid_seconds_by_pool for j in self.jobs))
        object.__setattr__(self, "cost_by_pool", _sum_maps(j.cost_by_pool for j in self.jobs))

    @property
    def preemptions(self) -> int:
        return sum(j.preemptions for j in self.jobs)

    @property
    def lease_expiries(self) -> int:
        """Attempts whose worker vanished without handing the job back."""
        return sum(1 for j in self.jobs for a in j.attempts
                   if a.end == EventKind.LEASE_EXPIRED.value)

    @property
    def paid_seconds(self) -> float:
        return sum(j.paid_seconds for j in self.jobs)

    @property
    def redone_seconds(self) -> float:
        return sum(j.redone_seconds for j in self.jobs)

    @property
    def checkpoint_seconds(self) -> float:
        return sum(j.checkpoint_seconds for j in self.jobs)

    @property
    def useful_seconds(self) -> float:
        return sum(j.useful_seconds for j in self.jobs)

    @property
    def cost(self) -> float:
        return sum(j.cost for j in self.jobs)

    @property
    def on_demand_cost(self) -> float:
        return sum(j.on_demand_cost for j in self.jobs)

    @property
    def saving(self) -> float:
        return self.on_demand_cost - self.cost

    @property
    def saving_percent(self) -> float | None:
        od = self.on_demand_cost
        return None if od <= 0 else 100.0 * self.saving / od

    def to_json(self, *, with_jobs: bool = True) -> dict[str, Any]:
        """The report's JSON shape, shared by ``spotrun cost --json`` and the dashboard."""
        out: dict[str, Any] = {
            "generated_at": iso(self.generated_at),
            "since": None if self.since is None else iso(self.since),
            "prices": self.prices.to_json(),
            "totals": {
                "jobs": len(self.jobs), "preemptions": self.preemptions,
                "lease_expiries": self.lease_expiries,
                "paid_seconds": self.paid_seconds,
                "paid_seconds_by_pool": dict(self.paid_seconds_by_pool),
                "cost_by_pool": dict(self.cost_by_pool),
                "redone_seconds": self.redone_seconds,
                "checkpoint_seconds": self.checkpoint_seconds,
                "useful_seconds": self.useful_seconds,
                "cost": self.cost, "on_demand_cost": self.on_demand_cost,
                "saving": self.saving, "saving_percent": self.saving_percent,
            },
            "warnings": list(self.warnings),
        }
        if with_jobs:
            out["jobs"] = [j.to_json() for j in self.jobs]
        return out

    def to_text(self, *, per_job: bool = False) -> str:
        """The report as a person reads it."""
        when = "" if self.since is None else \
            f" created since {self.since.astimezone():%Y-%m-%d %H:%M}"
        lines = [f"{len(self.jobs)} jobs{when}; prices from {self.prices.source}, "
                 f"on-demand reference {_money(self.prices.on_demand)}/h", ""]
        if per_job and self.jobs:
            lines.append(f"{'job':<28}  {'pipeline':<14} {'state':<9} {'att':>3} {'pre':>3} "
                         f"{'paid s':>9} {'redone s':>9} {'ckpt s':>7} {'cost':>10} "
                         f"{'on-demand':>10}")
            for j in self.jobs:
                lines.append(
                    f"{j.job_id:<28}  {j.pipeline[:14]:<14} {j.state:<9} {len(j.attempts):>3} "
                    f"{j.preemptions:>3} {j.paid_seconds:>9.1f} {j.redone_seconds:>9.1f} "
                    f"{j.checkpoint_seconds:>7.1f} {_money(j.cost):>10} "
                    f"{_money(j.on_demand_cost):>10}")
            lines.append("")
        lines.append(f"{'pool':<12} {'paid time':>11} {'cost':>11}")
        for pool in sorted(self.paid_seconds_by_pool):
            lines.append(f"{pool:<12} {_duration(self.paid_seconds_by_pool[pool]):>11} "
                         f"{_money(self.cost_by_pool[pool]):>11}")
        lines.append(f"{'total':<12} {_duration(self.paid_seconds):>11} {_money(self.cost):>11}")
        lines.append("")
        pct = self.saving_percent
        lines += [
            f"redone after interruptions  {_duration(self.redone_seconds):>11}  "
            f"({_count(self.preemptions, 'preemption')}, "
            f"{_count(self.lease_expiries, 'lease expiry', 'lease expiries')})",
            f"checkpointing               {_duration(self.checkpoint_seconds):>11}",
            f"useful work                 {_duration(self.useful_seconds):>11}",
            f"same work on on-demand      {_money(self.on_demand_cost):>11}",
            f"actual cost                 {_money(self.cost):>11}",
            f"saving                      {_money(self.saving):>11}"
            + ("" if pct is None else f"  ({pct:.1f} %)"),
        ]
        lines += [f"note: {w}" for w in self.warnings]
        return "\n".join(lines)


def _sum_maps(maps: Iterable[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _money(x: float) -> str:
    # Test and demo jobs last seconds: keep their cents-fractions visible.
    if abs(x) >= 10:
        return f"${x:,.2f}"
    return f"${x:.4f}" if abs(x) >= 0.01 or x == 0 else f"${x:.6f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


# --------------------------------------------------------------------- the model


class _Workers:
    """Finds the worker row an event names (names can be reused by later processes)."""

    def __init__(self, workers: Sequence[Worker]) -> None:
        self.by_name: dict[str, list[Worker]] = {}
        for w in sorted(workers, key=lambda w: w.started_at):
            self.by_name.setdefault(w.name, []).append(w)

    def at(self, name: str | None, when: dt.datetime) -> Worker | None:
        rows = self.by_name.get(name or "")
        if not rows:
            return None
        # The newest process of that name that had started by then.
        best = rows[0]
        for w in rows:
            if w.started_at <= when:
                best = w
        return best


@dataclass
class Span:
    """One attempt as read from the job's events; ``end`` is None while it runs."""

    attempt: int
    worker: str | None
    started_at: dt.datetime
    start_step: int
    checkpoints: list[tuple[int, dt.datetime]] = field(default_factory=list)
    checkpoint_seconds: float = 0.0
    ended_at: dt.datetime | None = None
    end: str | None = None
    end_step: int | None = None
    resume_hint: int | None = None  # the step the ending event says the next one resumes from


def _saved_seconds(p: Payload) -> float:
    return p.saved_seconds if isinstance(p, Preempted | HandedBack) else 0.0


def _resume_hint(p: Payload, last_checkpoint: int | None) -> int | None:
    if isinstance(p, Preempted | HandedBack):
        step = p.resumes_from
        return last_checkpoint if step is None else step
    return last_checkpoint  # an expired lease resumes from the last checkpoint written


def spans(job: Job) -> list[Span]:
    """The job's attempts in order, each closed by its ending event or still open, read
    from the events' data (:func:`spotrun.events.payload_of`)."""
    out: list[Span] = []
    current: Span | None = None
    last_checkpoint: int | None = None
    for ev in job.events:
        p = payload_of(ev)
        if ev.kind in START_KINDS:
            if current is not None:  # a start without an end: count up to the new start
                current.ended_at, current.end = ev.at, "unknown"
            current = Span(ev.attempt, ev.worker, ev.at, start_step(p))
            out.append(current)
        elif ev.kind == EventKind.CHECKPOINT.value:
            step = p.step if isinstance(p, Checkpointed) else None
            if step is not None:
                last_checkpoint = step
            if current is not None and ev.attempt == current.attempt:
                current.checkpoint_seconds += p.seconds if isinstance(p, Checkpointed) else 0.0
                if step is not None:
                    current.checkpoints.append((step, ev.at))
        elif ev.kind in END_KINDS and current is not None and ev.attempt == current.attempt:
            current.ended_at, current.end = ev.at, ev.kind
            current.end_step = end_step(p)
            current.checkpoint_seconds += _saved_seconds(p)
            current.resume_hint = _resume_hint(p, last_checkpoint)
            if isinstance(p, Preempted | HandedBack) and p.resumes_from == 0:
                last_checkpoint = None  # the next attempt starts over
            current = None
    return out


def job_cost(job: Job, workers: _Workers | Sequence[Worker], prices: Prices,
             now: dt.datetime, warnings: list[str] | None = None, *,
             read: Sequence[Span] | None = None) -> JobCost:
    """The cost figures of one job, from its events (``job.events`` must be loaded), or
    from its attempts as already ``read`` (:func:`spans`)."""
    index = workers if isinstance(workers, _Workers) else _Workers(workers)
    notes = warnings if warnings is not None else []
    raw = list(spans(job) if read is None else read)
    rows = [index.at(a.worker, a.started_at) for a in raw]
    ends: list[dt.datetime] = []
    for a, row in zip(raw, rows, strict=True):
        end = a.ended_at or now
        if a.end == EventKind.LEASE_EXPIRED.value and row is not None:
            # The VM stopped costing money when it died, not when its lease ran out. The
            # last moment it is known to have been alive: its last heartbeat or the last
            # checkpoint it wrote (it died within a heartbeat after; we do not guess more).
            alive = max([row.last_heartbeat, *(at for _, at in a.checkpoints)])
            if a.started_at <= alive < end:
                end = alive
        ends.append(end)
    # Seconds per step, measured per attempt, for turning lost steps into lost seconds.
    rates: list[float | None] = []
    for a, end in zip(raw, ends, strict=True):
        steps = (a.end_step - a.start_step) if a.end_step is not None else 0
        work = max(0.0, (end - a.started_at).total_seconds() - a.checkpoint_seconds)
        rates.append(work / steps if steps > 0 else None)
    known = [r for r in rates if r is not None]
    job_rate = sum(known) / len(known) if known else None

    attempts: list[AttemptCost] = []
    for i, (a, row, end) in enumerate(zip(raw, rows, ends, strict=True)):
        paid = max(0.0, (end - a.started_at).total_seconds())
        pool, price = _price_of(row, a.worker, prices, notes)
        redone = 0.0
        if a.end in INTERRUPTED_KINDS:
            # Where the next attempt really resumed is the truth; the message is a hint.
            resume = raw[i + 1].start_step if i + 1 < len(raw) else a.resume_hint
            redone = _redone(paid, a.start_step, a.end_step, resume, rates[i], job_rate)
            saved_at = [at for step, at in a.checkpoints if step == resume]
            if saved_at:
                # The checkpoint it resumes from was written by this attempt: everything
                # after it was done again. Both estimates can only miss lost work (the
                # last progress report and the last sign of life come before the end),
                # so the larger one is the closer.
                since = max(0.0, (end - saved_at[-1]).total_seconds())
                redone = min(paid, max(redone, since))
        attempts.append(AttemptCost(
            attempt=a.attempt, worker=a.worker, pool=pool, price_per_hour=price,
            started_at=a.started_at, ended_at=end, end=a.end or "running",
            start_step=a.start_step, end_step=a.end_step, paid_seconds=paid,
            redone_seconds=redone, checkpoint_seconds=a.checkpoint_seconds,
            cost=paid * price / 3600.0,
        ))
    paid_by_pool = _sum_maps({a.pool: a.paid_seconds} for a in attempts)
    cost_by_pool = _sum_maps({a.pool: a.cost} for a in attempts)
    paid = sum(a.paid_seconds for a in attempts)
    redone = sum(a.redone_seconds for a in attempts)
    useful = max(0.0, paid - redone)
    return JobCost(
        job_id=job.id, pipeline=job.pipeline, state=job.state.value,
        preemptions=sum(1 for a in attempts if a.end == EventKind.PREEMPTED.value),
        attempts=tuple(attempts), paid_seconds_by_pool=paid_by_pool,
        cost_by_pool=cost_by_pool, paid_seconds=paid, redone_seconds=redone,
        checkpoint_seconds=sum(a.checkpoint_seconds for a in attempts),
        useful_seconds=useful, cost=sum(a.cost for a in attempts),
        on_demand_cost=useful * prices.on_demand / 3600.0,
    )


def _redone(paid: float, start_step: int, end_step: int | None, resume: int | None,
            rate: float | None, job_rate: float | None) -> float:
    """Seconds of an interrupted attempt's work that the next attempt does again.

    Lost steps x this attempt's seconds per step, capped at what the attempt was paid.
    An attempt that advanced no step bought nothing that survives, so all of it counts
    (this errs towards a smaller saving, never a larger one).
    """
    if end_step is None or end_step <= start_step:
        return paid
    lost = max(0, end_step - (resume if resume is not None else start_step))
    per_step = rate if rate is not None else job_rate
    if per_step is None:
        return paid if lost else 0.0
    return min(paid, lost * per_step)


def _price_of(row: Worker | None, name: str | None, prices: Prices,
              notes: list[str]) -> tuple[str, float]:
    """The worker's pool and hourly price. Unknown prices count at the on-demand price,
    so a gap in the data can shrink the reported saving but never inflate it."""
    if row is None:
        _note(notes, f"worker {name!r} is not registered; its time is priced at on-demand")
        return "unknown", prices.on_demand
    if row.price_per_hour is not None:
        return row.pool, float(row.price_per_hour)
    price = prices.by_pool.get(row.pool)
    if price is None:
        _note(notes, f"pool {row.pool!r} has no price (set SPOTRUN_PRICES); "
              "priced at on-demand")
        return row.pool, prices.on_demand
    return row.pool, price


def _note(notes: list[str], message: str) -> None:
    if message not in notes:
        notes.append(message)


# ------------------------------------------------------------------------ entry


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """``24h``, ``7d``, ``30m``, ``2w`` before ``now``, or an ISO date/time (local if naive)."""
    m = _DURATION.match(text)
    if m is not None:
        try:
            return now - dt.timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
        except OverflowError:
            raise ValueError(f"--since {text!r}: that is further back than any date") from None
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: expected an ISO date/time (2026-11-01, "
                         "2026-11-01T08:00) or a duration (30m, 24h, 7d)") from None
    return when.astimezone() if when.tzinfo is None else when


def summarize(store: Any, since: dt.datetime | str | None = None, *,
              prices: Prices | None = None) -> CostReport:
    """Cost figures of the jobs created since ``since`` (all jobs if None).

    ``store`` is a :class:`spotrun.store.JobStore`. ``since`` may be a datetime or the
    text ``spotrun cost --since`` accepts.
    """
    prices = prices or Prices.from_env()
    now = from_epoch(store.now())
    if isinstance(since, str):
        since = parse_since(since, now)
    index = _Workers(store.list_workers(include_stopped=True))
    notes: list[str] = []
    figures: list[JobCost] = []
    # Newest first, so that a --since window stops reading at its edge.
    for job in store.list_jobs(newest_first=True):
        if since is not None and job.created_at < since:
            break
        figures.append(job_cost(store.get(job.id), index, prices, now, notes))
    figures.reverse()
    return CostReport(generated_at=now, since=since, prices=prices, jobs=tuple(figures),
                      warnings=tuple(notes))


def main(settings: Any, *, since: str | None = None, as_json: bool = False,
         per_job: bool = False, echo: Callable[..., Any] | None = None) -> int:
    """``spotrun cost``: print the report; 0, or 2 with one line on bad input."""
    if echo is None:
        import typer

        echo = typer.echo

    try:
        prices = Prices.from_env()
    except ConfigError as exc:
        echo(f"spotrun: {exc}", err=True)
        return 2
    store = JobStore.open(settings.database_url)
    try:
        try:
            report = summarize(store, since, prices=prices)
        except ValueError as exc:
            echo(f"spotrun: {exc}", err=True)
            return 2
    finally:
        store.close()
    echo(json.dumps(report.to_json(), indent=2) if as_json else report.to_text(per_job=per_job))
    return 0
