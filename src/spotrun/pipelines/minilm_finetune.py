"""``minilm-finetune``: trains a topic classifier on MiniLM sentence embeddings.

The pretrained encoder (all-MiniLM-L6-v2, from the ``minilm`` extra) stays frozen; a
dropout + linear head is trained on its embeddings of the bundled topics data set, and with
``train_last_layer`` the encoder's last transformer layer too. Written on
:mod:`spotrun.integrations.torch`: one :class:`TrainState` holds the head, the layer, AdamW,
the warm-up + cosine schedule, every RNG (dropout draws from torch's global one) and the
position in the data, whose order per epoch derives from (seed, epoch). A run preempted at
any step and resumed ends with the same weights, bit for bit, as an uninterrupted one (same
device type, library versions and thread count).

The frozen part's output (the features the trained part reads) is computed once per job and
kept in every checkpoint, so a resumed attempt starts training at once instead of running
the encoder over the whole data set again.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from spotrun.pipelines.base import JobContext, Params, State, pipeline

FEATURES = "features.safetensors"
MODEL_FILE = "model.safetensors"


class MiniLMFinetuneParams(Params):
    epochs: int = Field(4, ge=1, le=200, description="passes over the training split")
    batch_size: int = Field(16, ge=1, le=240, description="texts per optimizer step")
    lr: float = Field(0.003, gt=0, le=1, description="peak AdamW learning rate")
    warmup: float = Field(0.1, ge=0, le=1, description="share of the steps spent warming up")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the head")
    train_last_layer: bool = Field(False, description="train the encoder's last layer too")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the head, dropout and order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")
    step_delay: float = Field(0, ge=0, le=60, description="seconds slept after each step")
    threads: int = Field(1, ge=0, le=1024, description=(
        "torch CPU threads while the job runs (0: the worker's setting); a step this small "
        "is fastest on one, and on a busy machine several wait on each other at every op"))


def _requires_cuda(p: BaseModel) -> bool:
    return isinstance(p, MiniLMFinetuneParams) and p.device == "cuda"


@pipeline("minilm-finetune", params=MiniLMFinetuneParams, requires_cuda=_requires_cuda,
          description="Fine-tune a topic classifier on MiniLM (a pretrained transformer)")
def run(ctx: JobContext) -> dict[str, Any]:
    import torch

    p = ctx.params
    assert isinstance(p, MiniLMFinetuneParams)
    # One step (16 texts through one layer) is a few dozen small ops: split over two
    # threads on a machine whose cores are busy, each op waits until both threads get a
    # core, and a step measured 1.2 s against 35 ms on one thread. The count is part of
    # what bit-identity depends on (recorded in each checkpoint), so it is a parameter of
    # the job, set while the job runs and put back for whatever the worker runs next.
    previous = torch.get_num_threads()
    if p.threads:
        torch.set_num_threads(p.threads)
    try:
        return _train(ctx, p)
    finally:
        torch.set_num_threads(previous)


def _train(ctx: JobContext, p: MiniLMFinetuneParams) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.integrations import torch as spt

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.pipelines import digits, minilm

    device = digits.pick_device(p.device)
    data = minilm.topics()
    encoder = minilm.load_encoder(device)
    encoder.requires_grad_(False)
    key = {"data": data.sha256, "train_last_layer": p.train_last_layer, **minilm.versions()}

    features_bytes = _saved_features(ctx, key)
    if features_bytes is None:
        features_bytes = _features(ctx, encoder, list(data.train_texts), p.train_last_layer,
                                   device, key)
    features = digits.tensors_from_bytes(features_bytes)
    inputs = [features["hidden"].to(device), features["mask"].to(device)] \
        if p.train_last_layer else [features["embeddings"].to(device)]
    dataset = TensorDataset(*inputs, data.train_y.to(device))

    head = minilm.init_head(len(data.labels), p.dropout, p.seed).to(device)
    modules: dict[str, torch.nn.Module] = {"head": head}
    trained = list(head.parameters())
    layer = minilm.last_layer(encoder)
    if p.train_last_layer:
        layer.requires_grad_(True)
        layer.train()
        modules["layer"] = layer
        trained += list(layer.parameters())
    per_epoch = -(-len(dataset) // p.batch_size)
    total = p.epochs * per_epoch
    warm = max(1, round(total * p.warmup)) if p.warmup > 0 else 0
    opt = torch.optim.AdamW(trained, lr=p.lr, weight_decay=0.01)

    def schedule(s: int) -> float:
        # Linear warm-up to the peak, then cosine down to zero at the last step.
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    loader = spt.data_loader(dataset, seed=p.seed, batch_size=p.batch_size)
    sampler = loader.sampler
    assert isinstance(sampler, spt.EpochSampler)
    ts = spt.TrainState(modules=modules, optimizers={"adamw": opt},
                        schedulers={"schedule": sched}, counters={"step": 0})
    # Dropout draws from the global RNG: seed it, so that the uninterrupted run is itself
    # a function of the params; a resume then restores it with the rest.
    torch.manual_seed(p.seed)
    resumed = ts.resume(ctx)
    if resumed:
        ctx.log.info("resumed from step %d/%d", ts.counters["step"], total)

    def state() -> State:
        captured = ts.as_state(int(ts.counters["step"]))
        return State(captured.step, {**captured.files, FEATURES: features_bytes},
                     captured.meta)

    ctx.set_state(state)
    step = int(ts.counters["step"])
    ctx.progress(step, total)
    loss_value = float("nan")
    while step < total:
        epoch, batch = divmod(step, per_epoch)
        sampler.set_epoch(epoch, start_batch=batch)
        for *x, y in loader:
            if ctx.should_stop():
                ctx.stop()
            emb = _forward(minilm, layer, x) if p.train_last_layer else x[0]
            loss = F.cross_entropy(head(emb), y)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            # Dropped now rather than before the next step: a checkpoint then holds no
            # gradients (a quarter of its size with the last layer trained).
            opt.zero_grad(set_to_none=True)
            step += 1
            ts.counters["step"] = step
            ts.position.epoch, ts.position.batch = divmod(step, per_epoch)
            loss_value = float(loss.detach())
            if p.step_delay:
                time.sleep(p.step_delay)
            if resumed:  # the first step of a resumed attempt, for the job's log
                resumed = False
                ctx.log.info("first step after resuming done (step %d)", step)
            ctx.progress(step, total, loss=round(loss_value, 5), epoch=epoch + 1)

    head.eval()
    layer.eval()
    classifier = minilm.Classifier(encoder, head)
    probs = classifier.probabilities(list(data.test_texts), device).cpu()
    accuracy = float((probs.argmax(dim=1) == data.test_y).float().mean())
    weights = {f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
    if p.train_last_layer:
        weights.update({f"layer.{k}": v.detach().cpu() for k, v in layer.state_dict().items()})
    sha = digits.weights_sha256(weights)
    path = ctx.save_model({MODEL_FILE: digits.tensors_to_bytes(weights)}, {
        "base": minilm.MODEL_NAME, "labels": list(data.labels), "dropout": p.dropout,
        "train_last_layer": p.train_last_layer, "weights_sha256": sha, "step": step,
        "env": spt.environment(device.type), **minilm.versions()})
    ctx.log.info("test accuracy %.4f after %d steps", accuracy, step)
    return {"accuracy": round(accuracy, 6), "steps": step, "loss": loss_value,
            "labels": list(data.labels), "weights_sha256": sha, "model": path}


def _forward(minilm: Any, layer: Any, x: list[Any]) -> Any:
    """The trained last layer over the frozen layers' output, pooled."""
    hidden, mask = x
    out = layer(hidden, attention_mask=minilm.additive_mask(mask, hidden.dtype))
    if isinstance(out, tuple):  # older transformers return (hidden, ...)
        out = out[0]
    return minilm.pool(out, mask)


def _saved_features(ctx: JobContext, key: dict[str, Any]) -> bytes | None:
    """The features an earlier attempt computed, if it computed them for this job's data."""
    if ctx.resume is None or FEATURES not in ctx.resume.files:
        return None
    data = ctx.resume.files[FEATURES]
    # A safetensors file opens with the length of its JSON header, whose __metadata__ holds
    # what the features were made from.
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        saved = json.loads(header["__metadata__"]["key"])
    except (ValueError, KeyError, TypeError):
        return None
    return data if saved == key else None


def _features(ctx: JobContext, encoder: Any, texts: list[str], hidden: bool, device: Any,
              key: dict[str, Any]) -> bytes:
    """The frozen encoder's output over the training texts, in fixed batches.

    Pooled embeddings for a head alone; with ``hidden``, the states that enter the last
    layer (every text padded to the longest) and the attention mask.
    """
    import torch

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.pipelines import digits, minilm

    out: dict[str, list[torch.Tensor]] = {"embeddings": [], "hidden": [], "mask": []}
    ids, mask = minilm.tokenize(texts, device)
    with torch.no_grad():
        for lo in range(0, len(texts), minilm.FEATURE_BATCH):
            # No checkpoint before the features exist: a notice here hands the job back to
            # start over, which costs at most this loop.
            if ctx.should_stop():
                ctx.stop()
            b_ids, b_mask = ids[lo:lo + minilm.FEATURE_BATCH], mask[lo:lo + minilm.FEATURE_BATCH]
            res = encoder(input_ids=b_ids, attention_mask=b_mask, output_hidden_states=hidden)
            if hidden:
                out["hidden"].append(res.hidden_states[-2].float().cpu())
                out["mask"].append(b_mask.cpu())
            else:
                out["embeddings"].append(minilm.pool(res.last_hidden_state, b_mask).float().cpu())
    tensors = {k: torch.cat(v) for k, v in out.items() if v}
    return digits.tensors_to_bytes(tensors, {"key": json.dumps(key, sort_keys=True)})


PIPELINE = run
