"""A plain PyTorch training script that keeps its work across preemptions as a spotrun
command job, without importing spotrun.

It keeps its state in ``$SPOTRUN_CHECKPOINT_DIR`` (``./checkpoint`` outside spotrun): it
resumes from ``state.pt`` there if the file exists, saves it every ``--save-every`` steps
and then prints ``spotrun:checkpoint`` (the worker commits the directory), and on SIGTERM
(a preemption notice) saves it at the end of the step in flight and exits. It prints
``spotrun:progress`` lines, and writes its result to ``$SPOTRUN_RESULT_FILE``.

    spotrun submit command -- python examples/command/train.py --steps 200

Resumed runs end with the same weights, bit for bit, as an uninterrupted one: the model,
the optimizer's momentum and the step are saved, and each step's batch is drawn from a
generator seeded by the step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from typing import Any

import torch


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=50, help="0: only on SIGTERM")
    ap.add_argument("--step-delay", type=float, default=0.0, help="seconds, to watch it")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    stop = False

    def on_sigterm(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True  # acted on at the end of the step in flight

    signal.signal(signal.SIGTERM, on_sigterm)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt_dir = os.environ.get("SPOTRUN_CHECKPOINT_DIR", "checkpoint")
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, "state.pt")
    step = 0
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        print(f"resumed at step {step}", flush=True)

    def save() -> None:
        # A new file renamed into place: a kill mid-save leaves the previous state whole.
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "step": step}, path + ".tmp")
        os.replace(path + ".tmp", path)

    loss = torch.tensor(0.0)
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x = torch.randn(64, 16, generator=g)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        print(f"spotrun:progress step={step} total={args.steps} loss={loss.item():.5f}",
              flush=True)
        if stop:
            save()
            print(f"stopping at step {step}: state saved", flush=True)
            return 0
        if args.save_every and step % args.save_every == 0:
            save()
            print("spotrun:checkpoint", flush=True)
        time.sleep(args.step_delay)

    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    result = {"steps": step, "loss": round(loss.item(), 6),
              "weights_sha256": hashlib.sha256(weights).hexdigest()}
    if os.environ.get("SPOTRUN_RESULT_FILE"):
        with open(os.environ["SPOTRUN_RESULT_FILE"], "w") as fh:
            json.dump(result, fh)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
