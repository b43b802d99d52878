#!/usr/bin/env python
"""spotrun against Celery (Redis broker), procrastinate and PgQueuer (PostgreSQL), in one run.

(a) No-op jobs with 1 and 4 worker processes: throughput, and enqueue-to-start latency
    with idle workers. ``--rounds`` rounds (default 3), interleaved: each round runs every
    system once per worker count, in an order rotated from round to round, so that the
    machine's slow and fast minutes fall on all of them; the table gives the median.
      * spotrun: ``spotrun worker`` processes on PostgreSQL, the ``sleep`` pipeline with
        seconds=0, steps=1. Jobs queued in one transaction (as bench_queue.py).
      * Celery: ``celery worker --pool=solo`` processes (its fastest pool for no-ops),
        acks_late=True, task_reject_on_worker_lost=True, prefetch multiplier 1, no result
        backend. The jobs are published to a staging list, then moved onto the queue in
        one Redis MULTI, so that all become visible at once.
      * procrastinate: ``procrastinate worker --concurrency 1`` processes; the jobs are
        queued with ``batch_defer`` (one INSERT).
      * PgQueuer: one ``QueueManager`` per process on its defaults (``run(batch_size=10)``,
        LISTEN/NOTIFY, the durable schema) over asyncpg, an async no-op task
        (peers/pgqueuer_bench.py);
        the jobs are queued with one batch ``enqueue`` (one INSERT). Completion: its log's
        'successful' rows (written when a worker flushes its finished jobs); latency: the
        task's first line, as for Celery.
    Throughput = jobs / (commit of the batch -> last completion). Completion: spotrun's
    ``finished_at``, procrastinate's 'succeeded' event (database clock); Celery: the
    moment the queue and its unacked hash are both empty (polled every 5 ms).
    Latency = the queue's start mark minus the wall-clock time just before the enqueue
    call: spotrun ``started_at`` (claim), procrastinate's 'started' event (fetch), Celery
    the task's first line (it has no broker-side start mark). Same host clock for all.

(b) A job of T seconds (default 60) in 0.1 s steps; its worker gets SIGTERM at T/2; a
    second worker is idle and ready. A worker still alive 15 s after SIGTERM is killed
    with SIGKILL (its whole process group), as a spot VM would be. Measured: time from the
    job's first start until it succeeded, against the same job uninterrupted; work redone.
      * spotrun: the ``sleep`` pipeline (seconds=T, steps=10T): checkpoint at the next step
        boundary, hand back, the idle worker resumes.
      * Celery, as documented for acks_late: SIGTERM is a warm shutdown, which waits for
        the task; killed at +15 s; the unacked message is redelivered once its Redis
        visibility_timeout (counted from delivery) has passed. We set it to 1.25 T (must
        exceed the longest task; kombu's default 3600 s would mean an hour) and sweep every
        second (kombu's default sweep is ~100 s). prefork pool, concurrency 1.
      * Celery, cold shutdown (REMAP_SIGTERM=SIGQUIT, Celery >= 5.5): SIGTERM cancels the
        task and the unacked message is restored to the queue at once; it restarts from
        the beginning.
      * procrastinate, defaults: SIGTERM waits for the job (shutdown_graceful_timeout
        None); killed at +15 s; the job stays 'doing' until a stalled-job sweep (the
        documented recipe: get_stalled_jobs() + retry_job(), here run every second by this
        script) sees the worker's heartbeat older than 30 s (heartbeat every 10 s); the
        idle worker then fetches it on its next poll (5 s; retry_job sends no NOTIFY).
      * procrastinate, tuned: an async task with retry, workers with
        --shutdown-graceful-timeout 0: SIGTERM cancels the task, which is retried at once.
    The scenarios use sleeps, not CPU, so they run concurrently (--serial to not).
    PgQueuer has no part in (b).

(p) One producer, no workers: jobs queued a second, one call a job (spotrun
    ``JobStore.submit``, PgQueuer ``Queries.enqueue``), and in calls of 100
    (``JobStore.submit_many``, ``enqueue`` with lists). Interleaved rounds as in (a).

    python bench/bench_peers.py            # full run
    python bench/bench_peers.py --quick    # T=12 s, fewer jobs
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH,
    REDIS_URL,
    RESULTS,
    Children,
    Run,
    bulk_submit,
    drop_pg_database,
    fresh_pg_database,
    install_cleanup,
    loadavg,
    pct,
    spotrun_argv,
    spotrun_ready_workers,
    table,
    wait_until,
)

PEERS = BENCH / "peers"
# Alembic keeps module-global state: two threads of this process must not migrate at once.
_MIGRATE = __import__("threading").Lock()
LOGS = RESULTS / "logs"


def _redis(db: int) -> Any:
    import redis

    return redis.Redis.from_url(f"{REDIS_URL}/{db}")


# ===================================================================== spotrun

def _sql(url: str, q: str, *params: Any) -> list[Any]:
    """The rows of one query on a connection of its own (a peer's tables)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        return c.execute(q, params).fetchall()


class Spotrun:
    name = "spotrun"

    def __init__(self, children: Children, db: str, n: int, tag: str,
                 extra: list[str] | None = None) -> None:
        from spotrun.store import JobStore

        self.children, self.tag = children, tag
        self.home = Path(tempfile.mkdtemp(prefix=f"bench-peers-{tag}-"))
        with _MIGRATE:
            self.url = fresh_pg_database(db)
            self.db = db
            self.store = JobStore.open(self.url)
        self.procs: dict[str, Any] = {}
        for i in range(n):
            name = f"{tag}-{i}"
            self.procs[name] = children.start(
                [*spotrun_argv(self.url), "worker", "--name", name, "--no-preload",
                 *(extra or [])],
                env={"SPOTRUN_HOME": str(self.home)}, log=LOGS / f"peers-{name}.log")
        wait_until(lambda: spotrun_ready_workers(self.store, n), 120, f"{n} spotrun workers")

    def close(self) -> None:
        for p in self.procs.values():
            self.children.stop(p)
        self.store.close()
        drop_pg_database(self.db)
        shutil.rmtree(self.home, ignore_errors=True)

    def throughput(self, m: int) -> dict[str, float]:
        import sqlalchemy as sa

        from spotrun.schema import jobs

        commit = bulk_submit(self.store, m, "sleep", {"seconds": 0, "steps": 1})

        def done() -> bool:
            with self.store.engine.connect() as c:
                return c.execute(sa.select(sa.func.count()).select_from(jobs).where(
                    jobs.c.state.in_(("queued", "running")))).scalar_one() == 0

        wait_until(done, 900, "spotrun jobs", interval=0.02)
        with self.store.engine.connect() as c:
            end, ok = c.execute(sa.select(sa.func.max(jobs.c.finished_at), sa.func.count())
                                .where(jobs.c.state == "succeeded")).one()
        return {"jobs": int(ok), "seconds": float(end) - commit,
                "jobs_per_s": int(ok) / (float(end) - commit)}

    def produce(self, n: int, batch: int) -> dict[str, float]:
        from spotrun.store import NewJob

        params = {"seconds": 0, "steps": 1}
        t0 = time.perf_counter()
        if batch == 1:
            for _ in range(n):
                self.store.submit("sleep", params)
        else:
            for _ in range(n // batch):
                self.store.submit_many([NewJob("sleep", params) for _ in range(batch)])
        dt = time.perf_counter() - t0
        return {"jobs": n // batch * batch, "seconds": dt, "jobs_per_s": n // batch * batch / dt}

    def latency_once(self) -> float:
        import sqlalchemy as sa

        from spotrun.schema import jobs

        t0 = time.time()
        job = self.store.submit("sleep", {"seconds": 0, "steps": 1})

        def started() -> Any:
            with self.store.engine.connect() as c:
                return c.execute(sa.select(jobs.c.started_at).where(
                    jobs.c.id == job.id, jobs.c.state == "succeeded")).scalar()

        # started_at is the database's own record of the claim: when this loop looks does
        # not change it, so the loop looks rarely, and does not compete on two cores with
        # the submit, the wake-up and the claim it measures (the peers' marks come by a
        # blocking BLPOP, which costs nothing while it waits).
        return float(wait_until(started, 60, "a spotrun job", interval=0.02)) - t0

    # ---- preemption scenario
    def long_job(self, seconds: float, kill_at: float | None, grace: float) -> dict[str, Any]:
        job = self.store.submit("sleep", {"seconds": seconds, "steps": int(seconds * 10)})
        j = wait_until(lambda: (lambda x: x if x.state.value in ("running", "succeeded")
                                else None)(self.store.get(job.id)), 60, "job start")
        started = j.created_at  # replaced below by the started event's time
        evs = self.store.get(job.id).events
        started = next(e.at for e in evs if e.kind == "started").timestamp()
        sent = None
        exit_after = None
        if kill_at is not None:
            while time.time() < started + kill_at:
                time.sleep(0.01)
            proc = self.procs[j.worker]
            sent = time.time()
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except Exception:
                Children.signal_group(proc, signal.SIGKILL)
                proc.wait(5)
            exit_after = time.time() - sent
        final = wait_until(lambda: (lambda x: x if x.state.value in (
            "succeeded", "failed") else None)(self.store.get(job.id)), seconds * 4 + 120,
            "the long spotrun job")
        end = next(e.at for e in reversed(final.events) if e.kind == "succeeded").timestamp()
        from spotrun.events import end_step, payload_of, start_step

        redone = 0.0
        for e in final.events:
            if e.kind == "preempted":
                at_step = end_step(payload_of(e)) or 0
                nxt = next((x for x in final.events if x.kind in ("resumed", "started")
                            and x.at > e.at), None)
                from_step = start_step(payload_of(nxt)) if nxt else 0
                redone += (at_step - from_step) / 10.0
        return {"state": final.state.value, "total_s": end - started,
                "redone_s": redone, "attempts": final.attempt,
                "sigterm_to_exit_s": exit_after,
                "events": [f"{e.at.timestamp() - started:7.2f} {e.kind}: {e.message}"
                           for e in final.events]}


# ====================================================================== Celery

class CeleryPeer:
    name = "celery"

    def __init__(self, children: Children, db: int, n: int, tag: str, *, pool: str = "solo",
                 vt: float = 3600, cold: bool = False) -> None:
        self.children, self.tag, self.dbn = children, tag, db
        self.r = _redis(db)
        self.r.flushdb()
        self.queue = f"bench-{tag}"
        self.broker = f"{REDIS_URL}/{db}"
        self.procs: dict[str, Any] = {}
        for i in range(n):
            name = f"{tag}-{i}"
            env = {"BENCH_CELERY_BROKER": self.broker, "BENCH_QUEUE": self.queue,
                   "BENCH_VT": str(vt), "BENCH_WORKER": name, "PYTHONPATH": str(PEERS)}
            if cold:
                env["REMAP_SIGTERM"] = "SIGQUIT"
            self.procs[name] = children.start(
                [sys.executable, "-m", "celery", "-A", "celery_bench", "worker",
                 f"--pool={pool}", "--concurrency=1", "-Q", self.queue, "-n", f"{name}@%h",
                 "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "--loglevel=WARNING"],
                env=env, log=LOGS / f"peers-{name}.log", cwd=PEERS)
        wait_until(lambda: self.r.scard(f"bench:ready:{self.queue}") >= n, 120,
                   f"{n} celery workers")
        sys.path.insert(0, str(PEERS))
        os.environ["BENCH_CELERY_BROKER"] = self.broker  # for the client app below
        os.environ["BENCH_QUEUE"] = self.queue

    def _app(self) -> Any:
        from celery import Celery

        app = Celery("client", broker=self.broker)
        app.conf.update(task_default_queue=self.queue, task_ignore_result=True)
        return app

    def close(self) -> None:
        for p in self.procs.values():
            self.children.stop(p)
        self.r.flushdb()

    def throughput(self, m: int) -> dict[str, float]:
        import json

        app = self._app()
        stage = f"{self.queue}-stage"
        with app.producer_or_acquire() as prod:
            for _ in range(m):
                app.send_task("noop", queue=stage, producer=prod)
        raw = self.r.lrange(stage, 0, -1)
        msgs = []
        for b in raw:
            msg = json.loads(b)
            msg["properties"]["delivery_info"]["routing_key"] = self.queue
            msgs.append(json.dumps(msg))
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(self.queue, *msgs)
        pipe.delete(stage)
        pipe.execute()
        commit = time.time()
        while True:
            p = self.r.pipeline(transaction=False)
            p.llen(self.queue)
            p.hlen("unacked")
            left, unacked = p.execute()
            if left == 0 and unacked == 0:
                break
            time.sleep(0.005)
        end = time.time()
        return {"jobs": len(msgs), "seconds": end - commit,
                "jobs_per_s": len(msgs) / (end - commit)}

    def latency_once(self) -> float:
        key = f"lat:{secrets.token_hex(4)}"
        app = self._app()
        t0 = time.time()
        app.send_task("noop_latency", args=[key])
        _, val = self.r.blpop([key], timeout=60)
        wait_until(lambda: self.r.hlen("unacked") == 0 and self.r.llen(self.queue) == 0,
                   30, "celery ack", interval=0.002)
        return float(val) - t0

    def long_job(self, seconds: float, kill_at: float | None, grace: float) -> dict[str, Any]:
        run = f"run:{secrets.token_hex(4)}"
        self._app().send_task("sleep_steps", args=[seconds, int(seconds * 10), run])
        return _peer_long_job(self.r, self.procs, run, seconds, kill_at, grace)


# =============================================================== procrastinate

class ProcrastinatePeer:
    name = "procrastinate"

    def __init__(self, children: Children, db: str, n: int, tag: str, *,
                 redis_db: int = 5, graceful: float | None = None,
                 heartbeat: float = 10, stalled: float = 30) -> None:
        import procrastinate

        self.children, self.tag, self.db = children, tag, db
        self.url = fresh_pg_database(db)
        self.r = _redis(redis_db)
        self.r.flushdb()
        self.redis_url = f"{REDIS_URL}/{redis_db}"
        self.stalled = stalled
        self.app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(
            conninfo=self.url))
        self.app.open()
        self.app.schema_manager.apply_schema()
        self.procs: dict[str, Any] = {}
        for i in range(n):
            name = f"{tag}-{i}"
            argv = [sys.executable, "-m", "procrastinate", "--app=procrastinate_bench.app",
                    "worker", "--concurrency", "1", "--name", name]
            if graceful is not None:
                argv += ["--shutdown-graceful-timeout", str(graceful)]
            self.procs[name] = children.start(
                argv, env={"BENCH_PG_URL": self.url, "BENCH_REDIS": self.redis_url,
                           "BENCH_WORKER": name, "PYTHONPATH": str(PEERS),
                           "BENCH_HEARTBEAT": str(heartbeat), "BENCH_STALLED": str(stalled)},
                log=LOGS / f"peers-{name}.log", cwd=PEERS)
        wait_until(lambda: self._sql("SELECT count(*) FROM procrastinate_workers")[0][0] >= n,
                   120, f"{n} procrastinate workers")
        time.sleep(0.3)

    def _sql(self, q: str, *params: Any) -> list[Any]:
        return _sql(self.url, q, *params)

    def close(self) -> None:
        for p in self.procs.values():
            self.children.stop(p)
        self.app.close()
        drop_pg_database(self.db)
        self.r.flushdb()

    def throughput(self, m: int) -> dict[str, float]:
        self.app.configure_task("noop").batch_defer(*({} for _ in range(m)))
        commit = time.time()
        wait_until(lambda: self._sql("SELECT count(*) FROM procrastinate_jobs WHERE status "
                                     "IN ('todo','doing')")[0][0] == 0, 900,
                   "procrastinate jobs", interval=0.02)
        (end, ok), = self._sql("SELECT extract(epoch FROM max(e.at)), count(*) FROM "
                               "procrastinate_events e WHERE e.type = 'succeeded'")
        return {"jobs": int(ok), "seconds": float(end) - commit,
                "jobs_per_s": int(ok) / (float(end) - commit)}

    def latency_once(self) -> float:
        t0 = time.time()
        job_id = self.app.configure_task("noop").defer()

        def started() -> Any:
            rows = self._sql("SELECT extract(epoch FROM at) FROM procrastinate_events "
                             "WHERE job_id = %s AND type = 'started'", job_id)
            done = self._sql("SELECT status FROM procrastinate_jobs WHERE id = %s", job_id)
            return rows[0][0] if rows and done[0][0] == "succeeded" else None

        return float(wait_until(started, 60, "a procrastinate job", interval=0.002)) - t0

    def long_job(self, seconds: float, kill_at: float | None, grace: float, *,
                 task: str = "sleep_steps") -> dict[str, Any]:
        import asyncio
        import threading

        run = f"run:{secrets.token_hex(4)}"
        self.app.configure_task(task).defer(seconds=seconds, steps=int(seconds * 10),
                                            run=run)
        stop = threading.Event()
        retried: list[float] = []

        def sweeper() -> None:
            # procrastinate's documented recipe for stalled jobs, run every second.
            import procrastinate

            app = procrastinate.App(connector=procrastinate.PsycopgConnector(
                conninfo=self.url))

            async def loop() -> None:
                async with app.open_async():
                    while not stop.is_set():
                        for job in await app.job_manager.get_stalled_jobs(
                                seconds_since_heartbeat=self.stalled):
                            await app.job_manager.retry_job(job)
                            retried.append(time.time())
                        await asyncio.sleep(1.0)

            asyncio.run(loop())

        t = threading.Thread(target=sweeper, daemon=True)
        t.start()
        try:
            out = _peer_long_job(self.r, self.procs, run, seconds, kill_at, grace)
        finally:
            stop.set()
            t.join(5)
        out["stalled_sweep_retried_at"] = [x for x in retried]
        return out


# ==================================================================== PgQueuer

class PgQueuerPeer:
    name = "pgqueuer"

    def __init__(self, children: Children, db: str, n: int, tag: str, *,
                 redis_db: int = 12) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        self.children, self.tag, self.db = children, tag, db
        self.url = fresh_pg_database(db)
        self.r = _redis(redis_db)
        self.r.flushdb()
        self.loop = asyncio.new_event_loop()
        # asyncpg, PgQueuer's primary driver (see peers/pgqueuer_bench.py), for its
        # producer too.
        self.aconn = self.loop.run_until_complete(asyncpg.connect(self.url))
        self.q = Queries(AsyncpgDriver(self.aconn))
        self.loop.run_until_complete(self.q.install())  # the default: durable
        self.procs: dict[str, Any] = {}
        for i in range(n):
            name = f"{tag}-{i}"
            self.procs[name] = children.start(
                [sys.executable, str(PEERS / "pgqueuer_bench.py")],
                env={"BENCH_PG_URL": self.url, "BENCH_REDIS": f"{REDIS_URL}/{redis_db}",
                     "BENCH_WORKER": name, "PYTHONPATH": str(PEERS)},
                log=LOGS / f"peers-{name}.log", cwd=PEERS)
        wait_until(lambda: self.r.scard("bench:ready:pgqueuer") >= n, 120,
                   f"{n} pgqueuer workers")

    def _sql(self, q: str, *params: Any) -> list[Any]:
        return _sql(self.url, q, *params)

    def close(self) -> None:
        for p in self.procs.values():
            self.children.stop(p)
        self.loop.run_until_complete(self.aconn.close())
        self.loop.close()
        drop_pg_database(self.db)
        self.r.flushdb()

    def _left(self) -> int:
        return int(self._sql("SELECT count(*) FROM pgqueuer")[0][0])

    def throughput(self, m: int) -> dict[str, float]:
        self.loop.run_until_complete(self.q.enqueue(["noop"] * m, [None] * m, [0] * m))
        commit = time.time()
        wait_until(lambda: self._left() == 0, 900, "pgqueuer jobs", interval=0.02)
        (end, ok), = self._sql("SELECT extract(epoch FROM max(created)), count(*) FROM "
                               "pgqueuer_log WHERE status = 'successful'")
        return {"jobs": int(ok), "seconds": float(end) - commit,
                "jobs_per_s": int(ok) / (float(end) - commit)}

    def latency_once(self) -> float:
        key = f"lat:{secrets.token_hex(4)}"
        t0 = time.time()
        self.loop.run_until_complete(self.q.enqueue("noop_latency", key.encode()))
        _, val = self.r.blpop([key], timeout=60)
        wait_until(lambda: self._left() == 0, 30, "pgqueuer done", interval=0.002)
        return float(val) - t0

    def produce(self, n: int, batch: int) -> dict[str, float]:
        async def go() -> None:
            if batch == 1:
                for _ in range(n):
                    await self.q.enqueue("noop", None)
            else:
                for _ in range(n // batch):
                    await self.q.enqueue(["noop"] * batch, [None] * batch, [0] * batch)

        t0 = time.perf_counter()
        self.loop.run_until_complete(go())
        dt = time.perf_counter() - t0
        return {"jobs": n // batch * batch, "seconds": dt, "jobs_per_s": n // batch * batch / dt}


def _peer_long_job(r: Any, procs: dict[str, Any], run: str, seconds: float,
                   kill_at: float | None, grace: float) -> dict[str, Any]:
    first = wait_until(lambda: r.lindex(f"{run}:attempts", 0), 60, "the peer job to start")
    t_start, worker = first.decode().split()
    started = float(t_start)
    exit_after = None
    if kill_at is not None:
        while time.time() < started + kill_at:
            time.sleep(0.01)
        proc = procs[worker]
        sent = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
            exit_after = time.time() - sent
        except Exception:
            Children.signal_group(proc, signal.SIGKILL)
            proc.wait(5)
            exit_after = None  # killed
    done = wait_until(lambda: r.get(f"{run}:done"), seconds * 6 + 300, "the peer job to end",
                      interval=0.05)
    steps = int(r.get(f"{run}:steps") or 0)
    attempts = [a.decode() for a in r.lrange(f"{run}:attempts", 0, -1)]
    return {"state": "succeeded", "total_s": float(done) - started,
            "redone_s": (steps - int(seconds * 10)) / 10.0, "attempts": len(attempts),
            "sigterm_to_exit_s": exit_after,
            "attempt_starts_s": [round(float(a.split()[0]) - started, 2) for a in attempts]}


# ===================================================================== driver

def _peer(system: str, children: Children, n: int, tag: str) -> Any:
    if system == "spotrun":
        return Spotrun(children, "bench_peers_spotrun", n, tag)
    if system == "celery":
        return CeleryPeer(children, 4, n, tag, pool="solo")
    if system == "pgqueuer":
        return PgQueuerPeer(children, "bench_peers_pgqueuer", n, tag)
    return ProcrastinatePeer(children, "bench_peers_procrastinate", n, tag)


def _rotated(systems: list[str], rnd: int) -> list[str]:
    k = rnd % len(systems)
    return systems[k:] + systems[:k]


def part_a(args: argparse.Namespace, children: Children) -> list[dict[str, Any]]:
    rows = []
    for rnd in range(args.rounds):
        for n in args.workers:
            for system in _rotated(args.systems, rnd):
                peer = _peer(system, children, n, f"{system[:3]}{n}r{rnd}")
                try:
                    time.sleep(0.5)
                    tp = peer.throughput(args.jobs)
                    lats = []
                    for _ in range(args.samples):
                        lats.append(peer.latency_once())
                        time.sleep(args.gap)
                finally:
                    peer.close()
                row = {"system": system, "workers": n, "round": rnd, **tp,
                       "lat_p50_ms": pct(lats, 50) * 1e3, "lat_p99_ms": pct(lats, 99) * 1e3,
                       "latencies_ms": [x * 1e3 for x in lats], "loadavg": loadavg()}
                print(f"  (a) round {rnd + 1} {system} x{n}: {tp['jobs_per_s']:.0f} jobs/s, "
                      f"latency p50 {row['lat_p50_ms']:.1f} ms p99 {row['lat_p99_ms']:.1f} ms"
                      f" (load {row['loadavg']})", flush=True)
                rows.append(row)
    return rows


def summary_a(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per system and worker count: median throughput of the rounds, latency percentiles
    of all their samples together."""
    out = []
    keys = sorted({(r["workers"], r["system"]) for r in rows},
                  key=lambda k: (k[0], ORDER.index(k[1]) if k[1] in ORDER else 99))
    for n, system in keys:
        mine = [r for r in rows if (r["workers"], r["system"]) == (n, system)]
        lats = [x for r in mine for x in r["latencies_ms"]]
        out.append({"system": system, "workers": n,
                    "runs": [r["jobs_per_s"] for r in mine],
                    "jobs_per_s": pct([r["jobs_per_s"] for r in mine], 50),
                    "lat_p50_ms": pct(lats, 50), "lat_p99_ms": pct(lats, 99)})
    return out


def part_p(args: argparse.Namespace, children: Children) -> list[dict[str, Any]]:
    rows = []
    systems = [s for s in args.systems if s in ("spotrun", "pgqueuer")]
    for rnd in range(args.rounds):
        for system in _rotated(systems, rnd):
            peer = _peer(system, children, 0, f"{system[:3]}p{rnd}")
            try:
                for batch in (1, 100):
                    n = args.produce if batch == 1 else args.produce * 5
                    got = peer.produce(n, batch)
                    row = {"system": system, "batch": batch, "round": rnd, **got,
                           "loadavg": loadavg()}
                    print(f"  (p) round {rnd + 1} {system}, {batch} a call: "
                          f"{got['jobs_per_s']:.0f} jobs/s (load {row['loadavg']})",
                          flush=True)
                    rows.append(row)
            finally:
                peer.close()
    return rows


def summary_p(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        for system in ("spotrun", "pgqueuer"):
            mine = [r for r in rows if (r["batch"], r["system"]) == (batch, system)]
            if mine:
                out.append({"system": system, "batch": batch,
                            "runs": [r["jobs_per_s"] for r in mine],
                            "jobs_per_s": pct([r["jobs_per_s"] for r in mine], 50)})
    return out


def goals(a: list[dict[str, Any]], p: list[dict[str, Any]]) -> list[list[Any]]:
    """The issue's goals as ratios of this run's medians (>= 1 holds)."""
    def get(rows: list[dict[str, Any]], **k: Any) -> dict[str, Any] | None:
        return next((r for r in rows if all(r[x] == v for x, v in k.items())), None)

    out: list[list[Any]] = []
    for n in sorted({r["workers"] for r in a}):
        s, q, c = (get(a, system=x, workers=n) for x in ("spotrun", "pgqueuer", "celery"))
        if s and q:
            ratio = s["jobs_per_s"] / q["jobs_per_s"]
            out.append([f"no-op throughput, {n} worker(s): spotrun ÷ PgQueuer", ratio,
                        "holds" if ratio >= 1 else "does not hold"])
        if s and c:
            ratio = c["lat_p50_ms"] / s["lat_p50_ms"]
            out.append([f"start latency p50, {n} worker(s): Celery's ÷ spotrun's", ratio,
                        "holds" if ratio >= 1 else "does not hold"])
    for batch in (1, 100):
        s, q = get(p, system="spotrun", batch=batch), get(p, system="pgqueuer", batch=batch)
        if s and q:
            ratio = s["jobs_per_s"] / q["jobs_per_s"]
            out.append([f"one producer, {batch} a call: spotrun ÷ PgQueuer", ratio,
                        "holds" if ratio >= 1 else "does not hold"])
    return out


ORDER = ["spotrun", "celery", "procrastinate", "pgqueuer"]


def part_b(args: argparse.Namespace, children: Children) -> list[dict[str, Any]]:
    T, grace = args.seconds, args.grace
    kill_at = T / 2
    quick = args.quick
    hb, stalled = (2.0, 6.0) if quick else (10.0, 30.0)

    def spot(kill: bool, tag: str) -> dict[str, Any]:
        s = Spotrun(children, f"bench_peers_{tag}", 2, tag,
                    extra=["--grace-seconds", str(grace)])
        try:
            return s.long_job(T, kill_at if kill else None, grace)
        finally:
            s.close()

    def cel(kill: bool, tag: str, db: int, cold: bool) -> dict[str, Any]:
        c = CeleryPeer(children, db, 2, tag, pool="prefork", vt=1.25 * T, cold=cold)
        try:
            return c.long_job(T, kill_at if kill else None, grace)
        finally:
            c.close()

    def pro(kill: bool, tag: str, rdb: int, tuned: bool) -> dict[str, Any]:
        p = ProcrastinatePeer(children, f"bench_peers_{tag}", 2, tag, redis_db=rdb,
                              graceful=0 if tuned else None, heartbeat=hb, stalled=stalled)
        try:
            return p.long_job(T, kill_at if kill else None, grace,
                              task="sleep_steps_async" if tuned else "sleep_steps")
        finally:
            p.close()

    scenarios = {
        ("spotrun", "uninterrupted"): lambda: spot(False, "sp_base"),
        ("spotrun", "SIGTERM at T/2"): lambda: spot(True, "sp_pre"),
        ("celery", "uninterrupted"): lambda: cel(False, "ce_base", 6, False),
        ("celery", "SIGTERM at T/2, warm shutdown, SIGKILL +15 s, visibility timeout"):
            lambda: cel(True, "ce_warm", 7, False),
        ("celery", "SIGTERM at T/2, cold shutdown (REMAP_SIGTERM=SIGQUIT)"):
            lambda: cel(True, "ce_cold", 8, True),
        ("procrastinate", "uninterrupted"): lambda: pro(False, "pr_base", 9, False),
        ("procrastinate", "SIGTERM at T/2, graceful wait, SIGKILL +15 s, stalled-job sweep"):
            lambda: pro(True, "pr_def", 10, False),
        ("procrastinate", "SIGTERM at T/2, --shutdown-graceful-timeout 0, async task, retry"):
            lambda: pro(True, "pr_tun", 11, True),
    }
    scenarios = {k: v for k, v in scenarios.items() if k[0] in args.systems}
    out: dict[tuple[str, str], Any] = {}
    if args.serial:
        for k, fn in scenarios.items():
            out[k] = fn()
    else:
        with cf.ThreadPoolExecutor(len(scenarios)) as ex:
            futs = {k: ex.submit(fn) for k, fn in scenarios.items()}
            for k, f in futs.items():
                out[k] = f.result()
    rows = []
    for (system, case), res in out.items():
        base = out.get((system, "uninterrupted"))
        res.update(system=system, case=case,
                   ratio=res["total_s"] / base["total_s"] if base else float("nan"))
        print(f"  (b) {system} / {case}: {res['total_s']:.1f} s, x{res['ratio']:.3f}, "
              f"redone {res['redone_s']:.1f} s", flush=True)
        rows.append(res)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="a,p,b")
    ap.add_argument("--systems", default="spotrun,celery,procrastinate,pgqueuer")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a), (p)")
    ap.add_argument("--produce", type=int, default=None,
                    help="jobs one producer queues one at a time in (p) [1000]")
    ap.add_argument("--workers", default="1,4")
    ap.add_argument("--jobs", type=int, default=None, help="no-op jobs per throughput run")
    ap.add_argument("--samples", type=int, default=None, help="latency samples")
    ap.add_argument("--gap", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=None, help="long job length T [60]")
    ap.add_argument("--grace", type=float, default=15.0,
                    help="seconds after SIGTERM before SIGKILL")
    ap.add_argument("--serial", action="store_true", help="run the (b) scenarios one by one")
    args = ap.parse_args()
    args.systems = args.systems.split(",")
    args.workers = [int(x) for x in args.workers.split(",")]
    args.jobs = args.jobs or (300 if args.quick else 3000)
    args.produce = args.produce or (200 if args.quick else 1000)
    args.samples = args.samples or (20 if args.quick else 100)
    args.seconds = args.seconds or (12.0 if args.quick else 60.0)
    if args.quick and args.grace == 15.0:
        args.grace = 3.0
    install_cleanup()
    run = Run("bench_peers", args)
    print(run.header(), flush=True)
    mds = []
    with Children() as children:
        a: list[dict[str, Any]] = []
        p: list[dict[str, Any]] = []
        if "a" in args.parts:
            run.results["a"] = part_a(args, children)
            a = summary_a(run.results["a"])
            run.results["a_summary"] = a
            base = {(r["workers"]): r for r in a if r["system"] == "spotrun"}
            mds.append(table(
                ["system", "workers", "jobs a run", "jobs/s, median of the rounds",
                 "each round", "spotrun's jobs/s ÷ this", "start latency p50 ms", "p99 ms"],
                [[r["system"], r["workers"], args.jobs, r["jobs_per_s"],
                  ", ".join(f"{x:.0f}" for x in r["runs"]),
                  (base[r["workers"]]["jobs_per_s"] / r["jobs_per_s"])
                  if r["workers"] in base else float("nan"),
                  r["lat_p50_ms"], r["lat_p99_ms"]] for r in a]))
        if "p" in args.parts:
            run.results["p"] = part_p(args, children)
            p = summary_p(run.results["p"])
            run.results["p_summary"] = p
            mds.append(table(
                ["system", "jobs a call", "jobs/s, median of the rounds", "each round"],
                [[r["system"], r["batch"], r["jobs_per_s"],
                  ", ".join(f"{x:.0f}" for x in r["runs"])] for r in p]))
        if a or p:
            run.results["goals"] = goals(a, p)
            mds.append(table(["goal", "ratio (>= 1 holds)", "verdict"],
                             [[g, f"{r:.2f}", v] for g, r, v in run.results["goals"]]))
        if "b" in args.parts:
            b = part_b(args, children)
            run.results["b"] = b
            mds.append(table(
                ["system", "case", "first start → succeeded, s", "÷ uninterrupted",
                 "work redone, s", "attempts", "SIGTERM → exit, s"],
                [[r["system"], r["case"], r["total_s"], f"{r['ratio']:.3f}", r["redone_s"],
                  r["attempts"], "killed" if r["sigterm_to_exit_s"] is None
                  and "SIGTERM" in r["case"] else (r["sigterm_to_exit_s"] or "-")]
                 for r in b]))
    run.finish("\n\n".join(mds), extra_versions=("pgqueuer", "asyncpg"))


if __name__ == "__main__":
    main()
