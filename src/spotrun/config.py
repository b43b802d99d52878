"""Settings from the environment, with the defaults that matter for spot workers."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path


class ConfigError(ValueError):
    """A setting has a value spotrun cannot use; the message names it."""


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A number from the environment; a bad value is one clear error at start."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} must be a finite number")
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _int(name: str, default: int, *, minimum: int = 0) -> int:
    value = env_float(name, float(default), minimum=minimum)
    if value != int(value) or value > 1_000_000_000:
        raise ConfigError(f"{name}={os.environ.get(name)!r} must be a whole number")
    return int(value)


POOL_PATTERN = "^[a-z0-9][a-z0-9-]{0,31}$"  # the API document's pattern, too
_POOL = re.compile(POOL_PATTERN.strip("^$"))


def check_pool(name: str, where: str = "pool") -> str:
    """A pool name: spot, on-demand, or another lower-case name of your own."""
    if not _POOL.fullmatch(name):
        raise ConfigError(f"{where}={name!r} is not a pool name (lower-case letters, digits "
                          "and '-', e.g. spot or on-demand)")
    return name


@dataclass(frozen=True)
class Settings:
    """Where the data lives and how long leases and notices last."""

    home: Path
    database_url: str
    checkpoint_url: str
    # 2.5 s: four beats a lease, and a busy worker costs the database 0.4 transactions a
    # second (a fleet of 10,000 busy workers: 4,000/s, see docs/deploy-gke.md).
    heartbeat_seconds: float = 2.5
    lease_seconds: float = 10.0
    # An idle worker holds no lease: its heartbeat only says it is alive, and it is marked
    # gone after three missed ones. Without a wake-up it looks for work every
    # ``idle_poll_seconds`` on average (jittered), else only when woken.
    idle_heartbeat_seconds: float = 20.0
    idle_poll_seconds: float = 15.0
    grace_seconds: float = 15.0
    safety_margin_seconds: float = 1.0
    checkpoint_every_steps: int = 0
    # None: the Young/Daly interval within [min, max] (see spotrun.policy).
    checkpoint_every_seconds: float | None = None
    checkpoint_min_seconds: float = 10.0
    checkpoint_max_seconds: float = 600.0
    max_preemptions: int = 5
    pool: str = "spot"
    price_per_hour: float | None = None
    # GB a job may use on top of the worker's own address space (RLIMIT_AS, CPU workers
    # only); None: no limit.
    job_memory_gb: float | None = None

    @classmethod
    def from_env(
        cls, *, home: str | None = None, database_url: str | None = None
    ) -> Settings:
        home_path = Path(home or os.environ.get("SPOTRUN_HOME") or ".spotrun").absolute()
        if home_path.exists() and not home_path.is_dir():
            raise ConfigError(f"SPOTRUN_HOME={str(home_path)!r} is not a directory")
        url = database_url or os.environ.get("SPOTRUN_DATABASE_URL") or ""
        if not url:
            url = f"sqlite:///{home_path / 'spotrun.db'}"
        ckpt = os.environ.get("SPOTRUN_CHECKPOINT_URL") or str(home_path / "checkpoints")
        settings = cls(
            home=home_path,
            database_url=url,
            checkpoint_url=ckpt,
            heartbeat_seconds=env_float("SPOTRUN_HEARTBEAT_SECONDS", 2.5, minimum=0.05),
            lease_seconds=env_float("SPOTRUN_LEASE_SECONDS", 10.0, minimum=0.2),
            idle_heartbeat_seconds=env_float("SPOTRUN_IDLE_HEARTBEAT_SECONDS", 20.0,
                                             minimum=0.05),
            idle_poll_seconds=env_float("SPOTRUN_IDLE_POLL_SECONDS", 15.0, minimum=0.01),
            grace_seconds=env_float("SPOTRUN_GRACE_SECONDS", 15.0, minimum=0.5),
            safety_margin_seconds=env_float("SPOTRUN_SAFETY_MARGIN_SECONDS", 1.0),
            checkpoint_every_steps=_int("SPOTRUN_CHECKPOINT_EVERY_STEPS", 0),
            checkpoint_every_seconds=(
                env_float("SPOTRUN_CHECKPOINT_EVERY_SECONDS", 0.0, minimum=0.01)
                if os.environ.get("SPOTRUN_CHECKPOINT_EVERY_SECONDS") else None),
            checkpoint_min_seconds=env_float("SPOTRUN_CHECKPOINT_MIN_SECONDS", 10.0),
            checkpoint_max_seconds=env_float("SPOTRUN_CHECKPOINT_MAX_SECONDS", 600.0),
            max_preemptions=_int("SPOTRUN_MAX_PREEMPTIONS", 5),
            pool=check_pool(os.environ.get("SPOTRUN_POOL") or "spot", "SPOTRUN_POOL"),
            price_per_hour=(env_float("SPOTRUN_PRICE_PER_HOUR", 0.0)
                            if os.environ.get("SPOTRUN_PRICE_PER_HOUR") else None),
            job_memory_gb=(env_float("SPOTRUN_JOB_MEMORY_GB", 0.0, minimum=0.01)
                           if os.environ.get("SPOTRUN_JOB_MEMORY_GB") else None),
        )
        settings.check()
        return settings

    def check(self) -> None:
        if self.checkpoint_min_seconds > self.checkpoint_max_seconds:
            raise ConfigError(
                f"SPOTRUN_CHECKPOINT_MIN_SECONDS ({self.checkpoint_min_seconds:g}) is above "
                f"SPOTRUN_CHECKPOINT_MAX_SECONDS ({self.checkpoint_max_seconds:g})")
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ConfigError(
                f"heartbeat ({self.heartbeat_seconds:g} s) must be shorter than the lease "
                f"({self.lease_seconds:g} s), or leases expire between heartbeats"
            )

    def with_(self, **changes: object) -> Settings:
        new = replace(self, **changes)  # type: ignore[arg-type]
        new.check()
        return new
