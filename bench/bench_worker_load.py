"""What real workers cost the database at the default settings, from ``pg_stat_database``.

Real ``spotrun worker`` processes on a fresh PostgreSQL database, with no setting changed:
``--busy`` of them run a long ``sleep`` job each (a step every 0.1 s, so the job always has
new progress to report), ``--idle`` more wait for work in a pool nobody submits to. Three
windows of ``--seconds`` each, counted from the database's own transaction counter
(commits and rollbacks; this script reads them from another database, and autovacuum is
off on the measured database's tables, whose transactions would count too):

1. busy workers alone: per busy worker;
2. busy and idle workers together: the idle ones' share is the difference, per idle worker;
3. the same, while connections are counted per worker process in ``pg_stat_activity``
   (each worker gets its own ``application_name`` through the database URL).

The goal (issue 17): at most 0.5 transactions a second per busy worker and 0.2 per idle
one, reads included; at most 2 connections per worker process.

    python bench/bench_worker_load.py --busy 8 --idle 8 --seconds 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def _xacts(dbname: str) -> int:
    import psycopg

    with psycopg.connect(C.PG_ADMIN, autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback, sessions FROM "
                           "pg_stat_database WHERE datname = %s", (dbname,)).fetchone()
    if row is None:
        return 0
    _SESSIONS.append(int(row[1]))
    return int(row[0])


_SESSIONS: list[int] = []  # connections opened to the database, at each count


def _connections(dbname: str) -> dict[str, int]:
    """Open connections to the database per application_name (one per worker)."""
    import psycopg

    with psycopg.connect(C.PG_ADMIN, autocommit=True) as conn:
        rows = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                            "WHERE datname = %s AND application_name LIKE 'bench-w%%' "
                            "GROUP BY application_name", (dbname,)).fetchall()
    return {str(name): int(n) for name, n in rows}


def _window(dbname: str, seconds: float, sample: bool) -> tuple[float, dict[str, int]]:
    """Transactions a second over a window (this function's own connections are not
    counted: they are to the admin database); with ``sample``, the most connections seen
    per worker, sampled every second."""
    peak: dict[str, int] = {}
    start, t0 = _xacts(dbname), time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        if sample:
            for name, n in _connections(dbname).items():
                peak[name] = max(peak.get(name, 0), n)
    end, t1 = _xacts(dbname), time.monotonic()
    print(f"window: {end - start} transactions, {_SESSIONS[-1] - _SESSIONS[-2]} new "
          f"connections in {t1 - t0:.1f} s", flush=True)
    return (end - start) / (t1 - t0), peak


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from spotrun.store import JobStore

    name = f"spotrun_bench_load_{uuid.uuid4().hex[:8]}"
    url = C.fresh_pg_database(name)
    home = Path(tempfile.mkdtemp(prefix="spotrun-bench-load-"))
    store = JobStore.open(url)
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        # Autovacuum's transactions count as the database's too: they are not the workers'.
        for (table,) in conn.execute("SELECT tablename FROM pg_tables "
                                     "WHERE schemaname = 'public'").fetchall():
            conn.execute(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')
    try:
        for _ in range(args.busy):
            store.submit("sleep", {"seconds": 3600, "steps": 36000})
        with C.Children() as kids:
            def worker(i: int, pool: str) -> None:
                wurl = f"{url}?application_name=bench-w{i}"
                kids.start([*C.spotrun_argv(wurl), "worker", "--name", f"w{i}",
                            "--no-preload", "--pool", pool],
                           env={"SPOTRUN_HOME": str(home / f"w{i}")},
                           log=home / f"w{i}.log")

            for i in range(args.busy):
                worker(i, "spot")
            C.wait_until(lambda: sum(1 for j in store.list_jobs(limit=1000)
                                     if j.state.value == "running") >= args.busy,
                         timeout=120, what=f"{args.busy} jobs running")
            time.sleep(args.warmup)
            busy_tx, _ = _window(name, args.seconds, sample=False)
            for i in range(args.busy, args.busy + args.idle):
                worker(i, "bench-idle")
            C.wait_until(lambda: C.spotrun_ready_workers(store, args.idle),
                         timeout=120, what=f"{args.idle} idle workers")
            time.sleep(args.warmup)
            both_tx, _ = _window(name, args.seconds, sample=False)
            _, peak = _window(name, min(args.seconds, 30.0), sample=True)
            lost = sum(1 for j in store.list_jobs(limit=1000) if j.retries or j.attempt > 1)
            kids.stop_all()
    finally:
        store.close()
        C.drop_pg_database(name)
    busy_conns = [peak.get(f"bench-w{i}", 0) for i in range(args.busy)]
    idle_conns = [peak.get(f"bench-w{i}", 0) for i in range(args.busy, args.busy + args.idle)]
    per_busy = busy_tx / args.busy if args.busy else 0.0
    per_idle = (both_tx - busy_tx) / args.idle if args.idle else 0.0
    return {"busy": args.busy, "idle": args.idle, "seconds": args.seconds,
            "tx_per_s_busy_alone": busy_tx, "tx_per_s_with_idle": both_tx,
            "per_busy_worker": per_busy, "per_idle_worker": per_idle,
            "max_connections_busy": max(busy_conns, default=0),
            "max_connections_idle": max(idle_conns, default=0),
            "jobs_retried": lost,
            "goal_busy": per_busy <= 0.5, "goal_idle": per_idle <= 0.2,
            "goal_connections": max([*busy_conns, *idle_conns], default=0) <= 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=8)
    p.add_argument("--idle", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0, help="each measured window")
    # Past 10 s: a backend reports its counts up to 10 s late (PGSTAT_IDLE_INTERVAL).
    p.add_argument("--warmup", type=float, default=15.0)
    args = p.parse_args()
    C.install_cleanup()
    if not C.pg_available():
        sys.exit(f"PostgreSQL is not reachable at {C.PG_ADMIN} (set BENCH_PG_ADMIN)")
    run = C.Run("worker-load", args)
    print(run.header())
    out = measure(args)
    run.results = out
    run.finish(C.table(
        ["busy", "idle", "tx/s per busy worker", "tx/s per idle worker",
         "connections per worker (busy / idle)", "jobs retried"],
        [[out["busy"], out["idle"], out["per_busy_worker"], out["per_idle_worker"],
          f"{out['max_connections_busy']} / {out['max_connections_idle']}",
          out["jobs_retried"]]]))

if __name__ == "__main__":
    main()
