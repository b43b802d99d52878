"""``digits-train``: trains a small network on scikit-learn's bundled digits.

Deterministic for a given seed on one device type, library version and thread count: the
network is initialised from the seed, the data order of each epoch derives from (seed,
epoch), and a checkpoint (:class:`spotrun.integrations.torch.TrainState`) holds the weights,
the optimizer state and the step. A resumed run therefore ends with the same weights, bit
for bit, as an uninterrupted one. Checkpoints written before the state helpers still load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

from spotrun.pipelines.base import JobContext, Params, State, pipeline


class DigitsTrainParams(Params):
    epochs: int = Field(10, ge=1, le=1000, description="passes over the training split")
    batch_size: int = Field(32, ge=1, le=1437, description="images per optimizer step")
    lr: float = Field(0.01, gt=0, le=10, description="Adam learning rate")
    hidden: int = Field(64, ge=1, le=4096, description="hidden units")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the init and the data order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")
    step_delay: float = Field(0, ge=0, le=60, description="seconds slept after each step")


def _requires_cuda(p: BaseModel) -> bool:
    return isinstance(p, DigitsTrainParams) and p.device == "cuda"


@pipeline("digits-train", params=DigitsTrainParams, requires_cuda=_requires_cuda,
          description="Train a digit classifier (8x8 images) with PyTorch")
def run(ctx: JobContext) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.integrations.torch import (
        TrainState,
        environment,
        epoch_order,
        note_if_not_identical,
        saved_environment,
    )

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.pipelines import digits

    p = ctx.params
    assert isinstance(p, DigitsTrainParams)
    device = digits.pick_device(p.device)
    data = digits.load_split()
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    n = len(x_train)
    per_epoch = (n + p.batch_size - 1) // p.batch_size
    total = p.epochs * per_epoch

    net = digits.init_net(p.hidden, p.seed).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    ts = TrainState(modules={"model": net}, optimizers={"optim": opt}, counters={"step": 0})
    env = environment(device.type)
    if ctx.resume is not None:
        if _is_v0(ctx.resume.files):
            ts.counters["step"] = _restore_v0(ctx, net, opt, device)
            note_if_not_identical(ctx, saved_environment(ctx.resume.files), env)
        else:
            ts.resume(ctx)
        ctx.log.info("resumed from step %d/%d", ts.counters["step"], total)
    step = int(ts.counters["step"])

    def state() -> State:
        ts.counters["step"] = step
        ts.position.epoch, ts.position.batch = divmod(step, per_epoch)
        return ts.as_state(step)

    ctx.set_state(state)
    if ctx.progress(step, total):
        ctx.stop()
    loss_value = float("nan")
    while step < total:
        epoch, batch = divmod(step, per_epoch)
        order = epoch_order(n, p.seed, epoch)
        idx = order[batch * p.batch_size:(batch + 1) * p.batch_size].to(device)
        loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=True)  # before a checkpoint: none holds gradients
        step += 1
        if p.step_delay:
            time.sleep(p.step_delay)
        loss_value = float(loss.detach())
        if ctx.progress(step, total, loss=round(loss_value, 5), epoch=epoch + 1):
            ctx.stop()

    with torch.no_grad():
        predicted = net(data.x_test.to(device)).argmax(dim=1).cpu()
    accuracy = float((predicted == data.y_test).float().mean())
    weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    sha = digits.weights_sha256(weights)
    model_path = ctx.save_model(
        {"model.safetensors": digits.tensors_to_bytes(weights)},
        {"hidden": p.hidden, "weights_sha256": sha, "step": step, "env": env},
    )
    ctx.log.info("test accuracy %.4f after %d steps", accuracy, step)
    return {"accuracy": round(accuracy, 6), "steps": step, "loss": loss_value,
            "weights_sha256": sha, "model": model_path}


def _is_v0(files: Mapping[str, bytes]) -> bool:
    """A checkpoint of spotrun 0.1's digits-train, before the state helpers."""
    return "format" not in json.loads(files["state.json"])


def _restore_v0(ctx: JobContext, net: Any, opt: Any, device: Any) -> int:
    # start-up: torch; every command that reads the registry imports this module
    from spotrun.pipelines import digits

    assert ctx.resume is not None
    tensors = digits.tensors_from_bytes(ctx.resume.files["tensors.safetensors"])
    meta = json.loads(ctx.resume.files["state.json"])
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value.to(device) if name != "step" else value
    sd["state"] = state
    opt.load_state_dict(sd)
    return int(meta["step"])


PIPELINE = run
