"""A bench-only pipeline, ``bench-sleep``: the built-in ``sleep`` pipeline with its state
generated in 64 MB chunks.

Why: ``sleep`` makes its state with ``random.Random(0).randbytes(n)``, which raises
OverflowError on CPython for n >= 268,435,456 bytes (n * 8 bits must fit a C int), so
``state_mb=1000`` fails at start. Loaded into a worker with
``SPOTRUN_IMPORT=bench_state`` and this directory on PYTHONPATH.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from spotrun.pipelines.base import JobContext, State, pipeline
from spotrun.pipelines.registry import registry
from spotrun.pipelines.sleep import SleepParams

CHUNK = 64 * 1024 * 1024


def make_state(nbytes: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    parts = []
    left = nbytes
    while left > 0:
        n = min(CHUNK, left)
        parts.append(rng.randbytes(n))
        left -= n
    return b"".join(parts)


@pipeline("bench-sleep", params=SleepParams, description="sleep, with large state (bench)")
def run(ctx: JobContext) -> dict[str, Any]:
    p = ctx.params
    assert isinstance(p, SleepParams)
    blob = b""
    step = 0
    if ctx.resume is not None:
        step = int(json.loads(ctx.resume.files["state.json"])["step"])
        blob = ctx.resume.files.get("blob.bin", b"")
    elif p.state_mb:
        blob = make_state(int(p.state_mb * 1_000_000))

    def state() -> State:
        files = {"state.json": json.dumps({"step": step}).encode()}
        if blob:
            files["blob.bin"] = blob
        return State(step, files)

    ctx.set_state(state)
    per_step = p.seconds / p.steps
    ctx.progress(step, p.steps)
    while step < p.steps:
        if ctx.should_stop():
            ctx.stop()
        if per_step:
            time.sleep(per_step)
        step += 1
        ctx.progress(step, p.steps)
    return {"slept": p.seconds, "steps": p.steps}


registry()[run.name] = run
