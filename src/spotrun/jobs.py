"""The domain: jobs, their states and their events. Plain values, no I/O."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class JobState(enum.StrEnum):
    """Where a job is in its life. Only the store moves a job between states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# The state machine. running -> queued is a hand-back or an expired lease.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def can_transition(old: JobState, new: JobState) -> bool:
    """Whether the state machine allows ``old -> new``."""
    return new in TRANSITIONS[old]


class OnPreempt(enum.StrEnum):
    """What a preemption notice does to a running job."""

    RESUME = "resume"  # hand back with the checkpoint; the next attempt continues from it
    RESTART = "restart"  # hand back without the checkpoint; the next attempt starts over
    FAIL = "fail"  # end the job failed (for work that cannot be repeated)


class WorkerState(enum.StrEnum):
    """Where a worker process is in its life, as its heartbeats (or their absence) say."""

    IDLE = "idle"  # registered, waiting for work
    BUSY = "busy"  # holding a job's lease
    STOPPING = "stopping"  # handing its jobs back before it exits
    STOPPED = "stopped"  # exited cleanly
    GONE = "gone"  # stopped sending heartbeats: marked so by a sweep

    @property
    def is_live(self) -> bool:
        return self in LIVE_WORKER_STATES


LIVE_WORKER_STATES = frozenset({WorkerState.IDLE, WorkerState.BUSY, WorkerState.STOPPING})


class EventKind(enum.StrEnum):
    SUBMITTED = "submitted"
    STARTED = "started"
    RESUMED = "resumed"
    CHECKPOINT = "checkpoint"
    CHECKPOINT_CORRUPT = "checkpoint_corrupt"
    PREEMPTED = "preempted"
    HANDED_BACK = "handed_back"
    LEASE_EXPIRED = "lease_expired"
    ESCALATED = "escalated"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELLED = "cancelled"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NOTE = "note"


@dataclass(frozen=True)
class Event:
    """One line of a job's history, written in words a user understands."""

    at: dt.datetime
    kind: str
    worker: str | None
    attempt: int
    message: str
    # How the message was worked out (a formula, its inputs), for a reader who asks.
    detail: str | None = None
    # The event's facts as stored (events.data; None for rows written before payloads):
    # read them with spotrun.events.payload_of, never from the message.
    data: Mapping[str, Any] | None = field(default=None, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "kind": self.kind,
            "worker": self.worker,
            "attempt": self.attempt,
            "message": self.message,
            "detail": self.detail,
            # The facts the message is rendered from (spotrun.events' payload, with its
            # shape's version "v"); null for rows written before payloads existed.
            "data": None if self.data is None else dict(self.data),
        }


@dataclass(frozen=True)
class Progress:
    step: int = 0
    total: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "total": self.total, **self.metrics}

    def describe(self) -> str:
        return f"step {self.step}/{self.total}" if self.total else f"step {self.step}"


@dataclass(frozen=True)
class Job:
    """A job as the store last saw it."""

    id: str
    pipeline: str
    params: dict[str, Any]
    state: JobState
    priority: int
    attempt: int
    preemptions: int
    retries: int
    max_retries: int
    on_preempt: OnPreempt
    timeout: float | None
    worker_id: str | None
    worker: str | None
    lease_expires_at: dt.datetime | None
    progress: Progress
    result: Any
    error: str | None
    error_traceback: str | None
    checkpoint: str | None
    checkpoint_prev: str | None
    requires_cuda: bool
    cancel_requested: bool
    run_seconds: float
    owner: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    events: tuple[Event, ...] = ()

    def to_json(self, *, with_events: bool = True) -> dict[str, Any]:
        """The job's public JSON shape, shared by the CLI and the API."""
        out: dict[str, Any] = {
            "id": self.id,
            "pipeline": self.pipeline,
            "params": self.params,
            "state": self.state.value,
            "priority": self.priority,
            "attempt": self.attempt,
            "preemptions": self.preemptions,
            "retries": self.retries,
            "max_retries": self.max_retries,
            "on_preempt": self.on_preempt.value,
            "timeout": self.timeout,
            "worker": self.worker,
            "progress": self.progress.to_json(),
            "result": self.result,
            "error": self.error,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }
        if with_events:
            out["events"] = [e.to_json() for e in self.events]
        return out


@dataclass(frozen=True)
class Worker:
    """A registered worker process."""

    id: str
    name: str
    host: str
    pid: int
    pool: str
    state: WorkerState
    has_cuda: bool
    current_job: str | None
    started_at: dt.datetime
    last_heartbeat: dt.datetime
    price_per_hour: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "pool": self.pool,
            "state": str(self.state),
            "has_cuda": self.has_cuda,
            "current_job": self.current_job,
            "started_at": iso(self.started_at),
            "last_heartbeat": iso(self.last_heartbeat),
        }


@dataclass(frozen=True)
class LogLine:
    at: dt.datetime
    attempt: int
    level: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "attempt": self.attempt, "level": self.level,
                "message": self.message}


def iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def from_epoch(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


@dataclass(frozen=True)
class MetricPoint:
    """One point of a job's training curve: the numeric metrics it reported at a step."""

    step: int
    attempt: int
    at: dt.datetime
    metrics: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "attempt": self.attempt, "at": iso(self.at),
                "metrics": self.metrics}
