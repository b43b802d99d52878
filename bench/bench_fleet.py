"""Fleet load: N simulated workers making the real worker's store calls at their real rates
against one PostgreSQL, and what the database pays for them.

Each simulated worker is an asyncio task, not a thread: a few processes each run
thousands of them, sending the store's own statements (its one-statement heartbeat and its
claim, with the parameters the store builds) on a few connections in autocommit, as the
store sends them and as a pooler's server connections would carry them. A busy worker
holds one job and, like the real reporter, beats every heartbeat with its progress (one
transaction); an idle worker beats every idle heartbeat and polls for a claim, jittered,
as the real claim loop does when no wake-up comes; the one that holds the sweeper lease
beats every heartbeat and sweeps (through the store, when its beat says there is work).
No ML libraries, no pipelines: only the store. Set-up (registering, the busy workers'
claims) goes through the store's public calls.

Reported per N: database transactions per second (``pg_stat_database``), PostgreSQL's CPU
(its processes' ``/proc`` times), heartbeat lateness p50/p99 (from when the beat was due
to when its answer came back: a generator or a database that falls behind shows here, as
it would for a real worker), leases lost (heartbeats refused, progress refused, lease
expiries in the jobs' histories), and the largest N held: no lease lost and heartbeat p99
under 1 s.

    python bench/bench_fleet.py --workers 1000,2500,5000 --seconds 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

IDLE_POOL = "bench-idle"


def _pg_cpu() -> dict[int, float]:
    """CPU seconds used so far by each PostgreSQL process on this machine, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (d / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            if not name.startswith("postgres"):
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu_between(a: dict[int, float], b: dict[int, float]) -> float:
    """CPU seconds PostgreSQL spent between two samples (a process that ended in between
    is missed; one that started is counted whole)."""
    return sum(v - a.get(pid, 0.0) for pid, v in b.items())


def _xacts(url: str) -> int:
    import psycopg

    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(C.PG_ADMIN, autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                           "WHERE datname = %s", (dbname,)).fetchone()
    return int(row[0]) if row else 0


class _Vacuum:
    """Vacuums the fleet's hot tables every ``every`` seconds on a thread of its own: the
    stand-in for autovacuum, which this machine's server runs with off (a managed server
    runs it). Without it every beat's update leaves a dead row and index entries behind
    that the next lookups wade through (measured: a beat's server CPU 0.7 ms against
    0.22 ms vacuumed). Its CPU is PostgreSQL's, counted with the rest."""

    TABLES = "jobs, workers, job_metrics, intake_leases"

    def __init__(self, url: str, every: float) -> None:
        self.transactions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, every), daemon=True)
        if every > 0:
            self._thread.start()

    def _run(self, url: str, every: float) -> None:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            while not self._stop.wait(every):
                conn.execute(f"VACUUM {self.TABLES}")
                self.transactions += len(self.TABLES.split(","))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# ------------------------------------------------------------------ one child process


def _child(args: argparse.Namespace) -> None:
    """Simulate ``args.n`` workers (``args.busy`` of them busy) until the run's end."""
    import asyncio

    from spotrun.config import Settings
    from spotrun.store import JobStore

    defaults = Settings(home=Path("."), database_url=args.url, checkpoint_url=".")
    lease_s = args.lease
    # Set up as the workers do, through the store: registered, each busy one with a job.
    # Leases and sign-of-life windows long enough to outlast the whole fleet's set-up
    # (a minute and more for thousands): the first beat of the run sets the real ones.
    setup_s = 3600.0
    store = JobStore.open(args.url, migrate=False, pool_size=2, pre_ping=False)
    ids = [store.register_worker(name=f"sim-{os.getpid()}-{i}", host="bench", pid=os.getpid(),
                                 pool="default", has_cuda=False, lease_seconds=setup_s)
           for i in range(args.n)]
    leases: dict[int, Any] = {}
    for i in range(args.busy):
        got = store.claim(worker_id=ids[i], worker_name=f"sim-{i}", lease_seconds=setup_s)
        if got is None:
            sys.exit("no job to claim for a busy worker")
        leases[i] = got[0]
    # The first beat of a new fleet makes the sweeper lease's row (the store's own path).
    store.beat(ids[0], [], lease_s, alive_for=3 * defaults.idle_heartbeat_seconds,
               sweeper=True)
    print(json.dumps({"ready": True}), flush=True)
    go = float(sys.stdin.readline())  # the fleet's common start, on the wall clock
    time.sleep(max(0.0, go - time.time()))
    try:
        res = asyncio.run(_simulate(args, store, ids, leases, defaults.idle_heartbeat_seconds,
                                    defaults.idle_poll_seconds))
    finally:
        store.close()
    print(json.dumps(res), flush=True)


async def _simulate(args: argparse.Namespace, store: Any, ids: list[str],
                    leases: dict[int, Any], idle_beat_s: float, idle_poll_s: float
                    ) -> dict[str, Any]:
    """The fleet's calls, each worker a task: the store's own statements (its beat and its
    claim, :func:`spotrun.store.postgres.beat_sql` and ``CLAIM_SQL`` with the parameters
    the store builds) sent on a few connections in autocommit, as the store sends them,
    with psycopg's asyncio API, so that one process makes thousands of workers' calls."""
    import asyncio

    import psycopg

    from spotrun.jobs import Progress
    from spotrun.store import Beat, ClaimRequest, DatabaseSlow
    from spotrun.store.postgres import CLAIM_SQL, beat_params

    hb_s, lease_s = args.heartbeat, args.lease
    slow = max(hb_s, (lease_s - hb_s) / 2)
    loop = asyncio.get_running_loop()
    conns: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for _ in range(args.pool):
        conns.put_nowait(await psycopg.AsyncConnection.connect(args.url, autocommit=True))
    rng = random.Random(os.getpid())
    lateness: list[float] = []
    lost = {"heartbeat": 0}
    errors: list[str] = []
    calls = 0
    start = loop.time()
    warm, end = start + args.warmup, start + args.run_seconds
    sweeping = False
    background: set[asyncio.Task[None]] = set()  # the sweeps under way (kept referenced)

    async def one(sql: str, params: dict[str, Any]) -> Any:
        nonlocal calls
        conn = await conns.get()
        try:
            cur = await conn.execute(sql, params)
            calls += 1
            return await cur.fetchone()
        finally:
            conns.put_nowait(conn)

    async def sweep() -> None:
        nonlocal sweeping
        sweeping = True
        try:
            with contextlib.suppress(DatabaseSlow):
                await asyncio.to_thread(store.sweep_expired, within=slow)
        finally:
            sweeping = False

    async def beats(i: int) -> None:
        busy = i in leases
        step = 0
        due = start + rng.uniform(0, hb_s if busy else idle_beat_s)
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if due >= end:
                return
            b: list[Any] = []
            if busy:
                step += 1
                b = [Beat(leases[i], Progress(step, 10_000, {"loss": 1.0 / step}))]
            try:
                row = await one(*beat_params(
                    ids[i], b, lease_s, alive_for=lease_s if busy else 3 * idle_beat_s,
                    sweeper=True))
                held, leads, to_sweep = row
                if busy and not held:
                    lost["heartbeat"] += 1
                if leads and to_sweep and not sweeping:
                    task = loop.create_task(sweep())
                    background.add(task)
                    task.add_done_callback(background.discard)
                if busy and due >= warm:
                    lateness.append(loop.time() - due)
                # busy or the sweeper: every heartbeat; idle: a sign of life
                due += hb_s if busy or leads else idle_beat_s
            except Exception as exc:  # a bench reports what went wrong, then goes on
                errors.append(f"beat: {type(exc).__name__}: {str(exc)[:120]}")
                due += hb_s

    async def polls(i: int) -> None:
        due = start + rng.uniform(0, idle_poll_s)
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if due >= end:
                return
            try:
                # A pool with nothing queued: an idle worker's claim finds nothing, as in
                # a fleet whose queue is empty, and never takes a busy worker's job.
                await one(CLAIM_SQL, ClaimRequest(ids[i], f"sim-{i}", lease_s, False,
                                                  IDLE_POOL, uuid.uuid4().hex,
                                                  idle_if_empty=True).params())
            except Exception as exc:
                errors.append(f"claim: {type(exc).__name__}: {str(exc)[:120]}")
            due += idle_poll_s * rng.uniform(0.5, 1.5)  # jittered, as the worker's

    cpu0 = time.process_time()
    tasks = [beats(i) for i in range(len(ids))]
    tasks += [polls(i) for i in range(len(ids)) if i not in leases]
    await asyncio.gather(*tasks)
    cpu = time.process_time() - cpu0
    while not conns.empty():
        await (conns.get_nowait()).close()
    return {"lateness": lateness, "lost": {"heartbeat": lost["heartbeat"], "progress": 0},
            "errors": errors[:20], "n_errors": len(errors), "calls": calls,
            "cpu_s": cpu}


# -------------------------------------------------------------------------- the bench


def _measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"spotrun_bench_fleet_{uuid.uuid4().hex[:8]}"
    url = C.fresh_pg_database(name)
    try:
        from spotrun.store import JobStore

        store = JobStore.open(url)
        busy = round(n * args.busy_fraction)
        if busy:
            C.bulk_submit(store, busy, "digits-train", {"epochs": 1})
        # From the set-up on: thousands of claims leave the queue's index full of rows
        # no longer queued, which each next claim would walk past.
        vacuums = _Vacuum(url, args.vacuum_every)
        procs = max(1, min(args.procs, n))
        per = [n // procs + (1 if k < n % procs else 0) for k in range(procs)]
        busy_per = [busy // procs + (1 if k < busy % procs else 0) for k in range(procs)]
        children = []
        for k in range(procs):
            argv = [sys.executable, __file__, "--child", "--url", url, "--n", str(per[k]),
                    "--busy", str(busy_per[k]), "--heartbeat", str(args.heartbeat),
                    "--lease", str(args.lease), "--pool", str(args.pool),
                    "--warmup", str(args.warmup),
                    "--run-seconds", str(args.warmup + args.seconds)]
            children.append(subprocess.Popen(argv, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True))
        for ch in children:
            assert ch.stdout is not None
            first = ch.stdout.readline()
            if not first:
                raise RuntimeError("a simulator process died before it was ready")
        go = time.time() + 0.5
        for ch in children:
            assert ch.stdin is not None
            ch.stdin.write(f"{go}\n")
            ch.stdin.flush()
        time.sleep(max(0.0, go - time.time()) + args.warmup)
        x0, c0, t0, v0 = _xacts(url), _pg_cpu(), time.monotonic(), vacuums.transactions
        time.sleep(args.seconds)
        x1, c1, t1, v1 = _xacts(url), _pg_cpu(), time.monotonic(), vacuums.transactions
        vacuums.stop()
        x1 -= v1 - v0  # the stand-in autovacuum's own transactions are not the fleet's
        late: list[float] = []
        lost_hb = lost_pr = n_err = 0
        errs: list[str] = []
        gen_cpu = 0.0
        for ch in children:
            out, _ = ch.communicate(timeout=300)
            res = json.loads(out.strip().splitlines()[-1])
            late += res["lateness"]
            lost_hb += res["lost"]["heartbeat"]
            lost_pr += res["lost"]["progress"]
            n_err += res["n_errors"]
            errs += res["errors"]
            gen_cpu += res["cpu_s"]
        expired = sum(1 for j in store.list_jobs(limit=100_000)
                      for e in store.events(j.id) if e.kind == "lease_expired")
        store.close()
        wall = t1 - t0
        return {
            "workers": n, "busy": busy, "tx_per_s": (x1 - x0) / wall,
            "tx_per_worker_s": (x1 - x0) / wall / n,
            "pg_cpu_cores": _cpu_between(c0, c1) / wall,
            "hb_p50_ms": C.pct(late, 50) * 1000 if late else float("nan"),
            "hb_p99_ms": C.pct(late, 99) * 1000 if late else float("nan"),
            "leases_lost": lost_hb + lost_pr + expired, "errors": n_err, "error_sample": errs[:5],
            # the simulators' CPU over their whole run (warm-up included), in cores
            "generator_cpu_cores": gen_cpu / (args.warmup + args.seconds),
        }
    finally:
        C.drop_pg_database(name)


def main() -> None:
    from spotrun.config import Settings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1000,2500,5000", help="comma-separated fleet sizes")
    p.add_argument("--busy-fraction", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per size")
    p.add_argument("--warmup", type=float, default=5.0)
    d = Settings(home=Path("."), database_url="", checkpoint_url=".")
    p.add_argument("--heartbeat", type=float, default=d.heartbeat_seconds)
    p.add_argument("--lease", type=float, default=d.lease_seconds)
    p.add_argument("--procs", type=int, default=2, help="simulator processes")
    p.add_argument("--vacuum-every", type=float, default=5.0,
                   help="seconds between the stand-in autovacuum's runs (0: none)")
    p.add_argument("--pool", type=int, default=8,
                   help="connections per simulator process (a pooler's server connections)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--busy", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    if not C.pg_available():
        sys.exit(f"PostgreSQL unavailable at {C.PG_ADMIN}")
    C.install_cleanup()
    run = C.Run("fleet", args)
    rows = []
    held = 0
    for n in (int(x) for x in args.workers.split(",")):
        r = _measure(n, args)
        print(json.dumps(r), flush=True)
        rows.append(r)
        if r["leases_lost"] == 0 and r["hb_p99_ms"] < 1000 and r["errors"] == 0:
            held = max(held, n)
    md = C.table(
        ["workers", "busy", "tx/s", "tx/s per worker", "PostgreSQL CPU (cores)",
         "simulators' CPU (cores)", "heartbeat p50 ms", "p99 ms", "leases lost", "errors"],
        [[r["workers"], r["busy"], r["tx_per_s"], r["tx_per_worker_s"], r["pg_cpu_cores"],
          r["generator_cpu_cores"], r["hb_p50_ms"], r["hb_p99_ms"], r["leases_lost"],
          r["errors"]] for r in rows])
    md += (f"\n\nLargest fleet held (no lease lost, heartbeat p99 < 1 s): **{held}** "
           f"(heartbeat {args.heartbeat:g} s, lease {args.lease:g} s).\n")
    run.results = {"rows": rows, "held": held}
    run.finish(md)


if __name__ == "__main__":
    main()
