"""examples/plain_loop: a plain PyTorch loop on the state helpers, installed as a user would
install it, run by real workers on both databases and preempted by real signals."""

from __future__ import annotations

import functools
import json
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, wait_until
from example_packages import EXAMPLES, install_example
from spotrun.jobs import JobState
from spotrun.store import JobStore

pytestmark = pytest.mark.slow

PARAMS = {"epochs": 4, "samples": 240, "batch_size": 8, "accumulate": 3, "seed": 7}
PER_EPOCH, TOTAL = 30, 120


def _reference_sha() -> str:
    """The final weights of an uninterrupted run, in this process."""
    sys.path.insert(0, str(EXAMPLES / "plain_loop"))
    try:
        import plain_loop

        from spotrun.local import run_inline

        return str(run_inline(plain_loop.PIPELINE, PARAMS)["weights_sha256"])
    finally:
        sys.path.remove(str(EXAMPLES / "plain_loop"))


def _running_past(st: JobStore, job_id: str, step: int) -> str | None:
    """The worker running the job once it is past ``step``."""
    job = st.get(job_id, with_events=False)
    # A job that ended (failed, or done before the notice) will never get there: say so now.
    assert not job.state.is_final, (job.state, job.error, [e.message for e in
                                                           st.get(job_id).events])
    if job.state is JobState.RUNNING and job.worker and job.progress.step >= step:
        return job.worker
    return None


def _position(env: Env, st: JobStore, job_id: str) -> dict[str, Any]:
    job = st.get(job_id)
    checkpoint = job.checkpoint
    assert checkpoint is not None, [e.message for e in job.events]
    doc = json.loads((env.home / "checkpoints" / checkpoint / "state.json").read_text())
    return {**doc["position"], "step": doc["counters"]["step"]}


def test_preempted_at_random_steps_it_ends_with_the_uninterrupted_weights(
        env_factory: Callable[..., Env], db_url: str, tmp_path: Path) -> None:
    env = env_factory(db_url, PYTHONPATH=install_example("plain_loop", tmp_path / "site"))
    st = env.store()
    # Slow enough that progress, which reaches the store up to a heartbeat late, is seen
    # well before the job ends, however many notices it takes.
    args = ["submit", "plain-loop", "-p", "step_delay=0.12"]
    for k, v in PARAMS.items():
        args += ["-p", f"{k}={v}"]
    job_id = env.cli(*args).stdout.strip()
    live = {name: env.worker(name, preload=True) for name in ("w1", "w2")}
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    positions: list[dict[str, Any]] = []

    def mid(kind: str) -> bool:
        if kind == "epoch":
            return any(0 < p["batch"] < PER_EPOCH for p in positions)
        return any(p["micro"] > 0 for p in positions)

    # At least three notices at random steps, more until one landed mid-epoch and one in
    # the middle of a gradient accumulation (two steps in three do).
    while len(positions) < 3 or not (mid("epoch") and mid("accumulation")):
        assert len(positions) < 8, f"seed {seed}: {positions}"
        if positions:  # a spare for the next hand-back (none idles after the last)
            replacement = f"w{len(positions) + 2}"
            live[replacement] = env.worker(replacement, preload=True)
        target = (positions[-1]["step"] if positions else 0) + rng.randint(3, 9)

        name = wait_until(functools.partial(_running_past, st, job_id, target), 90,
                          f"job past step {target} (seed {seed})")
        w = live.pop(name)
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0, w.log()
        # The checkpoint the job was handed back with (the next worker may hold it already).
        positions.append(_position(env, st, job_id))
        assert positions[-1]["batch"] == positions[-1]["step"] % PER_EPOCH or \
            positions[-1]["batch"] == PER_EPOCH, positions
        assert positions[-1]["micro"] == positions[-1]["step"] % PARAMS["accumulate"]

    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 180, "the job to end")
    job = st.get(job_id)
    messages = [e.message for e in job.events]
    assert job.state is JobState.SUCCEEDED, messages
    assert job.preemptions == len(positions) and job.retries == 0
    handed = [int(m.split("at step ")[1].split("/")[0]) for m in messages
              if m.startswith("preempted on")]
    assert handed == [p["step"] for p in positions], (seed, messages)
    assert not [m for m in messages if "not bit-identical" in m], messages
    assert job.result["steps"] == TOTAL
    assert job.result["weights_sha256"] == _reference_sha(), (seed, positions)
    st.close()


def test_installed_it_is_listed_without_importing_torch(
        env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    env = env_factory(sqlite_url, PYTHONPATH=install_example("plain_loop", tmp_path / "site"))
    listed = json.loads(env.cli("pipelines", "--json").stdout)
    assert "plain-loop" in [p["name"] for p in listed]
    code = ("import sys\nfrom spotrun.pipelines.registry import registry\n"
            "assert 'plain-loop' in registry()\n"
            "print([m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env.vars, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    bad = env.cli("submit", "plain-loop", "-p", "accumulate=0", check=False)
    assert bad.returncode == 2 and "param 'accumulate'" in bad.stderr
