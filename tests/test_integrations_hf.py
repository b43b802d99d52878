"""spotrun.integrations.hf: a small BERT trained by a stock ``Trainer.train``
(examples/hf_trainer), run by real workers and preempted by real SIGTERMs."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Env
from example_packages import install_example
from framework_runs import preempt_three_times, reference_result
from spotrun.jobs import JobState

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="the hf extra is not installed"),
]

PARAMS = {"epochs": 2, "samples": 96, "batch_size": 8, "seed": 3}
PER_EPOCH, TOTAL = 12, 24


def test_a_trainer_preempted_three_times_ends_with_the_uninterrupted_weights(
        env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = env_factory(sqlite_url, TMPDIR=str(tmp),
                      PYTHONPATH=install_example("hf_trainer", tmp_path / "site"))
    listed = json.loads(env.cli("pipelines", "--json").stdout)
    assert "hf-trainer" in [p["name"] for p in listed]

    run = preempt_three_times(env, "hf-trainer", PARAMS, total=TOTAL, step_delay=0.5)
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

    reference = reference_result(env, "hf-trainer", PARAMS)
    assert job.result["steps"] == reference["steps"] == TOTAL
    assert job.result["weights_sha256"] == reference["weights_sha256"], (run.seed, run.handed)
