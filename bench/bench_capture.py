#!/usr/bin/env python
"""Capture benchmark: ``TrainState.capture()`` against writing the same tensors with
safetensors directly.

For each model (a digits-sized MLP; a 10M-parameter MLP; a 6-layer transformer encoder of
MiniLM's shape, 22.7M parameters) with AdamW's state after one step, both sides turn the
whole state into bytes in memory:

* helpers: ``TrainState(modules, optimizers, schedulers, counters).capture()``: the state
  dicts walked and split, every RNG, the JSON, the safetensors file;
* direct: ``safetensors.torch.save(tensors)`` of a dict, built beforehand and not timed,
  holding exactly the tensors that capture writes (weights, optimizer slots, RNG state):
  the floor any checkpoint of these tensors pays.

The two are timed alternately, ``--reps`` times each (after a warm-up), so that a noisy
spell of the machine hits both. Reported: the ratio of the medians, the median of the
per-pair ratios (the verdict) and the ratio of the fastest runs. Goal: within 1.2x.

    python bench/bench_capture.py            # ~1 min
    python bench/bench_capture.py --quick    # 5 reps
    python bench/bench_capture.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Run, table

GOAL = 1.2


def _models(device: str) -> dict[str, Any]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    minilm = nn.ModuleDict({
        "emb": nn.Embedding(30522, 384),
        "pos": nn.Embedding(512, 384),
        "enc": nn.TransformerEncoder(nn.TransformerEncoderLayer(
            384, 12, 1536, batch_first=True), num_layers=6, enable_nested_tensor=False),
    })
    return {
        "MLP 64-64-10 (digits)": nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                                               nn.Linear(64, 10)).to(device),
        "MLP 10M params": nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(10)]).to(device),
        "encoder, MiniLM shape (22.7M)": minilm.to(device),
    }


def _one_step(model: Any) -> Any:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - start, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--quick", action="store_true", help="5 reps")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    reps = 5 if args.quick else args.reps

    import torch
    from safetensors.torch import load, save

    from spotrun.integrations.torch import TrainState

    run = Run("bench_capture", args)
    print(run.header())
    rows = []
    for name, model in _models(args.device).items():
        opt = _one_step(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ts = TrainState(modules={"model": model}, optimizers={"opt": opt},
                        schedulers={"sched": sched}, counters={"step": 1})
        # Exactly the tensors capture writes, on the CPU (safetensors' save moves them).
        tensors = load(ts.capture()["tensors.safetensors"])
        tensors = {k: v.to(args.device) if k.startswith(("module.", "optim.")) else v
                   for k, v in tensors.items()}
        params = sum(p.numel() for p in model.parameters())

        def helpers(ts: TrainState = ts) -> int:
            return sum(len(data) for data in ts.capture().values())

        def direct(tensors: dict[str, Any] = tensors) -> int:
            return len(save(tensors))

        helpers()
        direct()
        h_times: list[float] = []
        d_times: list[float] = []
        h_bytes = d_bytes = 0
        for _ in range(reps):
            t, h_bytes = _timed(helpers)
            h_times.append(t)
            t, d_bytes = _timed(direct)
            d_times.append(t)
        ratio = statistics.median(h_times) / statistics.median(d_times)
        # On a shared machine the spells of load dwarf the difference; the fastest run of
        # each side and the median of the pair ratios are the steadier measures.
        pairs = statistics.median(h / d for h, d in zip(h_times, d_times, strict=True))
        best = min(h_times) / min(d_times)
        run.results[name] = {"params": params, "helpers_s": h_times, "direct_s": d_times,
                             "helpers_bytes": h_bytes, "direct_bytes": d_bytes,
                             "ratio_of_medians": ratio, "median_pair_ratio": pairs,
                             "ratio_of_minima": best}
        rows.append([name, f"{params:,}", f"{h_bytes / 1e6:.2f}",
                     f"{statistics.median(d_times) * 1e3:.2f}",
                     f"{statistics.median(h_times) * 1e3:.2f}",
                     f"{min(d_times) * 1e3:.2f} / {min(h_times) * 1e3:.2f}",
                     f"{ratio:.2f}x", f"{pairs:.2f}x", f"{best:.2f}x",
                     "met" if pairs <= GOAL else "not met"])
        print(f"{name}: helpers {statistics.median(h_times) * 1e3:.2f} ms, direct "
              f"{statistics.median(d_times) * 1e3:.2f} ms, {ratio:.2f}x", flush=True)
    markdown = table(["state", "parameters", "MB", "direct median ms", "helpers median ms",
                      "fastest ms (direct / helpers)", "ratio of medians",
                      "median pair ratio", "ratio of fastest", "goal 1.2x (pairs)"], rows)
    run.finish(f"device {args.device}, {reps} alternated reps each, torch threads "
               f"{torch.get_num_threads()}\n\n{markdown}", extra_versions=["safetensors"])


if __name__ == "__main__":
    main()
