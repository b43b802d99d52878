"""spotrun.integrations.lightning: a LightningModule trained by a stock ``Trainer.fit``
(examples/lightning_module), run by real workers and preempted by real SIGTERMs."""

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
    pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                       reason="the lightning extra is not installed"),
]

PARAMS = {"epochs": 3, "samples": 240, "batch_size": 8, "seed": 5}
PER_EPOCH, TOTAL = 30, 90


def test_a_lightning_fit_preempted_three_times_ends_with_the_uninterrupted_weights(
        env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    env = env_factory(sqlite_url, PYTHONPATH=install_example("lightning_module",
                                                             tmp_path / "site"))
    listed = json.loads(env.cli("pipelines", "--json").stdout)
    assert "lightning-module" in [p["name"] for p in listed]

    run = preempt_three_times(env, "lightning-module", PARAMS, total=TOTAL, step_delay=0.08)
    job, messages = run.job, run.messages()
    assert job is not None and job.state is JobState.SUCCEEDED, messages
    assert job.preemptions == 3 and job.retries == 0
    # Every hand-off was in the middle of an epoch, and each attempt resumed exactly there.
    assert all(step % PER_EPOCH > 0 for step in run.handed), (run.seed, run.handed)
    resumed = [int(m.split("from step ")[1].split("/")[0]) for m in messages
               if m.startswith("resumed on")]
    assert resumed == run.handed, messages
    assert not [m for m in messages if "not bit-identical" in m], messages
    # Progress carried what the LightningModule logged.
    assert all("train_loss" in m and "epoch" in m for m in run.metrics), run.metrics
    # The checkpoint is Lightning's own state, as safetensors + JSON: no pickle.
    for files in run.files:
        assert {"lightning.safetensors", "lightning.json"} <= files, files
        assert not [f for f in files if f.endswith((".ckpt", ".pt", ".pth", ".pkl"))], files

    reference = reference_result(env, "lightning-module", PARAMS)
    assert job.result["steps"] == reference["steps"] == TOTAL
    assert job.result["weights_sha256"] == reference["weights_sha256"], (run.seed, run.handed)
