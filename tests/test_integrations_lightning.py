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
from framework_runs import Reference, preempt_three_times
from spotrun.jobs import JobState

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                       reason="the lightning extra is not installed"),
]

PIPELINE = "lightning-module"
PARAMS = {"epochs": 3, "samples": 160, "batch_size": 8, "seed": 5}
PER_EPOCH, TOTAL = 20, 60


def test_a_lightning_fit_preempted_three_times_ends_with_the_uninterrupted_weights(
        env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    env = env_factory(sqlite_url, PYTHONPATH=install_example("lightning_module",
                                                             tmp_path / "site"))
    listed = json.loads(env.cli("pipelines", "--json").stdout)
    assert PIPELINE in [p["name"] for p in listed]

    with Reference(env, PIPELINE, PARAMS) as reference:
        run = preempt_three_times(env, PIPELINE, PARAMS, total=TOTAL, step_delay=0.08,
                                  after_first=reference.start)
        result = reference.result()
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

    assert job.result["steps"] == result["steps"] == TOTAL
    assert job.result["weights_sha256"] == result["weights_sha256"], (run.seed, run.handed)


def test_the_resumable_loader_starts_a_resumed_epoch_at_its_next_batch() -> None:
    import torch
    from torch.utils.data import TensorDataset

    from spotrun.integrations.lightning import data_loader

    data = TensorDataset(torch.arange(20))

    def loader() -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
        return data_loader(data, seed=9, batch_size=3)

    first = loader()
    first.sampler.set_epoch(1)  # as Lightning does before each epoch
    whole = [b[0].tolist() for b in first]
    assert len(whole) == len(first) == 7 and sorted(i for b in whole for i in b) == list(range(20))
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 3}

    resumed = loader()
    resumed.load_state_dict(state)
    # Lightning sets the epoch again after loading the state: the start batch stays.
    resumed.sampler.set_epoch(1)
    assert len(resumed) == 7  # Lightning counts the batches already consumed itself
    assert [b[0].tolist() for b in resumed] == whole[3:]
    assert resumed.state_dict() == {"epoch": 1, "batch": 7}
    # The next epoch starts at its beginning, in its own order.
    resumed.sampler.set_epoch(2)
    following = [b[0].tolist() for b in resumed]
    assert len(following) == 7 and following != whole

    # A position at the end of an epoch resumes at the start of the next one.
    ended = loader()
    ended.load_state_dict({"epoch": 1, "batch": 7})
    ended.sampler.set_epoch(2)
    assert [b[0].tolist() for b in ended] == following
    with pytest.raises(TypeError, match="drop_last"):
        data_loader(data, seed=9, batch_size=3, drop_last=True)
