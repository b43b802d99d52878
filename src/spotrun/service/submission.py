"""A job request as every edge makes it: its options, their limits, and its errors as data.

The limits here are the only ones: the CLI's options and the API's request schema both
read them, so ``spotrun submit --deadline 0`` and ``POST /v1/jobs {"deadline": 0}`` are
refused alike. Errors carry the field at fault as data (``Problem.field``), relative to
the request (``params.epochs``, ``pool``); the API prefixes ``body.``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from spotrun.jobs import OnPreempt

# (lowest, highest) of each option a request may set. The highest values keep every
# number inside the database's columns (32-bit integers) and a sensible range.
PRIORITY = (-1000, 1000)
MAX_RETRIES = (0, 1000)
MAX_PREEMPTIONS = (0, 1000)
CHECKPOINT_EVERY_STEPS = (1, 1_000_000_000)
CHECKPOINT_EVERY_SECONDS = (0.01, 30 * 86_400.0)
DEADLINE_SECONDS = (1.0, 366 * 86_400.0)  # from now
TIMEOUT_MAX_SECONDS = 30 * 86_400.0  # the API's bound; the CLI's lowest is 1 ms
# Jobs one batch submit may queue: a batch is one transaction, and its answer one document.
MAX_BATCH = 1000


@dataclass(frozen=True)
class Submission:
    """A job to queue, as asked: params not yet checked against the pipeline's schema.

    ``deadline`` is in seconds from now; ``pool`` None runs on any pool.
    """

    pipeline: str
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_retries: int = 4
    on_preempt: OnPreempt = OnPreempt.RESUME
    timeout: float | None = None
    pool: str | None = None
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = None
    max_preemptions: int | None = None
    deadline: float | None = None
    callback_url: str | None = None
    strict_params: bool = False  # params exactly of their schema's JSON types (the API)


@dataclass(frozen=True)
class Problem:
    """One field at fault: where (``params.epochs``, ``pool``, ``callback_url``) and why."""

    field: str
    reason: str


class ServiceError(Exception):
    """A request the service refuses; ``str()`` is one line for people."""


class Invalid(ServiceError):
    """The request cannot be a job: the fields at fault, and the sentence for people.

    ``line`` is the check's own sentence when it wrote one (a pipeline's schema, its
    submit check); else the line is made from the problems.
    """

    def __init__(self, problems: Iterable[Problem], line: str | None = None) -> None:
        self.problems = list(problems)
        self.line = line
        super().__init__(self.describe())

    @classmethod
    def one(cls, field_: str, reason: str, line: str | None = None) -> Invalid:
        return cls([Problem(field_, reason)], line)

    def describe(self, prefix: str = "") -> str:
        """The line for people; fields named with ``prefix`` (the API's ``body.``)."""
        return self.line or "; ".join(f"{prefix}{p.field}: {p.reason}" for p in self.problems)


class Forbidden(ServiceError):
    """The caller may not do this (not an admin, a command job, a callback to a private
    address); the message says why, and ``field`` names the request's field at fault,
    if one is."""

    def __init__(self, message: str, field_: str | None = None) -> None:
        super().__init__(message)
        self.field = field_


class Refused(ServiceError):
    """Params that meet the pipeline's schema, refused by its submit check given what
    exists now; ``missing`` when a job they name does not exist (or is not the caller's).
    ``field`` names the param at fault (``params.model``)."""

    def __init__(self, message: str, field_: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.field = field_
        self.missing = missing


class IdempotencyConflict(ServiceError):
    """The idempotency key was used for a different job, ``job_id``."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the idempotency key was used for a different job ({job_id})")
        self.job_id = job_id


class ItemError(ServiceError):
    """Item ``index`` of a batch was refused, so nothing of the batch was queued; ``error``
    is what refused it, as for a job on its own (:class:`Invalid`, :class:`Forbidden`,
    :class:`Refused`, :class:`IdempotencyConflict`, an unknown pipeline, a quota)."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"jobs.{index}: {error}")
        self.index = index
        self.error = error


def bad_value(value: Any, where: str) -> Problem | None:
    """The first string, key or number the store or JSON cannot carry, or None."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return Problem(path, "contains a NUL character")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return Problem(path, "is not valid Unicode text")
        elif isinstance(v, float) and not math.isfinite(v):
            return Problem(path, "must be a finite number")
        elif isinstance(v, dict):
            for k, item in v.items():
                bad = bad_value(k, f"{path}.{k!s:.40}") if isinstance(k, str) else None
                if bad:
                    return bad
                stack.append((f"{path}.{k}", item))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(v))
    return None


def check_text(field_: str, value: str | None) -> None:
    """Raise :class:`Invalid` naming ``field_`` if ``value`` is text the store cannot keep."""
    if value is not None:
        bad = bad_value(value, field_)
        if bad:
            raise Invalid([bad])
