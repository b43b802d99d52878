"""Cost accounting: a realistic history built with the store's real methods (both
databases), then the figures must add up; and the same with real worker processes."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Env, wait_until
from spotrun import cost
from spotrun.config import ConfigError
from spotrun.events import Checkpointed, Preempted, Resume, ResumeHow
from spotrun.jobs import JobState
from spotrun.store import JobStore, Lease

PRICES = cost.Prices(by_pool={"spot": 0.10, "on-demand": 1.00}, on_demand=1.00, source="test")


def _run(store: JobStore, worker_id: str, name: str) -> Lease:
    claimed = store.claim(worker_id=worker_id, worker_name=name, lease_seconds=30)
    assert claimed is not None
    return claimed[0]


def _history(store: JobStore) -> dict[str, str]:
    """Four jobs: preempted and resumed elsewhere; spot without preemption; on-demand;
    preempted with a notice checkpoint and still queued."""
    spot1 = store.register_worker(name="spot-1", host="h", pid=1, pool="spot", has_cuda=False,
                                  lease_seconds=30, price_per_hour=0.30)
    spot2 = store.register_worker(name="spot-2", host="h", pid=2, pool="spot", has_cuda=False,
                                  lease_seconds=30)  # no price: the table's spot price
    od = store.register_worker(name="od-1", host="h", pid=3, pool="on-demand", has_cuda=False,
                               lease_seconds=30)
    ids: dict[str, str] = {}

    ids["resumed"] = store.submit("sleep", {"seconds": 1}).id
    lease = _run(store, spot1, "spot-1")
    store.save_progress(lease, 10, 100, {})
    time.sleep(0.05)
    store.commit_checkpoint(lease, "ck/10", 10, event=Checkpointed(10, 0.010))
    time.sleep(0.15)
    store.save_progress(lease, 40, 100, {})
    store.hand_back(lease, Preempted("spot-1", 40, 100, resume=Resume(ResumeHow.KEPT, 10)))
    lease = _run(store, spot2, "spot-2")
    time.sleep(0.1)
    store.save_progress(lease, 100, 100, {})
    store.complete(lease, {"ok": True})

    ids["plain"] = store.submit("sleep", {"seconds": 1}).id
    lease = _run(store, spot2, "spot-2")
    time.sleep(0.1)
    store.complete(lease, {"ok": True})

    ids["on_demand"] = store.submit("sleep", {"seconds": 1}).id
    lease = _run(store, od, "od-1")
    time.sleep(0.1)
    store.complete(lease, {"ok": True})

    ids["queued"] = store.submit("sleep", {"seconds": 1}).id
    lease = _run(store, spot2, "spot-2")
    time.sleep(0.05)
    store.save_progress(lease, 50, 100, {})
    store.commit_checkpoint(lease, "ck/50", 50)  # a notice checkpoint writes no event
    store.hand_back(lease, Preempted("spot-2", 50, 100,
                                     resume=Resume(ResumeHow.SAVED, 50, 0.012)))
    return ids


def test_figures_add_up(store: JobStore) -> None:
    ids = _history(store)
    report = cost.summarize(store, prices=PRICES)
    by_id = {j.job_id: j for j in report.jobs}
    assert set(by_id) == set(ids.values())

    # Totals are the sums of the per-job figures.
    assert report.cost == pytest.approx(sum(j.cost for j in report.jobs))
    assert report.paid_seconds == pytest.approx(sum(j.paid_seconds for j in report.jobs))
    assert sum(report.cost_by_pool.values()) == pytest.approx(report.cost)
    assert sum(report.paid_seconds_by_pool.values()) == pytest.approx(report.paid_seconds)
    assert report.saving == pytest.approx(report.on_demand_cost - report.cost)
    assert report.useful_seconds == pytest.approx(report.paid_seconds - report.redone_seconds)
    assert report.saving_percent == pytest.approx(100 * report.saving / report.on_demand_cost)
    assert report.preemptions == 2

    # Preempted at step 40 with the last checkpoint at 10: 30 steps were done again.
    resumed = by_id[ids["resumed"]]
    first, second = resumed.attempts
    assert (first.pool, first.price_per_hour, first.end) == ("spot", 0.30, "preempted")
    assert (second.pool, second.price_per_hour, second.start_step) == ("spot", 0.10, 10)
    assert 0 < first.redone_seconds < first.paid_seconds
    # It resumed from a checkpoint this attempt wrote: what came after it was done again,
    # by the clock (since the checkpoint) or by the steps (30 of 40 at the attempt's pace).
    (ck,) = [e for e in store.events(ids["resumed"]) if e.kind == "checkpoint"]
    by_clock = (first.ended_at - ck.at).total_seconds()
    by_steps = (first.paid_seconds - first.checkpoint_seconds) * 30 / 40
    assert first.redone_seconds == pytest.approx(max(by_clock, by_steps))
    assert first.redone_seconds >= 0.14
    assert first.checkpoint_seconds == pytest.approx(0.010)
    assert resumed.cost == pytest.approx(
        first.paid_seconds * 0.30 / 3600 + second.paid_seconds * 0.10 / 3600)
    assert resumed.on_demand_cost == pytest.approx(
        (resumed.paid_seconds - resumed.redone_seconds) * 1.00 / 3600)

    # No preemption on spot: paid seconds at the spot price, nothing redone.
    plain = by_id[ids["plain"]]
    assert plain.redone_seconds == 0
    assert plain.paid_seconds >= 0.09
    assert plain.cost == pytest.approx(plain.paid_seconds * 0.10 / 3600)
    assert plain.saving == pytest.approx(plain.paid_seconds * (1.00 - 0.10) / 3600)

    # On-demand costs what it costs: no saving.
    on_demand = by_id[ids["on_demand"]]
    assert on_demand.paid_seconds_by_pool.keys() == {"on-demand"}
    assert on_demand.saving == pytest.approx(0.0)

    # A notice checkpoint at the step of the preemption loses nothing.
    queued = by_id[ids["queued"]]
    assert queued.state == JobState.QUEUED.value
    assert queued.redone_seconds == 0
    assert queued.checkpoint_seconds == pytest.approx(0.012)

    # The JSON shape carries the same numbers.
    data = json.loads(json.dumps(report.to_json()))
    assert data["totals"]["cost"] == pytest.approx(sum(j["cost"] for j in data["jobs"]))
    assert data["totals"]["saving"] == pytest.approx(
        data["totals"]["on_demand_cost"] - data["totals"]["cost"])
    text = report.to_text(per_job=True)
    assert ids["resumed"] in text and "saving" in text


def test_redone_from_steps_and_lease_expiry(store: JobStore) -> None:
    """Work lost past an older checkpoint is estimated from steps; a worker that died
    stops costing money at its last heartbeat, not when its lease runs out."""
    a = store.register_worker(name="a", host="h", pid=1, pool="spot", has_cuda=False,
                              lease_seconds=0.4)
    b = store.register_worker(name="b", host="h", pid=2, pool="spot", has_cuda=False,
                              lease_seconds=30)
    job_id = store.submit("sleep", {}).id
    lease = _run(store, a, "a")
    store.save_progress(lease, 50, 100, {})
    store.commit_checkpoint(lease, "ck/50", 50)  # a notice checkpoint writes no event
    store.hand_back(lease, Preempted("a", 50, 100, resume=Resume(ResumeHow.SAVED, 50, 0.010)))
    claimed = store.claim(worker_id=b, worker_name="b", lease_seconds=0.4)
    assert claimed is not None
    lease = claimed[0]
    time.sleep(0.1)
    store.save_progress(lease, 80, 100, {})
    store.hand_back(lease, Preempted("b", 80, 100, resume=Resume(ResumeHow.KEPT, 50)))
    claimed = store.claim(worker_id=a, worker_name="a", lease_seconds=0.4)
    assert claimed is not None
    lease = claimed[0]
    store.commit_checkpoint(lease, "ck/60", 60, event=Checkpointed(60, 0.001))
    store.heartbeat(a, [lease], 0.4)  # the last sign of life of worker a
    time.sleep(0.6)
    assert store.sweep_expired() == [job_id]

    report = cost.summarize(store, prices=PRICES)
    (job,) = report.jobs
    notice, steps, expired = job.attempts
    assert notice.redone_seconds == 0
    # 30 of the 30 steps of the second attempt were lost: all of its time.
    assert steps.start_step == 50 and steps.end_step == 80
    assert steps.redone_seconds == pytest.approx(steps.paid_seconds - steps.checkpoint_seconds)
    (event,) = [e for e in store.events(job_id) if e.kind == "lease_expired"]
    (row,) = [w for w in store.list_workers() if w.id == a]
    assert expired.end == "lease_expired"
    assert expired.ended_at == row.last_heartbeat < event.at
    assert report.useful_seconds == pytest.approx(report.paid_seconds - report.redone_seconds)


def test_running_job_costs_up_to_now(store: JobStore) -> None:
    w = store.register_worker(name="w", host="h", pid=1, pool="spot", has_cuda=False,
                              lease_seconds=30)
    store.submit("sleep", {})
    _run(store, w, "w")
    time.sleep(0.05)
    (job,) = cost.summarize(store, prices=PRICES).jobs
    assert job.attempts[0].end == "running"
    assert job.paid_seconds >= 0.04 and job.redone_seconds == 0


def test_unpriced_pool_and_unknown_worker_count_at_on_demand(store: JobStore) -> None:
    w = store.register_worker(name="gpu-a", host="h", pid=1, pool="a100-spot", has_cuda=False,
                              lease_seconds=30)
    store.submit("sleep", {})
    lease = _run(store, w, "gpu-a")
    store.complete(lease, {})
    store.submit("sleep", {})
    lease = _run(store, "nobody", "ghost")  # a worker that never registered
    store.complete(lease, {})
    report = cost.summarize(store, prices=PRICES)
    assert all(j.saving == pytest.approx(0.0) for j in report.jobs)
    assert any("a100-spot" in w for w in report.warnings)
    assert any("ghost" in w for w in report.warnings)


def test_since(store: JobStore) -> None:
    store.submit("sleep", {})
    assert len(cost.summarize(store, "1h", prices=PRICES).jobs) == 1
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert cost.summarize(store, future, prices=PRICES).jobs == ()


def test_parse_since() -> None:
    now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
    assert cost.parse_since("24h", now) == now - dt.timedelta(days=1)
    assert cost.parse_since("30m", now) == now - dt.timedelta(minutes=30)
    assert cost.parse_since("2026-11-01T00:00Z", now) == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert cost.parse_since("2026-11-01", now).tzinfo is not None
    with pytest.raises(ValueError, match="--since"):
        cost.parse_since("yesterday", now)


def test_prices_from_env() -> None:
    p = cost.Prices.from_env({})
    assert p.by_pool == cost.DEFAULT_PRICES and p.on_demand == cost.DEFAULT_PRICES["on-demand"]
    p = cost.Prices.from_env({"SPOTRUN_PRICES": "spot=0.35, on-demand=1.20, a100=1.1"})
    assert p.by_pool["a100"] == 1.1 and p.on_demand == 1.20 and p.source == "SPOTRUN_PRICES"
    p = cost.Prices.from_env({"SPOTRUN_PRICES": "spot=0.35", "SPOTRUN_ON_DEMAND_PRICE": "2"})
    assert p.on_demand == 2.0
    for bad in ("spot", "spot=cheap", "spot=-1", "=1", ","):
        with pytest.raises(ConfigError):
            cost.Prices.from_env({"SPOTRUN_PRICES": bad})


def test_cli_bad_input(env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    proc = env.cli("cost", "--since", "yesterday", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--since" in proc.stderr
    env = env_factory(sqlite_url, SPOTRUN_PRICES="spot=free")
    proc = env.cli("cost", check=False)
    assert proc.returncode == 2 and "SPOTRUN_PRICES" in proc.stderr


def test_real_workers_preempted_and_resumed(env_factory: Callable[..., Env],
                                            db_url: str) -> None:
    """Two real worker processes on priced pools; SIGTERM the first mid-job; the second
    resumes it; ``spotrun cost --json`` accounts for both and its figures add up."""
    env = env_factory(db_url, SPOTRUN_PRICES="spot=0.30,on-demand=1.50",
                      SPOTRUN_CHECKPOINT_EVERY_STEPS="5", SPOTRUN_LEASE_SECONDS="5",
                      SPOTRUN_HEARTBEAT_SECONDS="0.5")
    w1 = env.worker("w1", "--pool", "spot")
    w1.wait_ready()
    job_id = env.cli("submit", "sleep", "-p", "seconds=4", "-p", "steps=40").stdout.strip()
    store = env.store()
    try:
        wait_until(lambda: store.get(job_id).progress.step >= 10, 30, "progress on w1",
                   on_fail=w1.log)
        w1.signal(signal.SIGTERM)
        assert w1.wait(30) == 0
        w2 = env.worker("w2", "--pool", "on-demand")
        wait_until(lambda: store.get(job_id).state is JobState.SUCCEEDED, 60, "job done",
                   on_fail=w2.log)
    finally:
        store.close()
    data: dict[str, Any] = json.loads(env.cli("cost", "--json").stdout)
    totals = data["totals"]
    (job,) = data["jobs"]
    assert job["preemptions"] == 1
    assert [a["pool"] for a in job["attempts"]] == ["spot", "on-demand"]
    assert [a["price_per_hour"] for a in job["attempts"]] == [0.30, 1.50]
    assert job["attempts"][1]["start_step"] >= 10  # resumed, not restarted
    assert totals["cost"] == pytest.approx(job["cost"])
    assert totals["cost"] == pytest.approx(sum(a["cost"] for a in job["attempts"]))
    assert totals["saving"] == pytest.approx(totals["on_demand_cost"] - totals["cost"])
    spot = job["attempts"][0]
    assert spot["cost"] == pytest.approx(spot["paid_seconds"] * 0.30 / 3600)
    assert 0 <= job["redone_seconds"] < job["paid_seconds"]
    # Part of the work ran at a fifth of the on-demand price, so spot saved money.
    assert totals["saving"] > 0
    text = env.cli("cost").stdout
    assert "saving" in text and "spot" in text
