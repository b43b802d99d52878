"""A pipeline that misbehaves on purpose, published under the ``spotrun.pipelines`` entry
point by :func:`install`, for the fault-path tests that run it in real workers."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from spotrun.pipelines import JobContext, Params, State, pipeline


class FaultParams(Params):
    mode: Literal["hang", "unwind-error", "swallow-stop", "same-step", "zombie-model",
                  "segfault", "allocate-torch", "allocate-python"]
    steps: int = Field(600, ge=1)
    step_seconds: float = Field(0.05, ge=0)
    # hang: FLAG.<attempt> is created once the step that never returns has begun;
    # zombie-model: attempt 1 waits for FLAG before it saves its model.
    flag: str = ""


def _recorded(ctx: JobContext, step: int, timeout: float = 60.0) -> None:
    """Wait until the store shows the job at ``step`` (the worker's database, read as a
    test reads it), so that a crash next leaves that step in the history."""
    from spotrun.store import JobStore

    store = JobStore.open(os.environ["SPOTRUN_DATABASE_URL"], migrate=False)
    try:
        until = time.monotonic() + timeout
        while store.get(ctx.job_id, with_events=False).progress.step < step:
            if time.monotonic() > until:
                raise TimeoutError(f"step {step} never reached the store")
            time.sleep(0.05)
    finally:
        store.close()


@pipeline("faults", params=FaultParams, description="Misbehaves as asked (tests)")
def run(ctx: JobContext) -> dict[str, Any]:
    p = ctx.params
    assert isinstance(p, FaultParams)
    step = 0 if ctx.resume is None else int(json.loads(ctx.resume.files["state.json"])["step"])
    resumed_from = step

    def state() -> State:
        return State(step, {"state.json": json.dumps({"step": step}).encode()})

    ctx.set_state(state)
    if p.mode == "segfault":
        ctx.progress(1, p.steps)
        _recorded(ctx, 1)  # a heartbeat carries the progress to the database first
        ctypes.string_at(0)  # a native library's bug: SIGSEGV kills the whole worker
    if p.mode == "allocate-torch":
        import torch

        ctx.progress(1, p.steps)
        # What a model too big for the machine does: a tensor after another (address
        # space only: torch.empty does not touch the pages).
        held = [torch.empty(256 * 2**20, dtype=torch.uint8) for _ in range(1024)]
        return {"held": len(held)}
    if p.mode == "allocate-python":
        ctx.progress(2, p.steps)
        return {"held": len(bytearray(64 * 2**30))}
    if p.mode == "hang":
        ctx.progress(1, 2)
        # A step of a day: a dead NFS read, a deadlocked DataLoader, an NCCL hang.
        Path(f"{p.flag}.{ctx.attempt}").touch()
        time.sleep(86_400)
    if p.mode == "zombie-model":
        if ctx.attempt == 1:
            ctx.progress(1, 1)
            while not Path(p.flag).exists():  # the test freezes this worker meanwhile
                time.sleep(0.05)
        path = ctx.save_model({"who.json": json.dumps({"worker": ctx.worker}).encode()},
                              {"worker": ctx.worker})
        return {"model": path, "worker": ctx.worker}
    if p.mode == "same-step" and ctx.attempt == 1:
        step = 5
        ctx.progress(step, p.steps)  # a periodic checkpoint (every 5 steps) is taken here
        os.kill(os.getpid(), signal.SIGTERM)
        while not ctx.should_stop():
            time.sleep(0.01)
        ctx.progress(step, p.steps)  # the same boundary again, now after the notice
        ctx.stop()
    while step < p.steps:
        if ctx.should_stop():
            if p.mode == "unwind-error":
                # What a DataLoader whose worker processes got the same SIGTERM raises.
                raise RuntimeError("DataLoader worker (pid 4242) is killed by signal")
            try:
                ctx.stop()
            except Exception:
                # A stop turned into an early success: JobStopped must not land here.
                return {"partial": True, "step": step}
        time.sleep(p.step_seconds)
        step += 1
        ctx.progress(step, p.steps)
    return {"steps": step, "resumed_from": resumed_from}


PIPELINE = run


def install(root: Path) -> str:
    """Publish this pipeline from ``root``; return the PYTHONPATH that finds it."""
    dist = root / "fault_pipelines-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fault-pipelines\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[spotrun.pipelines]\nfaults = fault_pipelines:PIPELINE\n")
    return os.pathsep.join([str(root), str(Path(__file__).parent)])
