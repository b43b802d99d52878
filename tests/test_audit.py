"""``spotrun audit`` on a real store after real workers ran its jobs (one preempted by a
real SIGTERM and resumed elsewhere): every check passes; a history that breaks a promise
(a second result, a job whose state its history does not explain) fails it, naming the
job."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from conftest import Env, wait_until
from spotrun.jobs import JobState
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
    long = env.cli("submit", "sleep", "-p", "seconds=3", "-p", "steps=30").stdout.strip()
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
