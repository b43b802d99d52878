"""``digits-train``: trains a small network on scikit-learn's bundled digits.

Deterministic for a given seed on one device type, library version and thread count: the
network is initialised from the seed, the data order of each epoch derives from (seed,
epoch), and a checkpoint holds the weights, the optimizer state and the step. A resumed run
therefore ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
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
    step = 0
    env = digits.environment(device)
    if ctx.resume is not None:
        step = _restore(ctx, net, opt, device)
        saved_env = json.loads(ctx.resume.files["state.json"]).get("env", {})
        if saved_env != env:
            changed = ", ".join(f"{k} {saved_env.get(k)} -> {v}" for k, v in env.items()
                                if saved_env.get(k) != v)
            ctx.note(f"resumed on different hardware or software ({changed}): the result "
                     "will be correct but not bit-identical to an uninterrupted run")
        ctx.log.info("resumed from step %d/%d", step, total)

    def state() -> State:
        tensors: dict[str, torch.Tensor] = {
            f"model.{k}": v for k, v in net.state_dict().items()}
        for i, st in opt.state_dict()["state"].items():
            for key, value in st.items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
        meta = {"step": step, "total": total, "env": env, "params": p.model_dump()}
        return State(step, {"tensors.safetensors": digits.tensors_to_bytes(tensors),
                            "state.json": json.dumps(meta, sort_keys=True).encode()})

    ctx.set_state(state)
    ctx.progress(step, total)
    loss_value = float("nan")
    while step < total:
        if ctx.should_stop():
            ctx.stop()
        epoch, batch = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            p.seed * 1_000_003 + epoch))
        idx = order[batch * p.batch_size:(batch + 1) * p.batch_size].to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        step += 1
        if p.step_delay:
            time.sleep(p.step_delay)
        loss_value = float(loss.detach())
        ctx.progress(step, total, loss=round(loss_value, 5), epoch=epoch + 1)

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


def _restore(ctx: JobContext, net: Any, opt: Any, device: Any) -> int:
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
