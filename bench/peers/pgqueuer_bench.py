"""PgQueuer worker for bench_peers.py: one ``QueueManager`` on its defaults (LISTEN/NOTIFY,
a batch of 10 jobs a fetch, the durable schema) over asyncpg, its primary driver,
configured from the environment.

(Its psycopg driver was slower here by far: 80 jobs/s, 2 s from enqueue to start. Its
NOTIFY watcher waits in ``notifies(timeout=1.0)`` on the connection the worker also
dequeues on, so each query waits behind it.)

BENCH_PG_URL   PostgreSQL conninfo of this worker's database (schema installed already)
BENCH_REDIS    redis URL where the latency task records its start, and the worker that it
               is ready
BENCH_WORKER   this worker's name
BENCH_BATCH    jobs a fetch (PgQueuer's default, 10)
"""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg
import redis
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.models import Job

PG = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/bench_pgqueuer")
_r = redis.Redis.from_url(os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/12"))
WORKER = os.environ.get("BENCH_WORKER", "?")


async def main() -> None:
    conn = await asyncpg.connect(PG)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    @qm.entrypoint("noop_latency")
    async def noop_latency(job: Job) -> None:
        # Its first line, as Celery's latency task (no broker-side start mark).
        assert job.payload is not None
        _r.rpush(job.payload.decode(), repr(time.time()))

    async def ready() -> None:
        await asyncio.sleep(1.0)  # past the first fetch and the LISTEN
        _r.sadd("bench:ready:pgqueuer", WORKER)

    task = asyncio.create_task(ready())
    await qm.run(batch_size=int(os.environ.get("BENCH_BATCH", "10")))
    await task


if __name__ == "__main__":
    asyncio.run(main())
