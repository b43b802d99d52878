"""Per-user quotas: how much of a shared fleet one user may ask for.

A quota applies to users (API and dashboard tokens that are not an admin's); operators
(the CLI, admin tokens) have none. Each limit has a default, from the environment, that
an operator can change per user with ``spotrun quota set``. Over a quota a submit is
refused with one line naming the quota and the current use (HTTP 429), and nothing is
queued.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from spotrun.config import ConfigError

# (field, environment variable, default, what it limits)
_LIMITS = (
    ("max_queued", "SPOTRUN_QUOTA_QUEUED", 1000, "jobs waiting in the queue at once"),
    # Per user only (spotrun quota set): the claim reads it from the database.
    ("max_running", "", 0, "jobs running at once (0: no limit)"),
    ("max_retries", "SPOTRUN_QUOTA_MAX_RETRIES", 10, "max_retries a job may ask for"),
    # Above 0 is an operator's right: a user's priority only orders their own jobs.
    ("max_priority", "SPOTRUN_QUOTA_MAX_PRIORITY", 0, "the highest priority a job may have"),
    ("max_params_bytes", "SPOTRUN_QUOTA_PARAMS_BYTES", 65536, "bytes of a job's params"),
)
LIMIT_NAMES = tuple(name for name, *_ in _LIMITS)
DESCRIPTIONS = {name: words for name, _env, _default, words in _LIMITS}


class QuotaExceeded(Exception):
    """A submit would go over a user's quota; the message names it and the use."""

    def __init__(self, owner: str, limit: str, allowed: int, use: int) -> None:
        self.owner, self.limit, self.allowed, self.use = owner, limit, allowed, use
        super().__init__(f"over quota {limit} for {owner}: {DESCRIPTIONS[limit]} is limited "
                         f"to {allowed}, and this would make {use}")


@dataclass(frozen=True)
class Quota:
    """One user's limits."""

    max_queued: int = 1000
    max_running: int = 0
    max_retries: int = 10
    max_priority: int = 0
    max_params_bytes: int = 65536

    @classmethod
    def defaults(cls) -> Quota:
        """The limits of a user without quotas of their own (from the environment)."""
        values: dict[str, int] = {}
        for name, env, default, _words in _LIMITS:
            raw = os.environ.get(env, "") if env else ""
            if raw == "":
                values[name] = default
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise ConfigError(f"{env}={raw!r} is not a whole number") from None
            if values[name] < (-1000 if name == "max_priority" else 0):
                raise ConfigError(f"{env}={raw!r} is below what it can be")
        return cls(**values)

    def with_overrides(self, overrides: dict[str, Any]) -> Quota:
        """These limits with a user's own values (None keeps the default)."""
        return replace(self, **{k: int(v) for k, v in overrides.items()
                                if v is not None and k in LIMIT_NAMES})

    def check_request(self, owner: str, *, priority: int, max_retries: int,
                      params_bytes: int) -> None:
        """Raise :class:`QuotaExceeded` for a job that asks for more than allowed."""
        if priority > self.max_priority:
            raise QuotaExceeded(owner, "max_priority", self.max_priority, priority)
        if max_retries > self.max_retries:
            raise QuotaExceeded(owner, "max_retries", self.max_retries, max_retries)
        if params_bytes > self.max_params_bytes:
            raise QuotaExceeded(owner, "max_params_bytes", self.max_params_bytes,
                                params_bytes)

    def to_json(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}
