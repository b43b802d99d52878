"""``sleep``: waits, in steps; for tests, benchmarks and drills.

With ``state_mb`` it holds that much state and checkpoints it, to measure hand-offs of
large jobs without an ML library.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from pydantic import Field

from spotrun.pipelines.base import JobContext, Params, State, pipeline


class SleepParams(Params):
    seconds: float = Field(1.0, ge=0, le=86_400, description="total time to sleep")
    steps: int = Field(10, ge=1, le=1_000_000, description="steps the sleep is cut into")
    state_mb: float = Field(0, ge=0, le=16_384, description="MB of state held and checkpointed")
    fail: bool = Field(False, description="raise an error at the end (for tests)")


def make_state(nbytes: int, seed: int = 0) -> bytes:
    """``nbytes`` of reproducible pseudo-random state (data a disk cannot compress)."""
    rng, chunk = random.Random(seed), 64 << 20
    # In pieces: one randbytes call is limited to about 256 MB.
    return b"".join(rng.randbytes(min(chunk, nbytes - i)) for i in range(0, nbytes, chunk))


@pipeline("sleep", params=SleepParams, description="Sleep for a while, in steps")
def run(ctx: JobContext) -> dict[str, Any]:
    p = ctx.params
    assert isinstance(p, SleepParams)
    blob = b""
    start_step = 0
    if ctx.resume is not None:
        meta = json.loads(ctx.resume.files["state.json"])
        start_step = int(meta["step"])
        blob = ctx.resume.files.get("blob.bin", b"")
    elif p.state_mb:
        blob = make_state(int(p.state_mb * 1_000_000))
    if blob:
        ctx.log.info("holding %.0f MB of state", len(blob) / 1e6)

    step = start_step

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
    if p.fail:
        raise RuntimeError("failing as asked (fail=true)")
    return {"slept": p.seconds, "steps": p.steps, "resumed_from": start_step}


PIPELINE = run
