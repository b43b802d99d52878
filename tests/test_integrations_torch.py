"""spotrun.integrations.torch: capture and restore a training loop's whole state, and the
data order that resumes at the exact batch."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load
from torch import nn
from torch.utils.data import TensorDataset

from spotrun.checkpoints import CheckpointStore, Loaded
from spotrun.integrations.torch import (
    DataPosition,
    EpochSampler,
    StateMismatch,
    TrainState,
    data_loader,
    differences,
    environment,
)
from spotrun.pipelines import JobContext


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 3))


def _loop(seed: int = 0) -> TrainState:
    net = _net(seed)
    opt = torch.optim.AdamW([
        {"params": net[0].parameters(), "lr": 3e-3, "weight_decay": 0.05},
        {"params": net[3].parameters(), "lr": 1e-3, "betas": (0.8, 0.95)},
    ])
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    return TrainState(modules={"net": net}, optimizers={"opt": opt},
                      schedulers={"sched": sched}, scaler=scaler,
                      generators={"aug": torch.Generator().manual_seed(7),
                                  "np": np.random.default_rng(11),
                                  "py": random.Random(13)})


def _step(ts: TrainState, micro: int) -> None:
    """One micro-step: every RNG and generator is drawn from, the optimizer steps every
    second micro-step (gradient accumulation)."""
    net, opt = ts.modules["net"], ts.optimizers["opt"]
    net.train()
    x = torch.randn(4, 8) + random.random() + float(np.random.rand())
    x = x + torch.rand(1, generator=ts.generators["aug"]).item()
    x = x + float(ts.generators["np"].random()) + ts.generators["py"].random()
    loss = net(x).pow(2).mean()
    ts.scaler.scale(loss).backward()
    if micro % 2 == 1:
        ts.scaler.step(opt)
        ts.scaler.update()
        opt.zero_grad(set_to_none=True)
        ts.schedulers["sched"].step()


def _fingerprint(ts: TrainState) -> list[Any]:
    net = ts.modules["net"]
    return [
        [p.detach().clone() for p in net.parameters()],
        [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        [g["lr"] for g in ts.optimizers["opt"].param_groups],
        ts.scaler.get_scale(),
        torch.rand(3), random.random(), float(np.random.rand()),
    ]


def _assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, list):
            _assert_same(x, y)
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("split_at", [4, 5])  # after an optimizer step; mid-accumulation
def test_a_restored_loop_continues_bit_identically(split_at: int) -> None:
    ts = _loop()
    for i in range(split_at):
        _step(ts, i)
    ts.position = DataPosition(epoch=1, batch=split_at, micro=split_at % 2)
    ts.counters.update(step=split_at, best=0.25, tags=["a"])
    files = ts.capture()
    for i in range(split_at, 12):
        _step(ts, i)
    expected = _fingerprint(ts)

    # A fresh process would build everything from scratch with other RNG draws.
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    resumed = _loop(seed=42)
    position = resumed.position
    resumed.restore(files)
    assert resumed.position is position and position == DataPosition(1, split_at,
                                                                      split_at % 2)
    assert resumed.counters == {"step": split_at, "best": 0.25, "tags": ["a"]}
    for i in range(split_at, 12):
        _step(resumed, i)
    _assert_same(_fingerprint(resumed), expected)


def test_the_files_are_safetensors_and_json_with_every_hyperparameter() -> None:
    ts = _loop()
    for i in range(4):
        _step(ts, i)
    files = ts.capture()
    assert set(files) == {"tensors.safetensors", "state.json"}
    doc = json.loads(files["state.json"])
    tensors = load(files["tensors.safetensors"])
    groups = doc["optimizers"]["opt"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.01]
    assert groups[1]["betas"] == {"$tuple": [0.8, 0.95]}
    assert "optim.opt.state.0.exp_avg" in tensors and "rng.torch" in tensors
    assert doc["env"]["torch"] == torch.__version__
    assert doc["env"]["threads"] == torch.get_num_threads()
    assert doc["scaler"]["scale"] == ts.scaler.get_scale()
    restored_groups = _loop(seed=3)
    restored_groups.restore(files)
    for mine, theirs in zip(restored_groups.optimizers["opt"].param_groups,
                            ts.optimizers["opt"].param_groups, strict=True):
        assert {k: v for k, v in mine.items() if k != "params"} == \
            {k: v for k, v in theirs.items() if k != "params"}


def test_tied_weights_are_captured_and_restored() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    files = TrainState(modules={"m": model}).capture()
    other = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    other["head"].weight = other["emb"].weight
    TrainState(modules={"m": other}).restore(files)
    assert torch.equal(other["emb"].weight, emb.weight)
    assert other["head"].weight is other["emb"].weight


def test_a_checkpoint_that_does_not_fit_is_refused_with_a_clear_line() -> None:
    files = _loop().capture()
    wider = dataclasses.replace(_loop(), modules={"net": nn.Sequential(
        nn.Linear(8, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 3))})
    with pytest.raises(StateMismatch, match="module 'net' does not fit"):
        wider.restore(files)
    with pytest.raises(StateMismatch, match=r"checkpoint has modules \['net'\], this "
                                            r"TrainState has \['model'\]"):
        dataclasses.replace(_loop(), modules={"model": _net()}).restore(files)
    net = _net(seed=5)  # other weights than the checkpoint's
    one_group = TrainState(modules={"net": net},
                           optimizers={"opt": torch.optim.AdamW(net.parameters())},
                           schedulers={"sched": _loop().schedulers["sched"]},
                           scaler=torch.amp.GradScaler("cpu"),
                           generators=_loop().generators)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(StateMismatch, match="optimizer 'opt' does not fit"):
        one_group.restore(files)
    # A refused restore changes nothing.
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    before = [p.detach().clone() for p in wider.modules["net"].parameters()]
    with pytest.raises(StateMismatch, match=r"0\.weight has shape \[32, 8\] here, "
                                            r"\[16, 8\] in the checkpoint"):
        wider.restore(files)
    assert all(torch.equal(a, b) for a, b in zip(
        before, wider.modules["net"].parameters(), strict=True))
    with pytest.raises(StateMismatch, match=r"not a spotrun\.torch checkpoint"):
        TrainState().restore({"state.json": b"{}"})


def test_counters_must_be_json() -> None:
    with pytest.raises(TypeError, match="counters must hold JSON values"):
        TrainState(counters={"when": object()}).capture()


def test_what_breaks_bit_identity_is_named() -> None:
    here = environment("cpu")
    assert differences(here, here) == []
    assert differences({**here, "threads": here["threads"] + 1}, here) == [
        f"threads {here['threads'] + 1} -> {here['threads']}"]
    assert differences({**here, "device": "cuda"}, here) == ["device cuda -> cpu"]
    assert differences({"torch": here["torch"]}, here) == []  # older checkpoints: unknown


# ---------------------------------------------------------------------- data order


def _dataset(n: int = 37) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.arange(n) * 10)


def _epochs(loader: Any, epochs: int, start: tuple[int, int] = (0, 0)) -> list[list[int]]:
    seen = []
    for epoch in range(start[0], epochs):
        loader.set_epoch(epoch, start[1] if epoch == start[0] else 0)
        seen += [xb.tolist() for xb, _ in loader]
    return seen


def test_each_epoch_has_its_own_order_derived_from_seed_and_epoch() -> None:
    s = EpochSampler(37, seed=5, batch_size=4)
    orders = [s.order(e).tolist() for e in range(3)]
    assert all(sorted(o) == list(range(37)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert EpochSampler(37, seed=5, batch_size=4).order(1).tolist() == orders[1]
    assert EpochSampler(37, seed=6, batch_size=4).order(1).tolist() != orders[1]
    assert s.batches() == 10 and s.batches(drop_last=True) == 9


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_loader_with_worker_processes_resumes_at_the_exact_batch(drop_last: bool) -> None:
    loader = data_loader(_dataset(), seed=3, batch_size=4, num_workers=2, drop_last=drop_last)
    whole = _epochs(loader, 3)
    per_epoch = 9 if drop_last else 10
    assert loader.batches_per_epoch() == per_epoch
    assert len(whole) == 3 * per_epoch
    for epoch, batch in [(0, 0), (1, 3), (1, per_epoch - 1), (2, 1)]:
        resumed = _epochs(data_loader(_dataset(), seed=3, batch_size=4, num_workers=2,
                                      drop_last=drop_last), 3, (epoch, batch))
        assert resumed == whole[epoch * per_epoch + batch:]


def test_iterating_the_loader_leaves_the_global_rng_alone() -> None:
    # A plain DataLoader draws its workers' seed from the global RNG at every iter(), so a
    # resumed run would draw dropout masks from another point of the stream.
    loader = data_loader(_dataset(), seed=3, batch_size=4, num_workers=2)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    _epochs(loader, 2)
    assert torch.equal(torch.get_rng_state(), before)


def _worker_draws(loader: Any) -> list[float]:
    return [float(x) for x, _ in loader]


class _Noisy(torch.utils.data.Dataset[tuple[float, int]]):
    """Draws from the worker's own torch RNG: only the worker seeding decides the values."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[float, int]:
        return float(torch.rand(1)), i


def test_worker_processes_are_seeded_from_seed_and_epoch() -> None:
    a = data_loader(_Noisy(), seed=3, batch_size=1, num_workers=2)
    b = data_loader(_Noisy(), seed=3, batch_size=1, num_workers=2)
    a.set_epoch(1)
    b.set_epoch(1)
    first = _worker_draws(a)
    assert first == _worker_draws(b)
    a.set_epoch(2)
    assert _worker_draws(a) != first
    assert not any(math.isnan(v) for v in first)


# ------------------------------------------------------------------ digits-train


def _v0_checkpoint(steps: int, *, epochs: int, seed: int) -> Loaded:
    """What spotrun 0.1's digits-train wrote after ``steps`` steps (before the helpers)."""
    import torch.nn.functional as F

    from spotrun.pipelines import digits

    data = digits.load_split()
    net = digits.init_net(64, seed)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    n, batch_size = len(data.x_train), 32
    per_epoch = -(-n // batch_size)
    for step in range(steps):
        epoch, batch = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + epoch))
        idx = order[batch * batch_size:(batch + 1) * batch_size]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
    meta = {"step": steps, "total": epochs * per_epoch,
            "env": {"torch": torch.__version__, "device": "cpu",
                    "threads": torch.get_num_threads()}}
    files = {"tensors.safetensors": digits.tensors_to_bytes(tensors),
             "state.json": json.dumps(meta).encode()}
    return Loaded(path="jobs/old/a0001-s000000050", step=steps, files=files, meta={})


def test_digits_train_resumes_a_checkpoint_written_before_the_helpers(tmp_path: Any) -> None:
    from spotrun.local import _InlineDriver, run_inline
    from spotrun.pipelines.digits_train import PIPELINE

    params = PIPELINE.validate({"epochs": 2, "seed": 4})
    ctx = JobContext(job_id="old", attempt=2, params=params, resume=_v0_checkpoint(
        50, epochs=2, seed=4), driver=_InlineDriver(CheckpointStore(str(tmp_path)), "old"))
    resumed = PIPELINE.run(ctx)
    assert resumed["steps"] == 90
    assert resumed["weights_sha256"] == run_inline(
        "digits-train", {"epochs": 2, "seed": 4})["weights_sha256"]


def test_a_checkpoint_of_the_previous_layout_is_restored_exactly() -> None:
    """spotrun.torch/1 (RNG states as JSON lists), written by the release before: weights,
    the gradient in flight, AdamW, the position, every RNG and generator come back."""
    from pathlib import Path

    data = Path(__file__).parent / "data" / "torch-v1"
    files = {name: (data / name).read_bytes() for name in ("tensors.safetensors",
                                                          "state.json")}
    assert json.loads(files["state.json"])["format"] == "spotrun.torch/1"
    expected = json.loads((data / "after.json").read_text())
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ts = TrainState(modules={"net": net}, optimizers={"opt": opt},
                    generators={"py": random.Random(0), "np": np.random.default_rng(0)})
    ts.restore(files)
    saved = load(files["tensors.safetensors"])
    assert torch.equal(net.weight, saved["module.net.weight"])
    assert net.weight.grad is not None and torch.equal(net.weight.grad,
                                                       saved["grad.net.weight"])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"],
                       saved["optim.opt.state.0.exp_avg"])
    assert ts.position == DataPosition(1, 2, 1) and ts.counters == {"step": 1}
    assert random.random() == expected["python"]
    assert float(np.random.rand()) == expected["numpy"]
    assert torch.rand(3).tolist() == expected["torch"]
    assert ts.generators["py"].random() == expected["py"]
    assert float(ts.generators["np"].random()) == expected["np"]


def test_the_rng_states_are_tensors_and_the_file_is_what_safetensors_writes() -> None:
    from safetensors.torch import save

    ts = _loop()
    for i in range(3):
        _step(ts, i)
    ts.modules = {**ts.modules, "odd": nn.ModuleDict({  # bf16, empty, 0-dim, tied, strided
        "bf16": nn.Linear(2, 2).to(torch.bfloat16)})}
    ts.modules["odd"].register_buffer("empty", torch.zeros(0, 2))
    ts.modules["odd"].register_buffer("scalar", torch.tensor(3.0))
    ts.modules["odd"].register_buffer("strided", torch.arange(6.0).reshape(2, 3).t())
    ts.modules["odd"].register_buffer("tied", ts.modules["odd"]["bf16"].weight)
    files = ts.capture()
    tensors = load(files["tensors.safetensors"])
    assert tensors["rng.python"].dtype == torch.int32 and tensors["rng.python"].numel() == 625
    assert tensors["rng.numpy"].dtype == torch.int32 and tensors["rng.numpy"].numel() == 624
    assert len(json.dumps(json.loads(files["state.json"])["rng"])) < 200  # no words as JSON
    # Byte for byte what safetensors' own torch writer makes of the same tensors.
    assert files["tensors.safetensors"] == save(tensors)
    state = random.getstate()
    random.seed(1)
    np_state = np.random.get_state()
    np.random.seed(1)
    ts.restore(files)
    assert random.getstate() == state
    restored = np.random.get_state()
    assert restored[0] == np_state[0] and np.array_equal(restored[1], np_state[1])
    assert restored[2:] == np_state[2:]
