"""The store's records: what its methods take and give, and their rows' conversions.

Plain values (a lease, a claim request, a token, a job as the worker sees it) and the
JSON text the store writes; no SQL here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spotrun.jobs import (
    Event,
    Job,
    JobState,
    OnPreempt,
    Progress,
    Worker,
    WorkerState,
    from_epoch,
)
from spotrun.strictjson import finite

# Points kept of a job's metric series (the training curve): a chart's width's worth.
MAX_METRIC_POINTS = 300


@dataclass(frozen=True)
class Lease:
    """Proof of holding a job: every worker write carries it."""

    job_id: str
    attempt: int
    worker_id: str
    worker_name: str


@dataclass(frozen=True)
class Beat:
    """What one heartbeat writes for one lease: the lease renewed and, when the job moved
    since the last beat, its progress and its buffered log lines."""

    lease: Lease
    progress: Progress | None = None
    logs: Sequence[tuple[float, str, str]] = ()


@dataclass(frozen=True)
class BeatResult:
    """A heartbeat's answer: per job, cancel requested (bool) or None when the lease is
    lost; whether this worker is the fleet's sweeper until its next beat, and if so
    whether a sweep would find work."""

    held: dict[str, bool | None]
    sweeper: bool = False
    # For the sweeper: a lease has lapsed or a worker is overdue (a sweep has work).
    to_sweep: bool = False


@dataclass(frozen=True)
class ClaimRequest:
    """What a worker asks of a claim: who it is, how long a lease, what it can run.

    ``request_id`` names this one request: retried with the same id after an error, the
    claim (or the result that chains it) finds its own write if that had committed.
    ``idle_if_empty`` says the worker holds no other job: a claim that finds nothing then
    marks its row idle, so that the next job queued wakes it (see :func:`claim`).
    """

    worker_id: str
    worker_name: str
    lease_seconds: float
    has_cuda: bool = False
    pool: str | None = None
    request_id: str | None = None
    idle_if_empty: bool = False

    def params(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "worker_name": self.worker_name,
                "lease_seconds": float(self.lease_seconds), "has_cuda": self.has_cuda,
                "pool": self.pool, "request_id": self.request_id,
                "idle_if_empty": self.idle_if_empty}


@dataclass(frozen=True)
class NewJob:
    """One job to queue, its params already validated: what ``JobStore.submit_many``
    takes for each item (the owner and the quota are the batch's).

    ``deadline`` is in seconds since the epoch; ``idempotency_key`` names the job for its
    owner, so that a retry finds it instead of queueing it again.
    """

    pipeline: str
    params: dict[str, Any]
    priority: int = 0
    max_retries: int = 4
    on_preempt: OnPreempt = OnPreempt.RESUME
    timeout: float | None = None
    requires_cuda: bool = False
    pool: str | None = None
    idempotency_key: str | None = None
    callback_url: str | None = None
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = None
    max_preemptions: int | None = None
    deadline: float | None = None

    def values(self, job_id: str, owner: str | None) -> dict[str, Any]:
        """The job's row as the submit writes it, but for its state and times."""
        return {"id": job_id, "pipeline": self.pipeline, "params": dumps(self.params),
                "priority": self.priority, "max_retries": self.max_retries,
                "on_preempt": self.on_preempt.value, "timeout_seconds": self.timeout,
                "requires_cuda": self.requires_cuda, "pool": self.pool, "owner": owner,
                "idempotency_key": self.idempotency_key, "callback_url": self.callback_url,
                "checkpoint_every_steps": self.checkpoint_every_steps,
                "checkpoint_every_seconds": self.checkpoint_every_seconds,
                "max_preemptions": self.max_preemptions, "deadline": self.deadline}


@dataclass(frozen=True)
class Token:
    name: str
    is_admin: bool
    created_at: dt.datetime
    revoked: bool
    expires_at: dt.datetime | None = None



def new_id() -> str:
    """A job id: time-ordered (so ids sort like submissions), 16 hex digits of randomness."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def dumps(value: Any) -> str:
    """JSON text; NaN and infinities (a diverged loss) become null, as JSON has none."""
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except ValueError:
        return json.dumps(finite(value), separators=(",", ":"), sort_keys=True)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()



def even_sample(steps: Sequence[int], n: int) -> set[int]:
    """Indexes of about ``n`` of the sorted ``steps``, spread evenly over their whole span
    (the first and the last always kept): a thinned curve keeps its shape."""
    if len(steps) <= n or n < 2:
        return set(range(len(steps)))
    lo, hi = steps[0], steps[-1]
    keep, j = {0, len(steps) - 1}, 0
    for i in range(1, n - 1):
        target = lo + (hi - lo) * i / (n - 1)
        while j + 1 < len(steps) and abs(steps[j + 1] - target) <= abs(steps[j] - target):
            j += 1
        keep.add(j)
    return keep


def job_from_row(row: Any, evs: tuple[Event, ...]) -> JobRecord:
    metrics = loads(row["progress_metrics"]) or {}
    return JobRecord(
        id=row["id"],
        pipeline=row["pipeline"],
        params=loads(row["params"]),
        state=JobState(row["state"]),
        priority=row["priority"],
        attempt=row["attempt"],
        preemptions=row["preemptions"],
        retries=row["retries"],
        max_retries=row["max_retries"],
        on_preempt=OnPreempt(row["on_preempt"]),
        timeout=row["timeout_seconds"],
        worker_id=row["worker_id"],
        worker=row["worker_name"],
        lease_expires_at=None if row["lease_expires_at"] is None
        else from_epoch(row["lease_expires_at"]),
        progress=Progress(row["progress_step"], row["progress_total"], metrics),
        result=loads(row["result"]),
        error=row["error"],
        error_traceback=row["error_traceback"],
        checkpoint=row["checkpoint"],
        checkpoint_prev=row["checkpoint_prev"],
        requires_cuda=bool(row["requires_cuda"]),
        cancel_requested=bool(row["cancel_requested"]),
        run_seconds=float(row["run_seconds"] or 0.0),
        owner=row["owner"],
        created_at=from_epoch(row["created_at"]),
        updated_at=from_epoch(row["updated_at"]),
        events=evs,
        checkpoint_step=row["checkpoint_step"],
        checkpoint_prev_step=row["checkpoint_prev_step"],
        checkpoint_every_steps=row["checkpoint_every_steps"],
        checkpoint_every_seconds=row["checkpoint_every_seconds"],
        callback_url=row["callback_url"],
        pool=row["pool"],
        max_preemptions=row["max_preemptions"],
        deadline=row["deadline"],
        started_at=None if row["started_at"] is None else float(row["started_at"]),
        created_epoch=float(row["created_at"]),
        updated_epoch=float(row["updated_at"]),
    )


@dataclass(frozen=True)
class JobRecord(Job):
    """A job with the fields that only workers and operators need."""

    checkpoint_step: int | None = None
    checkpoint_prev_step: int | None = None
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = None
    callback_url: str | None = None
    pool: str | None = None
    max_preemptions: int | None = None
    deadline: float | None = None
    started_at: float | None = None
    created_epoch: float = 0.0
    updated_epoch: float = 0.0  # ``updated_at`` exactly as stored (a page's bound)


@dataclass(frozen=True)
class IntakeEvent:
    """An event of a job that came from a message bus, with what its publication needs."""

    event_id: int
    job_id: str
    kind: str
    at: float
    worker: str | None
    attempt: int
    message: str
    data: Any
    message_id: str
    idempotency_key: str | None
    job_state: JobState
    result: Any
    error: str | None

def worker_from_row(r: Any) -> Worker:
    return Worker(
        id=r["id"], name=r["name"], host=r["host"], pid=r["pid"], pool=r["pool"],
        state=WorkerState(r["state"]), has_cuda=bool(r["has_cuda"]), current_job=r["current_job"],
        started_at=from_epoch(r["started_at"]), last_heartbeat=from_epoch(r["last_heartbeat"]),
        price_per_hour=r["price_per_hour"],
    )


