"""A stock Lightning script that keeps its work across preemptions as a spotrun command
job: Lightning turns SIGTERM into an exception at the next step, its own
``OnExceptionCheckpoint(dirpath=$SPOTRUN_CHECKPOINT_DIR)`` saves there, and ``fit``
resumes from that file when it exists.

    spotrun submit command -- python examples/command/lightning_fit.py --steps 200

The ``Progress`` callback is optional: it only shows the job's progress in spotrun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from torch.utils.data import DataLoader, TensorDataset


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Progress(Callback):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        print(f"spotrun:progress step={trainer.global_step} total={trainer.max_steps}",
              flush=True)
        time.sleep(self.delay)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-delay", type=float, default=0.0)
    args = ap.parse_args(argv)
    ckpt_dir = os.environ.get("SPOTRUN_CHECKPOINT_DIR", "lightning-checkpoint")
    L.seed_everything(0, verbose=False)
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, torch.sin(x.sum(dim=1, keepdim=True))), batch_size=16)
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
        default_root_dir=ckpt_dir, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[OnExceptionCheckpoint(dirpath=ckpt_dir), Progress(args.step_delay)])
    ckpt = os.path.join(ckpt_dir, "on_exception.ckpt")
    resume = ckpt if os.path.exists(ckpt) else None
    print(f"resuming from {os.path.basename(ckpt)}" if resume else "starting", flush=True)
    trainer.fit(Regression(), data, ckpt_path=resume)
    print(json.dumps({"global_step": trainer.global_step}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
