"""A plain PyTorch training loop made preemption-safe with spotrun's state helpers.

AdamW, a linear warm-up then cosine schedule, dropout, a ``DataLoader`` with two worker
processes and a shuffled order per epoch, gradient accumulation and bf16 autocast on the
CPU. Preempted at any step - mid-epoch, mid-accumulation - it resumes where it stopped and
ends with the weights of an uninterrupted run, bit for bit.

Install it with ``pip install -e examples/plain_loop``; it registers the pipeline
``plain-loop`` under the entry-point group ``spotrun.pipelines``. torch is imported inside
the run function only: ``spotrun`` commands load every pipeline's module at start-up.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import Field

from spotrun.pipelines import JobContext, Params, pipeline


class PlainLoopParams(Params):
    epochs: int = Field(4, ge=1, le=100, description="passes over the data")
    samples: int = Field(240, ge=8, le=100_000, description="synthetic examples")
    batch_size: int = Field(8, ge=1, le=1024, description="examples per micro-batch")
    accumulate: int = Field(3, ge=1, le=64, description="micro-batches per optimizer step")
    lr: float = Field(3e-3, gt=0, le=1, description="peak AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, le=1)
    warmup: int = Field(4, ge=0, le=10_000, description="optimizer steps of linear warm-up")
    dropout: float = Field(0.2, ge=0, lt=1)
    hidden: int = Field(64, ge=1, le=4096)
    workers: int = Field(2, ge=0, le=16, description="DataLoader worker processes")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="autocast dtype on CPU")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    step_delay: float = Field(0, ge=0, le=10, description="seconds slept per micro-batch")


@pipeline("plain-loop", params=PlainLoopParams,
          description="A plain PyTorch loop on spotrun's state helpers")
def run(ctx: JobContext) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save
    from torch import nn
    from torch.utils.data import TensorDataset

    from spotrun.integrations.torch import TrainState, data_loader, weights_sha256

    p = ctx.params
    assert isinstance(p, PlainLoopParams)

    # Data: a fixed synthetic task (no download), the same on every machine.
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(p.samples, 16, generator=gen)
    y = (x @ torch.randn(16, 4, generator=gen)).argmax(dim=1)
    loader = data_loader(TensorDataset(x, y), seed=p.seed, batch_size=p.batch_size,
                         num_workers=p.workers)
    per_epoch = loader.batches_per_epoch()
    total = p.epochs * per_epoch  # micro-batches: a spotrun step each
    opt_steps = math.ceil(total / p.accumulate)

    torch.manual_seed(p.seed)  # the init; dropout then draws from the same global RNG
    model = nn.Sequential(nn.Linear(16, p.hidden), nn.GELU(), nn.Dropout(p.dropout),
                          nn.Linear(p.hidden, p.hidden), nn.GELU(), nn.Dropout(p.dropout),
                          nn.Linear(p.hidden, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)

    def warmup_cosine(s: int) -> float:
        if s < p.warmup:
            return (s + 1) / p.warmup
        return 0.5 * (1 + math.cos(math.pi * (s - p.warmup) / max(1, opt_steps - p.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)

    ts = TrainState(modules={"model": model}, optimizers={"opt": opt},
                    schedulers={"sched": sched}, counters={"step": 0, "loss": None})
    if ts.resume(ctx):  # everything back in place: weights, grads, RNGs, the position
        ctx.log.info("resumed at epoch %d batch %d (micro-step %d of %d)", ts.position.epoch,
                     ts.position.batch, ts.position.micro, p.accumulate)
    ctx.set_state(lambda: ts.as_state(ts.counters["step"]))
    dtype = torch.bfloat16 if p.precision == "bf16" else torch.float32
    pos = ts.position

    if ctx.progress(ts.counters["step"], total):
        ctx.stop()
    model.train()
    while pos.epoch < p.epochs:
        loader.set_epoch(pos.epoch, start_batch=pos.batch)
        for xb, yb in loader:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb) / p.accumulate
            loss.backward()  # type: ignore[no-untyped-call]
            pos.batch += 1
            pos.micro += 1
            ts.counters["step"] += 1
            if pos.micro == p.accumulate or ts.counters["step"] == total:
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                pos.micro = 0
            ts.counters["loss"] = round(float(loss.detach()) * p.accumulate, 6)
            if p.step_delay:
                time.sleep(p.step_delay)
            # A step boundary: the worker may checkpoint here, mid-accumulation included.
            if ctx.progress(ts.counters["step"], total, loss=ts.counters["loss"],
                            epoch=pos.epoch + 1, lr=sched.get_last_lr()[0]):
                ctx.stop()
        pos.epoch, pos.batch = pos.epoch + 1, 0

    sha = weights_sha256(model)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = ctx.save_model({"model.safetensors": save(weights)},
                          {"weights_sha256": sha, "step": ts.counters["step"]})
    return {"steps": ts.counters["step"], "loss": ts.counters["loss"],
            "weights_sha256": sha, "model": path}


PIPELINE = run
