"""A stock Hugging Face ``Trainer`` script that keeps its work across preemptions as a
spotrun command job: ``enable_jit_checkpoint=True`` saves a checkpoint on SIGTERM, and
``output_dir=$SPOTRUN_CHECKPOINT_DIR`` puts it where spotrun commits it and brings it back.

    spotrun submit command -- python examples/command/hf_trainer.py --steps 200

A tiny GPT-2 built from its config (random weights, random tokens): nothing is downloaded.
The ``Progress`` callback is optional: it only shows the job's progress in spotrun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 512

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class Progress(TrainerCallback):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        print(f"spotrun:progress step={state.global_step} total={state.max_steps}",
              flush=True)
        time.sleep(self.delay)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-delay", type=float, default=0.0)
    args = ap.parse_args(argv)
    output_dir = os.environ.get("SPOTRUN_CHECKPOINT_DIR", "hf-output")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                       n_head=2))
    training = TrainingArguments(
        output_dir=output_dir, enable_jit_checkpoint=True, max_steps=args.steps,
        per_device_train_batch_size=8, learning_rate=1e-3, save_strategy="no",
        logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(),
                      callbacks=[Progress(args.step_delay)])
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    print(f"resuming from {os.path.basename(last)}" if last else "starting", flush=True)
    trainer.train(resume_from_checkpoint=last)
    print(json.dumps({"global_step": trainer.state.global_step}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
