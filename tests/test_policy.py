"""Escalation and checkpoint-interval decisions."""

from __future__ import annotations

import math
import time

from spotrun.events import Escalated, EscalationWhy, Preempted
from spotrun.jobs import JobState
from spotrun.policy import checkpoint_interval, escalation_reason
from spotrun.store import JobStore


def _reason(**kw: object) -> str | None:
    args: dict[str, object] = dict(preemptions=1, max_preemptions=5, deadline=None,
                                   now=1000.0, created=0.0, step=500, total=1000, pool=None)
    args.update(kw)
    return escalation_reason(**args)  # type: ignore[arg-type]


def test_preemption_limit() -> None:
    assert _reason(preemptions=5) is None
    assert "preempted 6 times, more than its limit of 5" in str(_reason(preemptions=6))
    assert _reason(preemptions=60, pool="on-demand") is None


def test_deadline_uniform_progress() -> None:
    # 500 steps in 1000 s: 0.5 steps/s; 500 steps left need 1000 s.
    assert _reason(deadline=1000.0 + 2000) is None
    why = _reason(deadline=1000.0 + 900)
    assert why is not None and "need 1000 s, but only 900 s are left" in why
    assert "deadline has passed" in str(_reason(deadline=999.0))


def test_young_daly_interval_and_its_explanation() -> None:
    chosen = checkpoint_interval(checkpoint_seconds=2.0, lived_seconds=7200.0,
                                 interruptions=2, lo=10, hi=600)
    assert math.isclose(chosen.seconds, math.sqrt(2 * 2.0 * (7200 + 3600) / 3))
    assert "Young/Daly" in chosen.explanation and "2 lost without notice" in chosen.explanation
    assert chosen.summary.startswith(f"checkpoints every {chosen.seconds:.0f} s, chosen from")
    assert "sqrt" not in chosen.summary
    capped = checkpoint_interval(checkpoint_seconds=None, lived_seconds=0, interruptions=0,
                                 lo=10, hi=60)
    assert capped.seconds == 60 and "prior" in capped.explanation


def test_escalated_jobs_are_claimed_only_by_on_demand_workers(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    spot = store.register_worker(name="s", host="h", pid=1, pool="spot", has_cuda=False,
                                 lease_seconds=10)
    od = store.register_worker(name="o", host="h", pid=2, pool="on-demand", has_cuda=False,
                               lease_seconds=10)
    got = store.claim(worker_id=spot, worker_name="s", lease_seconds=10, pool="spot")
    assert got is not None
    store.hand_back(got[0], Preempted("s", 0),
                   escalation=Escalated(EscalationWhy.DEADLINE_PASSED))
    assert store.claim(worker_id=spot, worker_name="s", lease_seconds=10, pool="spot") is None
    got = store.claim(worker_id=od, worker_name="o", lease_seconds=10, pool="on-demand")
    assert got is not None and got[1].id == job.id
    events = store.get(job.id).events
    # No checkpoint was saved, so the on-demand attempt starts from the beginning.
    assert [e.kind for e in events][-3:] == ["preempted", "escalated", "started"]
    assert store.get(job.id).state is JobState.RUNNING


def test_pool_interruptions_count_only_losses_without_notice(store: JobStore) -> None:

    job = store.submit("sleep", {"seconds": 0})
    wid = store.register_worker(name="s", host="h", pid=1, pool="spot", has_cuda=False,
                                lease_seconds=10)
    got = store.claim(worker_id=wid, worker_name="s", lease_seconds=10, pool="spot")
    assert got is not None
    store.hand_back(got[0], Preempted("s", 0))
    assert store.analytics.pool_interruptions("spot")[1] == 0
    store.claim(worker_id=wid, worker_name="s", lease_seconds=10, pool="spot")
    store.expire_lease_now(job.id)
    store.sweep_expired()
    time.sleep(0.05)
    store.heartbeat(wid, [], 10)
    lived, hits = store.analytics.pool_interruptions("spot")
    assert hits == 1 and lived > 0
    assert store.analytics.pool_interruptions("on-demand") == (0.0, 0)
