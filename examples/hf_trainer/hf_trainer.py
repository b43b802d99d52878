"""A small BERT trained by a stock Hugging Face ``Trainer.train``, preemption-safe on spotrun.

The model is built from a ``BertConfig`` with random weights (no download); the task is a
fixed synthetic one (does a sequence hold more of token 5 than of token 6?). AdamW with the
Trainer's linear warm-up and decay, dropout, the Trainer's own shuffling. The only spotrun
part is the callback ``SpotrunCallback(ctx)``, and its ``resume_from_checkpoint`` passed to
``train``. Preempted at any step, mid-epoch included, it resumes where it stopped and ends
with the weights of an uninterrupted run, bit for bit.

Install it with ``pip install -e examples/hf_trainer``; it registers the pipeline
``hf-trainer`` under the entry-point group ``spotrun.pipelines``. transformers and torch
are imported inside the run function only: ``spotrun`` commands load every pipeline's
module at start-up.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from typing import Any

from pydantic import Field

from spotrun.pipelines import JobContext, Params, pipeline


class HfTrainerParams(Params):
    epochs: int = Field(2, ge=1, le=100, description="passes over the data")
    samples: int = Field(192, ge=8, le=100_000, description="synthetic sequences")
    length: int = Field(16, ge=4, le=128, description="tokens per sequence")
    batch_size: int = Field(8, ge=1, le=1024, description="sequences per batch")
    accumulate: int = Field(1, ge=1, le=64, description="batches per optimizer step")
    lr: float = Field(5e-4, gt=0, le=1, description="peak AdamW learning rate")
    warmup: int = Field(4, ge=0, le=10_000, description="steps of linear warm-up")
    hidden: int = Field(32, ge=8, le=1024, description="BERT hidden size")
    layers: int = Field(2, ge=1, le=12, description="BERT layers")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    step_delay: float = Field(0, ge=0, le=10, description="seconds slept per step")


@pipeline("hf-trainer", params=HfTrainerParams,
          description="A small BERT trained by a Hugging Face Trainer with spotrun's callback")
def run(ctx: JobContext) -> dict[str, Any]:
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from spotrun.integrations.hf import SpotrunCallback

    p = ctx.params
    assert isinstance(p, HfTrainerParams)

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, 64, (p.samples, p.length), generator=gen)
    labels = ((ids == 5).sum(dim=1) > (ids == 6).sum(dim=1)).long()

    class Sequences(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return p.samples

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "attention_mask": torch.ones(p.length, dtype=torch.long),
                    "labels": labels[i]}

    class Slow(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if p.step_delay:
                time.sleep(p.step_delay)

    config = BertConfig(vocab_size=64, hidden_size=p.hidden, num_hidden_layers=p.layers,
                        num_attention_heads=2, intermediate_size=2 * p.hidden,
                        max_position_embeddings=max(32, p.length), num_labels=2)
    torch.manual_seed(p.seed)  # the initial weights; a resumed run loads its own
    model = BertForSequenceClassification(config)
    spot = SpotrunCallback(ctx)
    with tempfile.TemporaryDirectory(prefix="hf-trainer-") as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=p.epochs, per_device_train_batch_size=p.batch_size,
            gradient_accumulation_steps=p.accumulate, learning_rate=p.lr,
            warmup_steps=p.warmup, weight_decay=0.01, seed=p.seed,
            save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
            use_cpu=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=Sequences(),
                          callbacks=[spot, Slow()])
        output = trainer.train(resume_from_checkpoint=spot.resume_from_checkpoint)

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)}:".encode())
        digest.update(t.numpy().tobytes())
    return {"steps": int(output.global_step), "loss": round(float(output.training_loss), 6),
            "weights_sha256": digest.hexdigest()}


PIPELINE = run
