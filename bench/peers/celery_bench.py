"""Celery app for bench_peers.py, configured from the environment.

BENCH_CELERY_BROKER  redis URL with a database number, e.g. redis://127.0.0.1:6379/2
BENCH_QUEUE          the queue name
BENCH_VT             Redis visibility_timeout in seconds (kombu's default is 3600)

Settings follow Celery's advice for tasks that must survive a lost worker:
acks_late=True, task_reject_on_worker_lost=True, prefetch multiplier 1.
"""

from __future__ import annotations

import os
import socket
import time

import redis
from celery import Celery
from celery.signals import worker_ready

BROKER = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/2")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")

app = Celery("celery_bench", broker=BROKER)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("BENCH_VT", "3600")),
        # Sweep for unacked messages past their visibility timeout every second
        # (defaults: every 10 s, and only every 10th sweep scans: ~100 s).
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)

_r = redis.Redis.from_url(BROKER)


@worker_ready.connect
def _ready(sender: object = None, **_: object) -> None:
    _r.sadd(f"bench:ready:{QUEUE}", os.environ.get("BENCH_WORKER", socket.gethostname()))


@app.task(name="noop")
def noop() -> None:
    return None


@app.task(name="noop_latency")
def noop_latency(key: str) -> None:
    _r.rpush(key, repr(time.time()))


@app.task(name="sleep_steps")
def sleep_steps(seconds: float, steps: int, run: str) -> None:
    """Sleep ``seconds`` in ``steps`` steps; no checkpoint: a retry starts over."""
    _r.rpush(f"{run}:attempts", f"{time.time()!r} {os.environ.get('BENCH_WORKER', '?')}")
    per = seconds / steps
    for _ in range(steps):
        time.sleep(per)
        _r.incr(f"{run}:steps")
    _r.set(f"{run}:done", repr(time.time()))
