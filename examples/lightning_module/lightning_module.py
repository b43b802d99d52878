"""A ``LightningModule`` trained by a stock ``Trainer.fit``, preemption-safe on spotrun.

AdamW with a linear warm-up then cosine schedule stepped every batch, dropout, a shuffled
order per epoch, validation every epoch. The only spotrun parts are the callback
``SpotrunCheckpoint(ctx)`` and the training loader from ``data_loader``. Preempted at any
batch, mid-epoch included, it resumes where it stopped and ends with the weights of an
uninterrupted run, bit for bit.

Install it with ``pip install -e examples/lightning_module``; it registers the pipeline
``lightning-module`` under the entry-point group ``spotrun.pipelines``. Lightning and torch
are imported inside the run function only: ``spotrun`` commands load every pipeline's
module at start-up.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from pydantic import Field

from spotrun.pipelines import JobContext, Params, pipeline


class LightningModuleParams(Params):
    epochs: int = Field(3, ge=1, le=100, description="passes over the data")
    samples: int = Field(240, ge=8, le=100_000, description="synthetic examples")
    batch_size: int = Field(8, ge=1, le=1024, description="examples per batch")
    accumulate: int = Field(1, ge=1, le=64, description="batches per optimizer step")
    lr: float = Field(3e-3, gt=0, le=1, description="peak AdamW learning rate")
    warmup: int = Field(5, ge=0, le=10_000, description="steps of linear warm-up")
    dropout: float = Field(0.2, ge=0, lt=1)
    hidden: int = Field(64, ge=1, le=4096)
    workers: int = Field(0, ge=0, le=16, description="DataLoader worker processes")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    step_delay: float = Field(0, ge=0, le=10, description="seconds slept per batch")


@pipeline("lightning-module", params=LightningModuleParams,
          description="A LightningModule trained by Trainer.fit with spotrun's callback")
def run(ctx: JobContext) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from spotrun.integrations.lightning import SpotrunCheckpoint, data_loader

    p = ctx.params
    assert isinstance(p, LightningModuleParams)

    # Data: a fixed synthetic task (no download), the same on every machine.
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(p.samples + 64, 16, generator=gen)
    y = (x @ torch.randn(16, 4, generator=gen)).argmax(dim=1)
    train = data_loader(TensorDataset(x[:p.samples], y[:p.samples]), seed=p.seed,
                        batch_size=p.batch_size, num_workers=p.workers)
    val = DataLoader(TensorDataset(x[p.samples:], y[p.samples:]), batch_size=32)
    total = p.epochs * -(-len(train) // p.accumulate)  # optimizer steps

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, p.hidden), nn.ReLU(), nn.Dropout(p.dropout),
                                     nn.Linear(p.hidden, 4))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            xb, yb = batch
            loss = F.cross_entropy(self.net(xb), yb)
            self.log("train_loss", loss)
            if p.step_delay:
                time.sleep(p.step_delay)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            xb, yb = batch
            self.log("val_acc", (self.net(xb).argmax(dim=1) == yb).float().mean())

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=p.lr, weight_decay=0.01)

            def factor(step: int) -> float:
                if step < p.warmup:
                    return (step + 1) / p.warmup
                return 0.5 * (1 + math.cos(math.pi * (step - p.warmup) / max(1, total - p.warmup)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(p.seed)  # the initial weights; a resumed run loads its own
    model = Classifier()
    trainer = pl.Trainer(max_epochs=p.epochs, accelerator="cpu", devices=1,
                         accumulate_grad_batches=p.accumulate,
                         callbacks=[SpotrunCheckpoint(ctx)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=None)
    trainer.fit(model, train, val)

    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(f"{name}:{weights[name].dtype}:{list(weights[name].shape)}:".encode())
        digest.update(weights[name].numpy().tobytes())
    val_acc = float(trainer.callback_metrics.get("val_acc", float("nan")))
    return {"steps": int(trainer.global_step), "val_acc": round(val_acc, 6),
            "weights_sha256": digest.hexdigest()}


PIPELINE = run
