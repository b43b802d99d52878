"""A discrete-event model of a fleet of spot and on-demand workers, to choose a policy.

Jobs arrive (Poisson) into one queue; workers take the oldest; spot workers get
preemption notices (Poisson per VM, plus optional zone-wide waves) and die
``notice_seconds`` later; a replacement VM joins ``replace_seconds`` after that. Each
policy decides what a preemption costs:

========================================  ========  ==========  ==========
policy                                    periodic  uses the    escalates
                                          ckpts     notice      to on-demand
========================================  ========  ==========  ==========
restart-from-scratch                      no        no          no
periodic-only                             yes       no          no
notice-plus-periodic                      yes       yes         no
notice-plus-periodic-with-escalation      yes       yes         yes
========================================  ========  ==========  ==========

A policy that ignores the notice loses its job when the VM dies and the queue learns of
it a lease later; one that uses it saves a checkpoint and hands the job back at once. A
fraction ``notice_miss`` of preemptions come without a usable notice (a host failure, a
kill before the handler ran): then every policy falls back to its last periodic checkpoint.
That is what periodic checkpoints insure against once the notice is used, so notice
policies size their interval by the time between *unannounced* preemptions.
The model and its closed-form checks are in docs/cost.md. simpy is imported only when a
simulation runs, so :func:`young_daly_interval` costs the worker nothing to import.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from spotrun.config import ConfigError
from spotrun.cost import Prices
from spotrun.policy import young_daly_interval

RESTART = "restart-from-scratch"
PERIODIC = "periodic-only"
NOTICE = "notice-plus-periodic"
ESCALATE = "notice-plus-periodic-with-escalation"
POLICIES: tuple[str, ...] = (RESTART, PERIODIC, NOTICE, ESCALATE)

MAX_JOBS = 5_000_000  # per policy; beyond that a run takes too long to be useful


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Policy:
    name: str
    periodic: bool
    notice: bool
    escalate: bool


POLICY_TABLE: dict[str, Policy] = {
    RESTART: Policy(RESTART, periodic=False, notice=False, escalate=False),
    PERIODIC: Policy(PERIODIC, periodic=True, notice=False, escalate=False),
    NOTICE: Policy(NOTICE, periodic=True, notice=True, escalate=False),
    ESCALATE: Policy(ESCALATE, periodic=True, notice=True, escalate=True),
}


@dataclass(frozen=True)
class FleetConfig:
    """The fleet, the load and the costs of one simulation. Times in seconds unless named."""

    workers: int = 100
    spot_fraction: float = 1.0
    zones: int = 3
    job_minutes: float = 5.0
    arrival_rate: float | None = None  # jobs per hour; None: 70 % of the fleet's capacity
    hours: float = 8.0  # how long jobs arrive; the run then goes on until they are done
    drain_hours: float = 24.0  # the most the run goes on after arrivals stop
    preemption_rate: float = 0.05  # notices per spot VM per hour (0.05: 5 % an hour)
    wave_at: float | None = None  # hours after the start: one zone loses wave_fraction
    wave_fraction: float = 0.5
    notice_seconds: float = 30.0  # notice to VM death (GCP Spot: 30 s; AWS: 120 s)
    notice_miss: float = 0.05  # share of preemptions whose notice cannot be used
    replace_seconds: float = 120.0  # VM death to its replacement's first claim
    lease_seconds: float = 10.0  # a dead worker's job is back in the queue after this
    checkpoint_seconds: float = 2.0  # one periodic checkpoint
    notice_checkpoint_seconds: float | None = None  # notice to hand-back; None: as above
    restart_seconds: float = 20.0  # claim to first step of a resumed job
    checkpoint_interval: float | None = None  # work between checkpoints; None: Young/Daly
    max_preemptions: int = 2  # escalate a job preempted more often than this
    spot_price: float = 0.20
    on_demand_price: float = 0.526
    seed: int = 0

    @property
    def spot_workers(self) -> int:
        return round(self.workers * self.spot_fraction)

    @property
    def on_demand_workers(self) -> int:
        return self.workers - self.spot_workers

    @property
    def job_seconds(self) -> float:
        return self.job_minutes * 60.0

    @property
    def jobs_per_hour(self) -> float:
        if self.arrival_rate is not None:
            return self.arrival_rate
        return 0.7 * self.workers * 3600.0 / self.job_seconds

    @property
    def mtbf_seconds(self) -> float:
        return math.inf if self.preemption_rate == 0 else 3600.0 / self.preemption_rate

    @property
    def notice_checkpoint(self) -> float:
        if self.notice_checkpoint_seconds is None:
            return self.checkpoint_seconds
        return self.notice_checkpoint_seconds

    def interval(self, uses_notice: bool) -> float:
        """Work between periodic checkpoints. Young/Daly's M is the mean time between the
        preemptions a checkpoint must cover: all of them for a policy that ignores the
        notice, only those without a usable notice for one that uses it."""
        if self.checkpoint_interval is not None:
            return self.checkpoint_interval
        mtbf = self.mtbf_seconds
        if uses_notice:
            mtbf = math.inf if self.notice_miss == 0 else mtbf / self.notice_miss
        return young_daly_interval(self.checkpoint_seconds, mtbf,
                                   lo=max(1.0, self.checkpoint_seconds), hi=86_400.0)

    def check(self) -> None:
        """Raise ValueError, one line naming the option, for a value the model cannot use."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(what)

        need(1 <= self.workers <= 10_000, f"--workers {self.workers}: must be 1 to 10000")
        need(0 <= self.spot_fraction <= 1,
             f"--spot-fraction {self.spot_fraction}: must be between 0 and 1")
        need(1 <= self.zones <= 1000, f"--zones {self.zones}: must be 1 to 1000")
        need(0 < self.job_minutes <= 7 * 24 * 60,
             f"--job-minutes {self.job_minutes}: must be above 0 and at most a week")
        need(self.arrival_rate is None or self.arrival_rate > 0,
             f"--arrival-rate {self.arrival_rate}: must be above 0 (jobs per hour)")
        need(0 < self.hours <= 24 * 365, f"--hours {self.hours}: must be above 0")
        need(self.drain_hours >= 0, f"--drain-hours {self.drain_hours}: must be 0 or more")
        need(0 <= self.preemption_rate <= 3600,
             f"--preemption-rate {self.preemption_rate}: must be 0 to 3600 per VM-hour")
        need(self.wave_at is None or self.wave_at >= 0,
             f"--wave-at {self.wave_at}: must be 0 or more (hours)")
        need(0 <= self.wave_fraction <= 1,
             f"--wave-fraction {self.wave_fraction}: must be between 0 and 1")
        need(0 <= self.notice_miss <= 1,
             f"--notice-miss {self.notice_miss}: must be between 0 and 1")
        for name in ("notice_seconds", "replace_seconds", "lease_seconds",
                     "checkpoint_seconds", "restart_seconds"):
            value = getattr(self, name)
            need(0 <= value < math.inf,
                 f"--{name.replace('_', '-')} {value}: must be 0 or more")
        need(self.notice_checkpoint >= 0,
             f"--notice-checkpoint-seconds {self.notice_checkpoint}: must be 0 or more")
        need(self.checkpoint_interval is None or self.checkpoint_interval > 0,
             f"--checkpoint-interval {self.checkpoint_interval}: must be above 0")
        need(self.max_preemptions >= 0,
             f"--max-preemptions {self.max_preemptions}: must be 0 or more")
        need(self.spot_price >= 0 and self.on_demand_price >= 0, "prices must be 0 or more")
        jobs = self.jobs_per_hour * self.hours
        need(jobs <= MAX_JOBS, f"about {jobs:,.0f} jobs would arrive; at most "
             f"{MAX_JOBS:,} per run (lower --hours or --arrival-rate)")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(spot_workers=self.spot_workers, on_demand_workers=self.on_demand_workers,
                   jobs_per_hour=self.jobs_per_hour,
                   interval_without_notice=self.interval(uses_notice=False),
                   interval_with_notice=self.interval(uses_notice=True),
                   interval_source="given" if self.checkpoint_interval is not None
                   else "young-daly", notice_checkpoint_seconds=self.notice_checkpoint)
        return out


# ------------------------------------------------------------------ calibration

# What `spotrun chaos --json` measures, and the FleetConfig field each one sets. A report
# key matches when, lower-cased with its path joined by "_", it contains a stem and ends
# with p50 or median (or is the stem itself); "_ms" in the key means milliseconds.
CALIBRATION_STEMS: dict[str, tuple[str, ...]] = {
    "notice_checkpoint_seconds": ("notice_to_exit", "notice_to_hand_back",
                                  "notice_to_handed_back", "notice_to_handback"),
    "restart_seconds": ("hand_back_to_resume", "handback_to_resume", "handed_back_to_resume",
                        "handoff", "hand_off"),
    "checkpoint_seconds": ("checkpoint_seconds", "checkpoint_save", "checkpoint_time",
                           "save_checkpoint"),
}


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            key = re.sub(r"[^a-z0-9]+", "_", str(k).lower()).strip("_")
            yield from _flatten(v, f"{prefix}_{key}" if prefix else key)
    else:
        yield prefix, value


def calibration_from_report(report: Any) -> dict[str, float]:
    """The FleetConfig fields a chaos report sets (see CALIBRATION_STEMS); may be empty."""
    flat = sorted((k, v) for k, v in _flatten(report)
                  if isinstance(v, int | float) and not isinstance(v, bool)
                  and math.isfinite(v) and v >= 0)
    out: dict[str, float] = {}
    for target, stems in CALIBRATION_STEMS.items():
        for key, value in flat:
            # Strip unit suffixes so that "notice_to_exit_p50_s" still ends with p50.
            bare = re.sub(r"_(s|sec|secs|seconds|ms)$", "", key)
            hit = any(s in bare for s in stems) and (
                bare.endswith(("p50", "median")) or bare in stems)
            if hit:
                out[target] = float(value) / 1000.0 if "_ms" in key else float(value)
                break
    return out


def load_calibration(path: str) -> dict[str, float]:
    """Read a ``spotrun chaos --json`` report; ValueError (one line) if unusable."""
    try:
        with open(path) as fh:
            report = json.load(fh)
    except OSError as exc:
        raise ValueError(f"--calibrate {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"--calibrate {path}: not JSON ({exc})") from None
    found = calibration_from_report(report)
    if not found:
        wanted = ", ".join(s[0] + " p50" for s in CALIBRATION_STEMS.values())
        raise ValueError(f"--calibrate {path}: none of the keys it reads ({wanted}) is there")
    return found


# -------------------------------------------------------------------- the model


@dataclass
class _Job:
    id: int
    arrival: float
    work: float
    saved: float = 0.0
    attempts: int = 0
    preemptions: int = 0
    escalated: bool = False
    done_at: float | None = None
    paid: float = 0.0
    cost: float = 0.0


@dataclass(eq=False)
class _Worker:
    index: int
    pool: str
    zone: int
    price: float
    burst: bool = False
    up: bool = True
    dying: bool = False
    idle: bool = False
    run: Any = None  # the simpy process of the attempt it runs


@dataclass(frozen=True)
class _Plan:
    """One attempt's schedule: overhead, then work in intervals each followed by a
    checkpoint, except after the last piece (the job ends there)."""

    overhead: float
    saved: float
    remaining: float
    interval: float
    checkpoint: float

    @property
    def checkpoints(self) -> int:
        if math.isinf(self.interval):
            return 0
        return max(0, math.ceil(self.remaining / self.interval - 1e-9) - 1)

    @property
    def duration(self) -> float:
        return self.overhead + self.remaining + self.checkpoints * self.checkpoint

    def at(self, elapsed: float) -> tuple[float, float]:
        """(work done, work saved in checkpoints) after ``elapsed`` seconds."""
        x = elapsed - self.overhead
        if x <= 0:
            return self.saved, self.saved
        k = self.checkpoints
        if k == 0:
            return self.saved + min(x, self.remaining), self.saved
        cycle = self.interval + self.checkpoint
        i = min(int(x // cycle), k)
        within = x - i * cycle
        piece = self.interval if i < k else self.remaining - k * self.interval
        return self.saved + i * self.interval + min(within, piece), \
            self.saved + i * self.interval


class _Fleet:
    """One run of one policy. Random streams are separate, so that every policy sees the
    same arrivals and the same preemption notices (common random numbers)."""

    def __init__(self, cfg: FleetConfig, policy: Policy, simpy: Any) -> None:
        self.cfg = cfg
        self.policy = policy
        self.simpy = simpy
        self.env = simpy.Environment()
        self.interval = cfg.interval(policy.notice) if policy.periodic else math.inf
        self.rng_arrivals = random.Random(cfg.seed * 7919 + 1)
        self.rng_preempt = random.Random(cfg.seed * 7919 + 2)
        self.rng_wave = random.Random(cfg.seed * 7919 + 3)
        self.spot = [_Worker(i, "spot", i % cfg.zones, cfg.spot_price)
                     for i in range(cfg.spot_workers)]
        self.on_demand = [_Worker(cfg.spot_workers + i, "on-demand", i % cfg.zones,
                                  cfg.on_demand_price) for i in range(cfg.on_demand_workers)]
        self.idle: dict[str, deque[_Worker]] = {"spot": deque(), "on-demand": deque()}
        self.queue: list[tuple[float, int, _Job]] = []
        self.escalated: list[tuple[float, int, _Job]] = []
        self.jobs: list[_Job] = []
        self.arrivals_over = False
        self.done = 0
        self.lost_work: list[float] = []
        self.hit: set[int] = set()  # jobs preempted at least once
        self.escalations = 0
        self.busy: dict[str, float] = {"spot": 0.0, "on-demand": 0.0}
        self.cost = 0.0
        self.stop = self.env.event()
        for w in self.spot + self.on_demand:
            self._make_idle(w)

    # -- processes

    def run(self) -> None:
        env = self.env
        env.process(self._arrivals())
        if self.cfg.preemption_rate > 0 and self.spot:
            env.process(self._preemptions())
        if self.cfg.wave_at is not None and self.spot:
            env.process(self._wave())
        env.process(self._deadline())
        env.run(until=self.stop)

    def _deadline(self) -> Iterator[Any]:
        yield self.env.timeout((self.cfg.hours + self.cfg.drain_hours) * 3600.0)
        if not self.stop.triggered:
            self.stop.succeed()

    def _arrivals(self) -> Iterator[Any]:
        rate = self.cfg.jobs_per_hour / 3600.0
        end = self.cfg.hours * 3600.0
        while True:
            yield self.env.timeout(self.rng_arrivals.expovariate(rate))
            if self.env.now > end:
                break
            job = _Job(len(self.jobs), self.env.now, self.cfg.job_seconds)
            self.jobs.append(job)
            heapq.heappush(self.queue, (job.arrival, job.id, job))
            self._dispatch()
        self.arrivals_over = True
        self._maybe_stop()

    def _preemptions(self) -> Iterator[Any]:
        # All spot VMs together: one Poisson stream at n x rate, each notice for a VM drawn
        # at random; a VM that is already gone lets it pass (thinning), so each live VM
        # still sees its own Poisson rate.
        rate = self.cfg.preemption_rate / 3600.0 * len(self.spot)
        while True:
            yield self.env.timeout(self.rng_preempt.expovariate(rate))
            w = self.spot[self.rng_preempt.randrange(len(self.spot))]
            missed = self.rng_preempt.random() < self.cfg.notice_miss
            if w.up and not w.dying:
                self._notice(w, missed)

    def _wave(self) -> Iterator[Any]:
        assert self.cfg.wave_at is not None
        yield self.env.timeout(self.cfg.wave_at * 3600.0)
        zone = [w for w in self.spot if w.zone == 0 and w.up and not w.dying]
        for w in self.rng_wave.sample(zone, round(len(zone) * self.cfg.wave_fraction)):
            self._notice(w, self.rng_wave.random() < self.cfg.notice_miss)

    def _notice(self, w: _Worker, missed: bool) -> None:
        w.dying = True
        w.idle = False
        if w.run is not None and self.policy.notice and not missed:
            w.run.interrupt("notice")
        self.env.process(self._die(w))

    def _die(self, w: _Worker) -> Iterator[Any]:
        yield self.env.timeout(self.cfg.notice_seconds)
        if w.run is not None and w.run.is_alive:
            w.run.interrupt("kill")
        w.up = False
        yield self.env.timeout(self.cfg.replace_seconds)
        w.up, w.dying = True, False
        self._make_idle(w)
        self._dispatch()

    def _attempt(self, w: _Worker, job: _Job, boot: float = 0.0) -> Iterator[Any]:
        env, cfg = self.env, self.cfg
        start = env.now
        overhead = boot + (cfg.restart_seconds if job.attempts else 0.0)
        job.attempts += 1
        plan = _Plan(overhead, job.saved, job.work - job.saved, self.interval,
                     cfg.checkpoint_seconds)
        finished = handed_back = False
        try:
            yield env.timeout(plan.duration)
            finished = True
        except self.simpy.Interrupt as why:
            done, saved = plan.at(env.now - start)
            # On a notice the worker hands back before the VM dies, checkpoint or not.
            handed_back = why.cause == "notice"
            if handed_back and done > saved:
                try:
                    yield env.timeout(cfg.notice_checkpoint)
                    saved = done
                except self.simpy.Interrupt:
                    pass  # the VM died before the notice checkpoint was written
        paid = env.now - start
        job.paid += paid
        job.cost += paid * w.price / 3600.0
        self.cost += paid * w.price / 3600.0
        self.busy[w.pool] += paid
        w.run = None
        if w.up and not w.dying and not w.burst:
            self._make_idle(w)
        if finished:
            job.saved, job.done_at = job.work, env.now
            self.done += 1
            self._dispatch()
            self._maybe_stop()
            return
        self.lost_work.append(done - saved)
        job.saved = saved
        job.preemptions += 1
        self.hit.add(job.id)
        if self.policy.escalate and not job.escalated and \
                job.preemptions > cfg.max_preemptions:
            job.escalated = True
            self.escalations += 1
        self._dispatch()
        if not handed_back:
            # Nobody handed the job back: the queue learns when its lease runs out.
            yield env.timeout(cfg.lease_seconds)
        heapq.heappush(self.escalated if job.escalated else self.queue,
                       (job.arrival, job.id, job))
        self._dispatch()

    # -- scheduling

    def _make_idle(self, w: _Worker) -> None:
        if not w.idle:
            w.idle = True
            self.idle[w.pool].append(w)

    def _take(self, pool: str) -> _Worker | None:
        q = self.idle[pool]
        while q:
            w = q.popleft()
            # Entries go stale when a worker is taken, noticed or replaced; skip those.
            if w.idle and w.up and not w.dying:
                w.idle = False
                return w
        return None

    def _start(self, w: _Worker, job: _Job, boot: float = 0.0) -> None:
        w.run = self.env.process(self._attempt(w, job, boot))

    def _dispatch(self) -> None:
        while self.escalated:
            w = self._take("on-demand")
            if w is None:
                if self.on_demand:
                    break  # wait for one of the fleet's on-demand workers
                # No on-demand pool: start a VM for the job, paid from its boot.
                job = heapq.heappop(self.escalated)[2]
                burst = _Worker(-1, "on-demand", -1, self.cfg.on_demand_price, burst=True)
                self._start(burst, job, boot=self.cfg.replace_seconds)
                continue
            self._start(w, heapq.heappop(self.escalated)[2])
        while self.queue:
            w = self._take("spot") or self._take("on-demand")
            if w is None:
                break
            self._start(w, heapq.heappop(self.queue)[2])

    def _maybe_stop(self) -> None:
        if self.arrivals_over and self.done == len(self.jobs) and not self.stop.triggered:
            self.stop.succeed()

    # -- results

    def result(self) -> PolicyResult:
        cfg = self.cfg
        done = [j for j in self.jobs if j.done_at is not None]
        lat = sorted(j.done_at - j.arrival for j in done if j.done_at is not None)
        hit = sorted(j.done_at - j.arrival for j in done
                     if j.done_at is not None and j.id in self.hit)
        work = sum(j.work for j in done)
        paid = sum(j.paid for j in done)
        cost_done = sum(j.cost for j in done)
        od_per_job = cfg.job_seconds * cfg.on_demand_price / 3600.0
        cost_per_job = cost_done / len(done) if done else 0.0
        return PolicyResult(
            policy=self.policy.name, jobs=len(self.jobs), jobs_done=len(done),
            cost_per_job=cost_per_job, on_demand_cost_per_job=od_per_job,
            saving_percent=100.0 * (1 - cost_per_job / od_per_job) if od_per_job else 0.0,
            goodput=work / paid if paid else 1.0,
            latency_mean=sum(lat) / len(lat) if lat else 0.0,
            latency_p50=percentile(lat, 50), latency_p95=percentile(lat, 95),
            latency_p99=percentile(lat, 99), preempted_jobs=len(hit),
            preempted_latency_p50=percentile(hit, 50),
            preempted_latency_p99=percentile(hit, 99),
            preemptions=len(self.lost_work), escalations=self.escalations,
            max_preemptions_per_job=max((j.preemptions for j in self.jobs), default=0),
            lost_work_per_preemption=(sum(self.lost_work) / len(self.lost_work)
                                      if self.lost_work else None),
            busy_seconds_by_pool=dict(self.busy), cost_total=self.cost,
            simulated_hours=self.env.now / 3600.0,
        )


def _money(x: float) -> str:
    return f"${x:.5f}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolating between ranks; 0 for no values."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class PolicyResult:
    """What one policy did with the fleet. Costs count busy worker time; per-job figures
    are over the jobs that finished."""

    policy: str
    jobs: int
    jobs_done: int
    cost_per_job: float
    on_demand_cost_per_job: float  # the job's work alone, on an on-demand worker
    saving_percent: float
    goodput: float  # work of finished jobs / worker time paid for them
    latency_mean: float
    latency_p50: float
    latency_p95: float
    latency_p99: float
    preempted_jobs: int  # finished jobs preempted at least once
    preempted_latency_p50: float  # their latency
    preempted_latency_p99: float
    preemptions: int  # preemptions that hit a running job
    escalations: int
    max_preemptions_per_job: int
    lost_work_per_preemption: float | None  # work seconds done again, on average
    busy_seconds_by_pool: Mapping[str, float]
    cost_total: float  # every attempt of every job, finished or not
    simulated_hours: float

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["busy_seconds_by_pool"] = dict(self.busy_seconds_by_pool)
        return out


@dataclass(frozen=True)
class SimulationReport:
    config: FleetConfig
    results: tuple[PolicyResult, ...]
    calibration: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "calibration": dict(self.calibration),
                "results": [r.to_json() for r in self.results]}

    def to_text(self) -> str:
        c = self.config
        wave = "none" if c.wave_at is None else \
            f"zone 0 loses {c.wave_fraction:.0%} of its spot VMs at {c.wave_at:g} h"
        where = "Young/Daly" if c.checkpoint_interval is None else "given"

        def every(seconds: float) -> str:
            if seconds >= c.job_seconds:
                return f"none ({seconds:,.0f} s is longer than a job)"
            return f"every {seconds:,.0f} s of work"

        lines = [
            f"{c.workers} workers ({c.spot_workers} spot, {c.on_demand_workers} on-demand) in "
            f"{c.zones} zones; {c.job_minutes:g}-min jobs at {c.jobs_per_hour:,.0f}/h for "
            f"{c.hours:g} h; {c.preemption_rate:g} preemptions per spot VM-hour; wave: {wave}",
            f"checkpoint {c.checkpoint_seconds:g} s (at a notice {c.notice_checkpoint:g} s), "
            f"restart {c.restart_seconds:g} s, notice {c.notice_seconds:g} s "
            f"({c.notice_miss:.0%} unusable), VM replacement {c.replace_seconds:g} s, "
            f"lease {c.lease_seconds:g} s",
            f"periodic checkpoints ({where}): {every(c.interval(uses_notice=False))} if the "
            f"notice is ignored; {every(c.interval(uses_notice=True))} if it is used",
            f"prices: spot ${c.spot_price:g}/h, on-demand ${c.on_demand_price:g}/h; "
            f"seed {c.seed}",
        ]
        if self.calibration:
            lines.append("calibrated: " + ", ".join(
                f"{k}={v:g}" for k, v in sorted(self.calibration.items())))
        lines += ["", f"{'':<38} {'':>7} {'':>9} {'':>6} {'':>7} {'latency (s)':^20}  "
                      f"{'preempted jobs':^19}",
                  f"{'policy':<38} {'jobs':>7} {'cost/job':>9} {'saved':>6} {'goodput':>7} "
                  f"{'p50':>6} {'p95':>6} {'p99':>6}  {'jobs':>5} {'p50':>6} {'p99':>6} "
                  f"{'lost s':>6} {'escal':>5}"]
        for r in self.results:
            lost = "-" if r.lost_work_per_preemption is None else \
                f"{r.lost_work_per_preemption:.0f}"
            unfinished = "" if r.jobs_done == r.jobs else f"  ({r.jobs - r.jobs_done} unfinished)"
            lines.append(
                f"{r.policy:<38} {r.jobs_done:>7} {_money(r.cost_per_job):>9} "
                f"{r.saving_percent:>5.1f}% {r.goodput:>7.3f} {r.latency_p50:>6.0f} "
                f"{r.latency_p95:>6.0f} {r.latency_p99:>6.0f}  {r.preempted_jobs:>5} "
                f"{r.preempted_latency_p50:>6.0f} {r.preempted_latency_p99:>6.0f} {lost:>6} "
                f"{r.escalations:>5}{unfinished}")
        od = self.results[0].on_demand_cost_per_job if self.results else 0.0
        lines.append(f"on-demand only: {_money(od)} a job ('saved' is against that); 'lost s': "
                     "work done again per preemption; 'escal': jobs moved to on-demand")
        return "\n".join(lines)


def simulate(cfg: FleetConfig, policies: Sequence[str] = POLICIES, *,
             calibration: Mapping[str, float] | None = None) -> SimulationReport:
    """Run each policy on the same arrivals and preemptions; ValueError on bad input."""
    try:
        import simpy
    except ImportError:  # pragma: no cover - a dependency, but keep the message clear
        raise ValueError("spotrun simulate needs simpy: pip install simpy") from None
    cfg.check()
    unknown = [p for p in policies if p not in POLICY_TABLE]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    results = []
    for name in policies:
        fleet = _Fleet(cfg, POLICY_TABLE[name], simpy)
        fleet.run()
        results.append(fleet.result())
    return SimulationReport(cfg, tuple(results), dict(calibration or {}))


CONFIG_FIELDS = frozenset(f.name for f in fields(FleetConfig))


def main(*, as_json: bool = False, calibrate: str | None = None,
         policies: Sequence[str] | None = None, echo: Callable[..., Any] | None = None,
         **options: Any) -> int:
    """``spotrun simulate``: options left None take calibrated values, then the defaults
    (prices: SPOTRUN_PRICES, see spotrun.cost). 0, or 2 with one line on bad input."""
    if echo is None:
        import typer

        echo = typer.echo
    unknown = set(options) - CONFIG_FIELDS
    if unknown:
        raise TypeError(f"unknown simulate options: {sorted(unknown)}")
    try:
        values: dict[str, Any] = {}
        if options.get("spot_price") is None or options.get("on_demand_price") is None:
            prices = Prices.from_env()
            values["spot_price"] = prices.by_pool.get("spot", prices.on_demand)
            values["on_demand_price"] = prices.on_demand
        found = load_calibration(calibrate) if calibrate else {}
        values.update(found)
        values.update({k: v for k, v in options.items() if v is not None})
        cfg = replace(FleetConfig(), **values)
        report = simulate(cfg, policies or POLICIES, calibration=found)
    except (ValueError, ConfigError) as exc:
        echo(f"spotrun: {exc}", err=True)
        return 2
    echo(json.dumps(report.to_json(), indent=2) if as_json else report.to_text())
    return 0
