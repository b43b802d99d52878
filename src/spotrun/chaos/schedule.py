"""What a chaos drill will do, drawn from its seed before anything starts: the jobs, their
params and arrival times, the kills, the database restart, stall and cut replies."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PlannedJob:
    key: str  # "train-1", "infer-1", "sleep-1": names the job in the schedule and report
    pipeline: str
    params: dict[str, Any]
    at: float | None  # seconds into the drill; None: once its model's job has succeeded
    checkpoint_every_steps: int | None = None
    priority: int = 0
    model_of: str | None = None  # digits-infer: the key of the train job it uses


@dataclass(frozen=True)
class PlannedKill:
    at: float
    kind: str  # "sigterm" | "sigkill" | "freeze"
    slot: int  # the worker slot it aims at (another live one if that one is not ready)


@dataclass(frozen=True)
class Schedule:
    seed: int
    workers: int
    duration: float
    jobs: tuple[PlannedJob, ...]
    kills: tuple[PlannedKill, ...]
    db_restart_at: float | None
    db_stall_at: float | None = None
    cuts: tuple[float, ...] = ()  # when a claim's and a result's replies are cut

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """12 hex digits that change whenever anything in the schedule does."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def count(self, pipeline: str) -> int:
        return sum(1 for j in self.jobs if j.pipeline == pipeline)


KILL_KINDS = ("sigterm", "sigkill", "freeze")


def make_schedule(*, seed: int, workers: int, jobs: int, duration: float,
                  sigterm_rate: float, sigkill_rate: float, freeze_rate: float,
                  db_restart: bool, with_torch: bool = True, db_stall: bool = False,
                  cut_replies: bool = False) -> Schedule:
    """Everything the drill will do, drawn from ``random.Random(seed)`` alone."""
    rng = random.Random(seed)
    n_train = max(1, round(jobs * 0.15)) if with_torch else 0
    n_infer = min(round(jobs * 0.10), jobs - n_train) if with_torch else 0
    n_sleep = jobs - n_train - n_infer
    planned: list[PlannedJob] = []
    for i in range(n_train):
        # Small and slowed down a little, so that each lasts a few seconds, checkpoints
        # several times and is likely to be running when a kill lands.
        params = {"epochs": rng.randint(2, 4), "batch_size": 32,
                  "hidden": rng.choice((32, 64)), "seed": rng.randint(0, 3),
                  "step_delay": rng.choice((0.01, 0.015, 0.02)), "device": "cpu"}
        planned.append(PlannedJob(f"train-{i + 1}", "digits-train", params, 0.0,
                                  checkpoint_every_steps=20, priority=1))
    for i in range(n_infer):
        planned.append(PlannedJob(f"infer-{i + 1}", "digits-infer", {"device": "cpu"}, None,
                                  model_of=f"train-{i % n_train + 1}"))
    # Sleep jobs arrive over the first three quarters of the window, like a service's
    # stream of submissions, so that kills throughout the window find work to interrupt.
    arrivals = sorted(round(rng.uniform(0, 0.75 * duration), 2) for _ in range(n_sleep))
    for i, at in enumerate(arrivals):
        params = {"seconds": round(rng.uniform(0.5, 3.0), 2), "steps": rng.randint(10, 30)}
        planned.append(PlannedJob(f"sleep-{i + 1}", "sleep", params, at,
                                  checkpoint_every_steps=5))
    kills: list[PlannedKill] = []
    lo, hi = 0.05 * duration, 0.95 * duration
    for kind, rate in zip(KILL_KINDS, (sigterm_rate, sigkill_rate, freeze_rate), strict=True):
        # The expected number, at least one when asked for at all, each in its own slice of
        # the window: a short drill still exercises every kind, and kills do not bunch up.
        n = max(1, round(rate * duration)) if rate > 0 else 0
        for i in range(n):
            at = lo + (i + rng.uniform(0.1, 0.9)) * (hi - lo) / n
            kills.append(PlannedKill(round(at, 2), kind, rng.randrange(workers)))
    restart_at = round(rng.uniform(0.3, 0.6) * duration, 2) if db_restart else None
    if restart_at is not None and kills:
        # The hard case of a restart is a worker replaced while the database is down: move
        # the nearest SIGKILL (else the nearest kill) into the outage, so every drill with
        # --db-restart boots a replacement worker against a database that is not there.
        pool = [k for k in kills if k.kind == "sigkill"] or kills
        nearest = min(pool, key=lambda k: abs(k.at - restart_at))
        kills[kills.index(nearest)] = PlannedKill(round(restart_at + 0.5, 2), nearest.kind,
                                                  nearest.slot)
    kills.sort(key=lambda k: (k.at, k.kind))
    # Drawn last, so that a seed's jobs, kills and restart stay what they were without.
    stall_at = round(rng.uniform(0.1, 0.25) * duration, 2) if db_stall else None
    cuts: list[float] = []
    if cut_replies:
        n = max(2, round(duration / 10))
        cuts = [round(0.05 * duration + (i + rng.uniform(0.1, 0.9)) * 0.85 * duration / n, 2)
                for i in range(n)]
    return Schedule(seed, workers, duration, tuple(planned), tuple(kills), restart_at,
                    stall_at, tuple(cuts))

