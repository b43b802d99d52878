"""spotrun.integrations.hf: a small BERT trained by a stock ``Trainer.train``
(examples/hf_trainer), run by real workers and preempted by real SIGTERMs."""

from __future__ import annotations

import importlib.util
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Env, wait_until
from example_packages import install_example
from framework_runs import Reference, preempt_three_times
from spotrun.jobs import JobState

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="the hf extra is not installed"),
]

PIPELINE = "hf-trainer"
PARAMS = {"epochs": 2, "samples": 96, "batch_size": 8, "seed": 3}
PER_EPOCH, TOTAL = 12, 24


def test_a_trainer_preempted_three_times_ends_with_the_uninterrupted_weights(
        env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = env_factory(sqlite_url, TMPDIR=str(tmp),
                      PYTHONPATH=install_example("hf_trainer", tmp_path / "site"))
    listed = json.loads(env.cli("pipelines", "--json").stdout)
    assert PIPELINE in [p["name"] for p in listed]

    with Reference(env, PIPELINE, PARAMS) as reference:
        run = preempt_three_times(env, PIPELINE, PARAMS, total=TOTAL, step_delay=0.5,
                                  after_first=reference.start)
        result = reference.result()
    job, messages = run.job, run.messages()
    assert job is not None and job.state is JobState.SUCCEEDED, messages
    assert job.preemptions == 3 and job.retries == 0
    assert any(step % PER_EPOCH for step in run.handed), (run.seed, run.handed)
    resumed = [int(m.split("from step ")[1].split("/")[0]) for m in messages
               if m.startswith("resumed on")]
    assert resumed == run.handed, messages
    assert not [m for m in messages if "not bit-identical" in m], messages
    # Progress carried the epoch, and the Trainer's logged loss once it logged one.
    assert all("epoch" in m for m in run.metrics), run.metrics
    assert "loss" in job.progress.metrics, job.progress.metrics
    # Checkpoints are safetensors + JSON; the Trainer was given nothing to unpickle, and
    # the directory it resumed from is gone.
    for files in run.files:
        assert {"tensors.safetensors", "state.json", "trainer_state.json"} <= files, files
        assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl"))], files
    assert not list(tmp.glob("spotrun-hf-*")), list(tmp.iterdir())

    assert job.result["steps"] == result["steps"] == TOTAL
    assert job.result["weights_sha256"] == result["weights_sha256"], (run.seed, run.handed)


def test_a_trainer_claimed_while_its_worker_preloads_the_ml_stack_runs(
        env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    # The worker claims the job while its preload still imports transformers, at a random
    # moment of it: the Trainer's imports must not run beside that one (two threads
    # resolving transformers' lazy names at once can see a half-made module).
    env = env_factory(sqlite_url, PYTHONPATH=install_example("hf_trainer", tmp_path / "site"))
    w = env.worker("w1", preload=True)
    w.wait_ready()
    time.sleep(random.uniform(0, 2.5))
    job_id = env.cli("submit", PIPELINE, "-p", "epochs=1", "-p", "samples=16").stdout.strip()
    st = env.store()
    try:
        wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 240,
                   "the job to end", on_fail=w.log)
        job = st.get(job_id)
        assert job.state is JobState.SUCCEEDED, (job.error, w.log())
        assert job.result["steps"] == 2 and job.retries == 0
    finally:
        st.close()
