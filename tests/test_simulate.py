"""The fleet simulator against closed forms, with fixed seeds and enough samples."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Env
from spotrun import simulate as sim
from spotrun.simulate import FleetConfig, young_daly_interval

# An idealised fleet for closed forms: no notice, no lease, no restart or replacement
# delay, and far more workers than the load needs, so that nothing ever waits.
IDEAL = FleetConfig(workers=400, notice_seconds=0, lease_seconds=0, replace_seconds=0,
                    restart_seconds=0, spot_price=0.1, on_demand_price=1.0)


def run(cfg: FleetConfig, policy: str) -> sim.PolicyResult:
    (result,) = sim.simulate(cfg, [policy]).results
    return result


def test_young_daly_interval() -> None:
    assert young_daly_interval(2.0, 3600.0, 1.0, 1e6) == pytest.approx(math.sqrt(2 * 2 * 3600))
    assert young_daly_interval(2.0, 3600.0, 200.0, 1e6) == 200.0  # clamped up
    assert young_daly_interval(2.0, 3600.0, 1.0, 60.0) == 60.0  # clamped down
    assert young_daly_interval(2.0, math.inf, 1.0, 900.0) == 900.0  # never preempted
    with pytest.raises(ValueError):
        young_daly_interval(2.0, 3600.0, 10.0, 1.0)
    with pytest.raises(ValueError):
        young_daly_interval(2.0, 0.0, 1.0, 10.0)
    cfg = FleetConfig(checkpoint_seconds=2, preemption_rate=0.05, notice_miss=0.1)
    assert cfg.interval(uses_notice=False) == pytest.approx(math.sqrt(2 * 2 * 3600 / 0.05))
    # With the notice used, periodic checkpoints only cover the unannounced preemptions.
    assert cfg.interval(uses_notice=True) == pytest.approx(math.sqrt(2 * 2 * 36000 / 0.05))
    assert FleetConfig(notice_miss=0).interval(uses_notice=True) == 86_400


@pytest.mark.parametrize("policy", sim.POLICIES)
def test_no_preemptions(policy: str) -> None:
    """Latency is the job's length, goodput 1, cost the busy time at each pool's price."""
    cfg = FleetConfig(workers=60, spot_fraction=0.5, arrival_rate=60, hours=5,
                      preemption_rate=0, spot_price=0.1, on_demand_price=1.0)
    r = run(cfg, policy)
    assert r.jobs_done == r.jobs > 250
    for latency in (r.latency_p50, r.latency_p99, r.latency_mean):
        assert latency == pytest.approx(cfg.job_seconds)
    assert r.goodput == pytest.approx(1.0)
    assert r.preemptions == 0 and r.lost_work_per_preemption is None
    busy = r.busy_seconds_by_pool
    assert busy["spot"] + busy["on-demand"] == pytest.approx(r.jobs * cfg.job_seconds)
    assert r.cost_total == pytest.approx((busy["spot"] * 0.1 + busy["on-demand"] * 1.0) / 3600)
    assert r.cost_per_job * r.jobs_done == pytest.approx(r.cost_total)


def test_restart_from_scratch_closed_form() -> None:
    """A job of length L under Poisson(lam) preemptions, restarted at once from scratch,
    takes (e^(lam L) - 1) / lam on average; goodput is lam L / (e^(lam L) - 1)."""
    lam, length = 1.0 / 3600, 1800.0
    cfg = IDEAL.__class__(**{**IDEAL.__dict__, "job_minutes": 30, "preemption_rate": 1.0,
                             "arrival_rate": 150, "hours": 16, "seed": 1})
    r = run(cfg, sim.RESTART)
    expected = (math.exp(lam * length) - 1) / lam
    assert r.jobs_done > 2000
    assert r.latency_mean == pytest.approx(expected, rel=0.04)
    assert r.goodput == pytest.approx(lam * length / (math.exp(lam * length) - 1), rel=0.04)
    # Work lost per preemption: an attempt's age when the preemption hits it.
    lost = 1 / lam - length * math.exp(-lam * length) / (1 - math.exp(-lam * length))
    assert r.lost_work_per_preemption == pytest.approx(lost, rel=0.05)


def _expected_lost(lam: float, tau: float, c: float) -> float:
    """E[min(u, tau)] where u, the preemption's place in a work+checkpoint cycle of
    tau + c, has density lam e^(-lam u) / (1 - e^(-lam (tau + c))) (memoryless
    preemptions, attempts starting at a cycle boundary)."""
    cycle = tau + c
    norm = 1 - math.exp(-lam * cycle)
    # integral of u lam e^(-lam u) from 0 to tau, plus tau times P(u > tau)
    head = (1 - math.exp(-lam * tau) * (1 + lam * tau)) / lam
    tail = tau * (math.exp(-lam * tau) - math.exp(-lam * cycle))
    return (head + tail) / norm


def test_periodic_lost_work_per_preemption() -> None:
    """About half an interval (plus checkpoint terms) is lost per preemption."""
    tau, c, rate = 300.0, 5.0, 2.0
    cfg = IDEAL.__class__(**{**IDEAL.__dict__, "job_minutes": 120, "preemption_rate": rate,
                             "checkpoint_interval": tau, "checkpoint_seconds": c,
                             "arrival_rate": 40, "hours": 10, "seed": 2})
    r = run(cfg, sim.PERIODIC)
    assert r.preemptions > 1500
    assert r.lost_work_per_preemption == pytest.approx(_expected_lost(rate / 3600, tau, c),
                                                       rel=0.05)
    # The textbook approximation for rare preemptions: (tau^2 / 2 + c tau) / (tau + c).
    assert r.lost_work_per_preemption == pytest.approx((tau**2 / 2 + c * tau) / (tau + c),
                                                       rel=0.1)


def test_notice_checkpoint_saves_the_work() -> None:
    base = FleetConfig(workers=50, job_minutes=20, preemption_rate=3, arrival_rate=60,
                       hours=3, checkpoint_interval=300, notice_miss=0)
    fast = run(base, sim.NOTICE)
    assert fast.preemptions > 50 and fast.lost_work_per_preemption == 0
    slow = run(FleetConfig(**{**base.__dict__, "notice_checkpoint_seconds": 45}), sim.NOTICE)
    assert slow.lost_work_per_preemption is not None and slow.lost_work_per_preemption > 0


@pytest.mark.parametrize("policy", [sim.RESTART, sim.PERIODIC, sim.NOTICE])
def test_more_preemptions_less_goodput(policy: str) -> None:
    goodputs = [
        run(FleetConfig(workers=200, job_minutes=30, arrival_rate=200, hours=4,
                        preemption_rate=rate, seed=3), policy).goodput
        for rate in (0.0, 0.2, 1.0, 4.0)
    ]
    assert goodputs == sorted(goodputs, reverse=True) and len(set(goodputs)) == 4


def test_escalation_bounds_preemptions_per_job() -> None:
    cfg = FleetConfig(workers=100, job_minutes=20, preemption_rate=4, arrival_rate=150,
                      hours=3, max_preemptions=1, seed=4)
    plain, escalated = sim.simulate(cfg, [sim.NOTICE, sim.ESCALATE]).results
    assert escalated.escalations > 0
    assert escalated.max_preemptions_per_job <= cfg.max_preemptions + 1
    assert plain.max_preemptions_per_job > cfg.max_preemptions + 1
    # With no on-demand pool, escalated jobs run on on-demand VMs started for them.
    assert escalated.busy_seconds_by_pool["on-demand"] > 0
    assert plain.busy_seconds_by_pool["on-demand"] == 0


def test_escalation_uses_the_on_demand_pool() -> None:
    cfg = FleetConfig(workers=100, spot_fraction=0.8, job_minutes=20, preemption_rate=4,
                      arrival_rate=150, hours=3, max_preemptions=1, seed=4)
    r = run(cfg, sim.ESCALATE)
    assert r.escalations > 0 and r.max_preemptions_per_job <= 2
    assert r.jobs_done == r.jobs


def test_zone_wave() -> None:
    cfg = FleetConfig(workers=90, zones=3, arrival_rate=900, hours=2, preemption_rate=0,
                      wave_at=1.0, wave_fraction=1.0)
    r = run(cfg, sim.NOTICE)
    # At most the 30 VMs of zone 0, and most of them were busy at 86 % load.
    assert 15 <= r.preemptions <= 30
    assert r.latency_p99 > cfg.job_seconds
    quiet = run(FleetConfig(**{**cfg.__dict__, "wave_at": None}), sim.NOTICE)
    assert quiet.preemptions == 0 and quiet.latency_p99 < r.latency_p99


def test_same_seed_same_result() -> None:
    cfg = FleetConfig(workers=30, hours=2, preemption_rate=1, seed=9)
    assert sim.simulate(cfg).to_json() == sim.simulate(cfg).to_json()


def test_bad_config() -> None:
    for bad in ({"workers": 0}, {"workers": 10_001}, {"spot_fraction": 1.5},
                {"job_minutes": 0}, {"preemption_rate": -1}, {"arrival_rate": 0},
                {"checkpoint_interval": 0}, {"arrival_rate": 1e9}):
        with pytest.raises(ValueError, match=r"--|jobs would arrive"):
            FleetConfig(**bad).check()


def test_calibration_reads_a_chaos_report_defensively() -> None:
    report = {
        "jobs": 40, "lost": 0,
        "latency": {"notice_to_exit": {"p50": 0.8, "p95": 2.0},
                    "hand-back to resume (ms)": {"p50": 1500, "p99": 4000}},
        "checkpoint_seconds": {"p50": 0.3},
        "checkpoints": 12, "weird": [1, 2], "flag": True,
    }
    assert sim.calibration_from_report(report) == {
        "notice_checkpoint_seconds": 0.8, "restart_seconds": 1.5, "checkpoint_seconds": 0.3}
    assert sim.calibration_from_report({"notice_to_exit_p50_s": 1.25}) == {
        "notice_checkpoint_seconds": 1.25}
    # The shape `spotrun chaos --json` writes.
    chaos = {"notice_to_exit_seconds": {"count": 9, "p50": 0.41, "p99": 1.2, "max": 1.3},
             "handback_to_resume_seconds": {"count": 9, "p50": 2.5, "p99": 4.0, "max": 4.1},
             "lease_expiry_to_resume_seconds": {"count": 2, "p50": 11.0},
             "kill_to_requeue_seconds": {"count": 0, "p50": None}}
    assert sim.calibration_from_report(chaos) == {
        "notice_checkpoint_seconds": 0.41, "restart_seconds": 2.5}
    assert sim.calibration_from_report([1, 2, 3]) == {}
    assert sim.calibration_from_report({"notice_to_exit": {"p50": "fast"}}) == {}


def test_cli(env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    env = env_factory(sqlite_url, SPOTRUN_PRICES="spot=0.1,on-demand=1")
    out = json.loads(env.cli("simulate", "--workers", "20", "--hours", "1", "--json").stdout)
    assert [r["policy"] for r in out["results"]] == list(sim.POLICIES)
    assert out["config"]["spot_price"] == 0.1 and out["config"]["on_demand_price"] == 1.0
    text = env.cli("simulate", "--workers", "20", "--hours", "1", "--policy",
                   sim.PERIODIC).stdout
    assert sim.PERIODIC in text and sim.RESTART not in text

    chaos = tmp_path / "chaos.json"
    chaos.write_text(json.dumps({"notice_to_exit": {"p50": 0.5},
                                 "hand_back_to_resume": {"p50": 3.0}}))
    out = json.loads(env.cli("simulate", "--workers", "10", "--hours", "1", "--calibrate",
                             str(chaos), "--restart-seconds", "7", "--json").stdout)
    assert out["calibration"] == {"notice_checkpoint_seconds": 0.5, "restart_seconds": 3.0}
    assert out["config"]["notice_checkpoint_seconds"] == 0.5
    assert out["config"]["restart_seconds"] == 7  # an explicit option wins

    proc = env.cli("simulate", "--workers", "0", check=False)
    assert proc.returncode == 2 and proc.stderr == "spotrun: --workers 0: must be 1 to 10000\n"


def test_main_bad_input(tmp_path: Path) -> None:
    """Each bad input: exit 2 and one line naming it."""
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "bad.json").write_text("{not json")
    for options, words in (({"spot_fraction": 2.0}, "--spot-fraction"),
                           ({"hours": 0.0}, "--hours"),
                           ({"policies": ["yolo"]}, "unknown policy"),
                           ({"calibrate": str(tmp_path / "missing.json")}, "--calibrate"),
                           ({"calibrate": str(tmp_path)}, "--calibrate"),
                           ({"calibrate": str(tmp_path / "bad.json")}, "not JSON"),
                           ({"calibrate": str(tmp_path / "empty.json")}, "none of the keys")):
        lines: list[tuple[str, bool]] = []
        code = sim.main(echo=lambda text, err=False, out=lines: out.append((text, err)),
                        **options)
        assert code == 2, options
        ((text, err),) = lines
        assert err and "\n" not in text and words in text, text
