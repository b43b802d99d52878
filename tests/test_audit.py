"""``spotrun audit`` on a real store after real workers ran its jobs (one preempted by a
real SIGTERM and resumed elsewhere): every check passes; a history that breaks a promise
(a second result, a job whose state its history does not explain) fails it, naming the
job."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from conftest import Env, wait_until
from spotrun.chaos.audit import check_attempts, check_resumes, check_states
from spotrun.events import (
    Checkpointed,
    CheckpointUnusable,
    LeaseExpired,
    Preempted,
    Resume,
    Resumed,
    ResumeHow,
    Started,
    Submitted,
    render,
)
from spotrun.jobs import Event, Job, JobState, OnPreempt, Progress
from spotrun.schema import events, jobs


def _audit(env: Env, *args: str) -> tuple[int, dict[str, Any]]:
    proc = env.cli("audit", "--json", *args, check=False)
    assert proc.stderr == ""
    return proc.returncode, json.loads(proc.stdout)


def test_audit_of_a_store_after_real_workers_then_of_a_broken_history(
        env_factory: Callable[..., Env], db_url: str) -> None:
    env = env_factory(db_url, SPOTRUN_CHECKPOINT_EVERY_STEPS="5", SPOTRUN_LEASE_SECONDS="5",
                      SPOTRUN_HEARTBEAT_SECONDS="0.5")
    w1 = env.worker("w1")
    w1.wait_ready()
    # Long enough that the notice comes well before its end on a loaded machine: progress
    # is seen here a heartbeat late, and a job that ends first is not preempted at all.
    long = env.cli("submit", "sleep", "-p", "seconds=8", "-p", "steps=80").stdout.strip()
    short = env.cli("submit", "sleep", "-p", "seconds=0.2").stdout.strip()
    store = env.store()
    try:
        wait_until(lambda: store.get(long).progress.step >= 8, 30, "progress on w1",
                   on_fail=w1.log)
        w1.signal(signal.SIGTERM)
        assert w1.wait(30) == 0
        w2 = env.worker("w2")
        wait_until(lambda: all(store.get(i).state is JobState.SUCCEEDED for i in (long, short)),
                   60, "both jobs done", on_fail=w2.log)
        assert [e.kind for e in store.events(long)].count("preempted") == 1

        code, found = _audit(env)
        assert code == 0 and found["ok"] is True, found
        assert found["jobs"] == 2
        names = [c["name"] for c in found["checks"]]
        assert names == ["every job's state agrees with its history", "no job completed twice",
                         "every result written by the attempt holding the lease",
                         "every claim a new attempt",
                         "every attempt resumed from the last checkpoint"]
        text = env.cli("audit", "--db", db_url).stdout
        assert "result: PASS, all 5 checks passed" in text

        # A second result of the short job, and the long one put back in the queue with
        # no event to say why: both promises broken, each finding names its job.
        w2.signal(signal.SIGTERM)  # no worker may claim it again
        assert w2.wait(30) == 0
        with store.engine.begin() as conn:
            last = conn.execute(sa.select(events).where(events.c.job_id == short)
                                .order_by(events.c.id.desc())).mappings().first()
            assert last is not None and last["kind"] == "succeeded"
            conn.execute(events.insert().values(
                job_id=short, at=time.time(), kind="succeeded", worker=last["worker"],
                attempt=last["attempt"], message="succeeded"))
            conn.execute(jobs.update().where(jobs.c.id == long).values(state="queued"))
    finally:
        store.close()
    code, found = _audit(env)
    assert code == 1 and found["ok"] is False
    failed = {c["name"]: c["detail"] for c in found["checks"] if not c["ok"]}
    assert set(failed) == {"no job completed twice",
                           "every job's state agrees with its history"}, failed
    assert short in failed["no job completed twice"]
    assert long in failed["every job's state agrees with its history"]
    proc = env.cli("audit", check=False)
    assert proc.returncode == 1 and "result: FAIL, 2 of 5 checks failed" in proc.stdout
    if db_url.startswith("sqlite"):
        nowhere = env.home / "nowhere.db"
        proc = env.cli("audit", "--db", f"sqlite:///{nowhere}", check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == \
            f"spotrun: no store at sqlite:///{nowhere}"
        assert not nowhere.exists()


def _job(*payloads: tuple[int, Any], state: JobState = JobState.QUEUED) -> Job:
    """A job whose history is these (attempt, payload) events, their words blanked: the
    audit must read the data alone."""
    t0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    evs = []
    for n, (attempt, p) in enumerate(((0, Submitted()), *payloads)):
        kind, _message, data = render(p)
        evs.append(Event(t0 + dt.timedelta(seconds=n), kind, getattr(p, "worker", None),
                         attempt, "", data=data))
    return Job(id="j", pipeline="sleep", params={}, state=state, priority=0,
               attempt=max(a for a, _ in payloads), preemptions=0, retries=0, max_retries=4,
               on_preempt=OnPreempt.RESUME, timeout=None, worker_id=None, worker=None,
               lease_expires_at=None, progress=Progress(), result=None, error=None,
               error_traceback=None, checkpoint=None, checkpoint_prev=None,
               requires_cuda=False, cancel_requested=False, run_seconds=0.0, owner=None,
               created_at=t0, updated_at=t0, events=tuple(evs))


def test_resumes_are_checked_against_the_checkpoints_the_data_records() -> None:
    kept = Preempted("w", 14, 30, resume=Resume(ResumeHow.KEPT, 10))
    ok = _job((1, Started("w")), (1, Checkpointed(10, 0.1)), (1, kept),
              (2, Resumed("v", 10, 30)), (2, Checkpointed(20, 0.1)),
              (2, LeaseExpired("v", 23, 30)), (3, Resumed("u", 20, 30)),
              (3, Preempted("u", 21, 30, OnPreempt.RESTART)), (4, Started("t", 4)),
              state=JobState.RUNNING)
    assert check_resumes({"a": ok}).ok
    assert check_attempts({"a": ok}).ok
    assert check_states({"a": ok}).ok
    assert "a is queued, its history ends with started" in check_states(
        {"a": dataclasses.replace(ok, state=JobState.QUEUED)}).detail
    # From before the checkpoint its stop kept; from before the last one, after an expiry.
    early = _job((1, Started("w")), (1, Checkpointed(10, 0.1)), (1, kept),
                 (2, Resumed("v", 5, 30)))
    found = check_resumes({"early": early})
    assert not found.ok and "early attempt 2 started at step 5, the last stop said 10" in \
        found.detail
    lost = _job((1, Started("w")), (1, Checkpointed(10, 0.1)), (1, LeaseExpired("w", 12)),
                (2, Started("v", 2)))
    found = check_resumes({"lost": lost})
    assert not found.ok and "before its checkpoint at step 10" in found.detail
    # A checkpoint found corrupt on load: starting over is what its event said.
    corrupt = _job((1, Started("w")), (1, Checkpointed(10, 0.1)), (1, LeaseExpired("w", 12)),
                   (2, Resumed("v", 10)), (2, CheckpointUnusable(10, "bad sha256")),
                   (2, LeaseExpired("v", 3)), (3, Started("u", 3)))
    assert check_resumes({"c": corrupt}).ok
    skipped = _job((1, Started("w")), (1, LeaseExpired("w", 1)), (3, Started("v", 3)))
    found = check_attempts({"s": skipped})
    assert not found.ok and "s: claims of attempts [1, 3]" in found.detail
