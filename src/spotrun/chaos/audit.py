"""The audit: from a store alone, proof that no job was lost, none ran to completion
twice, every result came from the attempt holding the lease and every resume started
from the last checkpoint. Usable on any store after any run (``spotrun audit``); the
chaos drill runs its checks on its own jobs.

It reads the events' data (:func:`spotrun.events.payload_of`), never their words.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotrun.events import (
    Checkpointed,
    CheckpointUnusable,
    HandedBack,
    Preempted,
    ResumeHow,
    end_step,
    payload_of,
    start_step,
)
from spotrun.jobs import Event, EventKind, Job, JobState
from spotrun.store import JobStore, redact, sqlite_file

CLAIMS = (EventKind.STARTED.value, EventKind.RESUMED.value)
ENDS = (EventKind.SUCCEEDED.value, EventKind.FAILED.value, EventKind.CANCELLED.value)
# What a job's last lifecycle event leaves it as: the events that end or start an attempt.
_LEFT_QUEUED = (EventKind.SUBMITTED.value, EventKind.PREEMPTED.value,
                EventKind.HANDED_BACK.value, EventKind.LEASE_EXPIRED.value)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


# ---------------------------------------------------------------------- checks
# Each takes the jobs to check, with their events, keyed by the label its findings use
# (the drill's plan keys, or job ids).


def check_completed_once(jobs: Mapping[str, Job]) -> Check:
    """A succeeded job has exactly one end event, 'succeeded'; no other job has one."""
    twice = []
    for k, job in jobs.items():
        ends = [e.kind for e in job.events if e.kind in ENDS]
        want = ([EventKind.SUCCEEDED.value] if job.state is JobState.SUCCEEDED
                else [e for e in ends if e != EventKind.SUCCEEDED])
        if ends != want:
            twice.append(f"{k} ({job.state.value}) has end events: {', '.join(ends)}")
    return Check("no job completed twice", not twice,
                 "exactly one 'succeeded' event per succeeded job, none for the "
                 "others" if not twice else "; ".join(twice))


def check_fenced(jobs: Mapping[str, Job]) -> Check:
    """Each succeeded job's result was written by its last claim's attempt and worker."""
    wrong = []
    for k, job in jobs.items():
        if job.state is not JobState.SUCCEEDED:
            continue
        ok_events = [e for e in job.events if e.kind == EventKind.SUCCEEDED]
        claims = [e for e in job.events if e.kind in CLAIMS]
        if not ok_events or not claims:
            wrong.append(f"{k}: no succeeded or claim event")
            continue
        done, holder = ok_events[-1], claims[-1]
        if (done.attempt, done.worker) != (job.attempt, job.worker) or \
                (done.attempt, done.worker) != (holder.attempt, holder.worker):
            wrong.append(f"{k}: written by attempt {done.attempt} on {done.worker}, the "
                         f"lease was attempt {holder.attempt} on {holder.worker}")
    n = sum(1 for j in jobs.values() if j.state is JobState.SUCCEEDED)
    return Check("every result written by the attempt holding the lease", not wrong,
                 f"{n} results, each by the last claim's attempt and worker" if not wrong
                 else "; ".join(wrong))


def _lifecycle(job: Job) -> str | None:
    """The kind of the job's last event that moved it (submitted, a claim, an end)."""
    moves = [e.kind for e in job.events
             if e.kind in CLAIMS or e.kind in ENDS or e.kind in _LEFT_QUEUED]
    return moves[-1] if moves else None


def check_states(jobs: Mapping[str, Job]) -> Check:
    """Every job's state is the one its history leaves it in: no job lost, none stuck in
    a state no event explains."""
    wrong = []
    for k, job in jobs.items():
        last = _lifecycle(job)
        if not job.events or job.events[0].kind != EventKind.SUBMITTED:
            wrong.append(f"{k}: its history does not begin with its submission")
        elif job.state.is_final and last != job.state.value:
            wrong.append(f"{k} is {job.state.value}, its history ends with {last}")
        elif job.state is JobState.RUNNING and (last not in CLAIMS or next(
                e for e in reversed(job.events) if e.kind in CLAIMS).attempt != job.attempt):
            wrong.append(f"{k} is running at attempt {job.attempt}, its history ends with "
                         f"{last}")
        elif job.state is JobState.QUEUED and last not in _LEFT_QUEUED:
            wrong.append(f"{k} is queued, its history ends with {last}")
    return Check("every job's state agrees with its history", not wrong,
                 f"{len(jobs)} jobs: queued, running or ended as their events say"
                 if not wrong else "; ".join(wrong))


def check_attempts(jobs: Mapping[str, Job]) -> Check:
    """Each claim is a new attempt (1, 2, 3, ...), the last one the job's: the fencing
    token grew by one on every claim and no claim went unrecorded or happened twice."""
    wrong = []
    for k, job in jobs.items():
        seen = [e.attempt for e in job.events if e.kind in CLAIMS]
        if seen != list(range(1, len(seen) + 1)) or (seen and seen[-1] != job.attempt):
            wrong.append(f"{k}: claims of attempts {seen or 'none'}, the job is at attempt "
                         f"{job.attempt}")
    n = sum(1 for j in jobs.values() for e in j.events if e.kind in CLAIMS)
    return Check("every claim a new attempt", not wrong,
                 f"{n} claims, each the next attempt of its job" if not wrong
                 else "; ".join(wrong))


def check_resumes(jobs: Mapping[str, Job]) -> Check:
    """Every attempt after the first started where the last one left it, or later: at
    the step the stop's event names (a checkpoint saved or kept; 0 when none or
    on_preempt=restart), else (an expired lease) never before the last checkpoint the
    history records. No work thrown away."""
    wrong = []
    resumes = 0
    for k, job in jobs.items():
        floor = 0  # the last checkpoint the history records
        expected: int | None = None  # where the last stop says the next attempt resumes
        corrupt = False  # a checkpoint of this attempt was found corrupt on load
        claimed = False
        for e in job.events:
            p = payload_of(e)
            if e.kind in CLAIMS:
                step = start_step(p)
                if claimed:
                    resumes += 1
                    # Later than said is no loss: a checkpoint committed whose reply was
                    # lost is named by no event, and the next attempt rightly uses it.
                    if expected is not None and step < expected:
                        wrong.append(f"{k} attempt {e.attempt} started at step {step}, the "
                                     f"last stop said {expected}")
                    elif expected is None and step < floor:
                        wrong.append(f"{k} attempt {e.attempt} started at step {step}, "
                                     f"before its checkpoint at step {floor}")
                claimed, expected, corrupt = True, None, False
                floor = step
            elif isinstance(p, CheckpointUnusable):
                # Dropped on load: the attempt goes on from the previous one, or from 0.
                corrupt = True
                floor = (p.previous_step or 0) if p.previous else 0
            elif isinstance(p, Checkpointed):
                floor = max(floor, p.step or 0)
            elif isinstance(p, Preempted | HandedBack):
                where = p.resumes_from
                if p.resume.how in (ResumeHow.SAVED, ResumeHow.REUSED) and \
                        p.resume.step is not None:
                    floor = max(floor, p.resume.step)
                if where == 0:
                    floor = 0
                expected = None if corrupt else where
    return Check("every attempt resumed from the last checkpoint", not wrong,
                 f"{resumes} later attempts, each from where the one before stopped"
                 if not wrong else "; ".join(wrong))


CHECKS: tuple[Callable[[Mapping[str, Job]], Check], ...] = (
    check_states, check_completed_once, check_fenced, check_attempts, check_resumes)


def audit_jobs(jobs: Mapping[str, Job]) -> list[Check]:
    """Every check of the audit over these jobs (with their events)."""
    return [check(jobs) for check in CHECKS]


def audit(store: Any, *, job_ids: Iterable[str] | None = None) -> list[Check]:
    """The audit of a store's jobs (all, or ``job_ids``); ``store`` is a
    :class:`spotrun.store.JobStore`. Findings are labelled with job ids."""
    ids = [j.id for j in store.list_jobs()] if job_ids is None else list(job_ids)
    return audit_jobs({i: store.get(i) for i in ids})


# ------------------------------------------------------------ work lost (metric)


@dataclass(frozen=True)
class Interruption:
    kind: str  # "preempted" (a hand-back on notice) or "lease_expired"
    steps: int  # steps redone: the step the store recorded minus the step resumed from
    seconds: float  # work redone, estimated in seconds
    gap: float | None  # seconds until an attempt was claimed again


_SAFE = (EventKind.STARTED, EventKind.RESUMED, EventKind.CHECKPOINT)


def interruptions(events: tuple[Event, ...], per_step: float, stops: dict[str, list[float]],
                  lease_seconds: float) -> tuple[list[Interruption], int]:
    """A job's hand-backs and expiries, and how many events did not say their step.

    Seconds redone after an expiry: from the attempt's last checkpoint (or its claim) to
    the moment its worker stopped: ``stops`` (a kill's SIGKILL or SIGSTOP, by worker),
    else one lease before the expiry. The store's step is the last one a heartbeat
    carried, so after a hard kill the steps are a lower bound and the seconds the better
    measure.
    """
    out: list[Interruption] = []
    unread = 0
    for n, e in enumerate(events):
        if e.kind not in (EventKind.PREEMPTED, EventKind.LEASE_EXPIRED):
            continue
        nxt = next((x for x in events[n + 1:]
                    if x.kind in (EventKind.STARTED, EventKind.RESUMED)), None)
        stopped = end_step(payload_of(e))
        if nxt is None or stopped is None:
            unread += 1
            continue
        steps = max(0, stopped - start_step(payload_of(nxt)))
        seconds = steps * per_step
        at = e.at.timestamp()
        if e.kind == EventKind.LEASE_EXPIRED:
            stop = max((t for t in stops.get(e.worker or "", []) if t <= at),
                       default=at - lease_seconds)
            safe = [x.at.timestamp() for x in events[:n]
                    if x.attempt == e.attempt and x.kind in _SAFE and x.at.timestamp() <= stop]
            seconds = max(seconds, stop - max(safe)) if safe else seconds
        out.append(Interruption(e.kind, steps, seconds,
                                max(0.0, (nxt.at - e.at).total_seconds())))
    return out, unread


# ------------------------------------------------------------------ the command


def format_findings(checks: list[Check], jobs: int) -> str:
    lines = [f"audit of {jobs} jobs", ""]
    lines += [f"  {'ok  ' if x.ok else 'FAIL'}  {x.name}: {x.detail}" for x in checks]
    failed = [x for x in checks if not x.ok]
    lines += ["", f"result: PASS, all {len(checks)} checks passed" if not failed else
              f"result: FAIL, {len(failed)} of {len(checks)} checks failed: "
              + ", ".join(x.name for x in failed)]
    return "\n".join(lines)


def main(database_url: str, *, as_json: bool = False,
         echo: Callable[[str], object] = print) -> int:
    """``spotrun audit``: print the findings; 0 when every check passed, 1 if not, 2 when
    there is no store to audit."""
    path = sqlite_file(database_url)
    if path is not None and not Path(path).exists():
        # Opening it would create an empty store, and audit that.
        print(f"spotrun: no store at {redact(database_url)}", file=sys.stderr)
        return 2
    store = JobStore.open(database_url)
    try:
        ids = [j.id for j in store.list_jobs()]
        checks = audit(store, job_ids=ids)
    finally:
        store.close()
    ok = all(c.ok for c in checks)
    echo(json.dumps({"ok": ok, "jobs": len(ids), "checks": [c.to_json() for c in checks]},
                    indent=2) if as_json else format_findings(checks, len(ids)))
    return 0 if ok else 1
