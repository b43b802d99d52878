"""procrastinate app for bench_peers.py, configured from the environment.

BENCH_PG_URL          PostgreSQL conninfo of this app's database
BENCH_REDIS           redis URL where the long task records its steps (for the report)
BENCH_HEARTBEAT       worker heartbeat period, s (procrastinate's default 10)
BENCH_STALLED         stalled-worker timeout, s (procrastinate's default 30)
"""

from __future__ import annotations

import asyncio
import os
import time

import redis
from procrastinate import App, PsycopgConnector

PG = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/bench_procrastinate")
_r = redis.Redis.from_url(os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/5"))
WORKER = os.environ.get("BENCH_WORKER", "?")

app = App(
    connector=PsycopgConnector(conninfo=PG),
    worker_defaults={
        "update_heartbeat_interval": float(os.environ.get("BENCH_HEARTBEAT", "10")),
        "stalled_worker_timeout": float(os.environ.get("BENCH_STALLED", "30")),
    },
)


@app.task(name="noop")
def noop() -> None:
    return None


@app.task(name="noop_latency")
def noop_latency(key: str) -> None:
    _r.rpush(key, repr(time.time()))


@app.task(name="sleep_steps")
def sleep_steps(seconds: float, steps: int, run: str) -> None:
    """A sync task: sleeps in steps, no checkpoint."""
    _r.rpush(f"{run}:attempts", f"{time.time()!r} {WORKER}")
    per = seconds / steps
    for _ in range(steps):
        time.sleep(per)
        _r.incr(f"{run}:steps")
    _r.set(f"{run}:done", repr(time.time()))


@app.task(name="sleep_steps_async", retry=3)
async def sleep_steps_async(seconds: float, steps: int, run: str) -> None:
    """The same as an async task with retries: an abort at shutdown is retried at once."""
    _r.rpush(f"{run}:attempts", f"{time.time()!r} {WORKER}")
    per = seconds / steps
    for _ in range(steps):
        await asyncio.sleep(per)
        _r.incr(f"{run}:steps")
    _r.set(f"{run}:done", repr(time.time()))
