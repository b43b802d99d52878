"""Fleet load: N simulated workers making the real worker's store calls at their real rates
against one PostgreSQL, and what the database pays for them.

Each simulated worker is a schedule, not a thread: a few processes each run a heap of due
calls and a small pool of threads that make them, so that thousands fit on one machine. A
busy worker holds one job and, like the real reporter, beats every heartbeat with its
progress (one transaction); an idle worker beats every idle heartbeat and polls for a
claim, jittered, as the real claim loop does when no wake-up comes; the one that holds the
sweeper lease beats every heartbeat and sweeps. No ML libraries, no pipelines: only the
store.

Reported per N: database transactions per second (``pg_stat_database``), PostgreSQL's CPU
(its processes' ``/proc`` times), heartbeat lateness p50/p99 (from when the beat was due
to when its answer came back: a generator or a database that falls behind shows here, as
it would for a real worker), leases lost (heartbeats refused, progress refused, lease
expiries in the jobs' histories), and the largest N held: no lease lost and heartbeat p99
under 1 s.

    python bench/bench_fleet.py --workers 250,500,1000 --seconds 30
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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


# ------------------------------------------------------------------ one child process


def _child(args: argparse.Namespace) -> None:
    """Simulate ``args.n`` workers (``args.busy`` of them busy) until ``args.until``."""
    from spotrun.config import Settings
    from spotrun.jobs import Progress
    from spotrun.store import Beat, ClaimRequest, DatabaseSlow, JobStore, LeaseLost

    defaults = Settings(home=Path("."), database_url=args.url, checkpoint_url=".")
    idle_beat_s, idle_poll_s = defaults.idle_heartbeat_seconds, defaults.idle_poll_seconds

    hb_s, lease_s = args.heartbeat, args.lease
    slow = max(hb_s, (lease_s - hb_s) / 2)
    # As the worker's reporter opens its store: no pre-ping (a round trip per checkout).
    store = JobStore.open(args.url, migrate=False, pool_size=args.pool, pre_ping=False)
    lock = threading.Lock()
    lateness: list[float] = []
    lost = {"heartbeat": 0, "progress": 0}
    errors: list[str] = []
    heap: list[tuple[float, int, str, int]] = []  # (due, seq, action, worker index)
    seq = 0
    rng = random.Random(os.getpid())

    ids = [store.register_worker(name=f"sim-{os.getpid()}-{i}", host="bench", pid=os.getpid(),
                                 pool="default", has_cuda=False, lease_seconds=lease_s)
           for i in range(args.n)]
    leases: dict[int, Any] = {}
    step = dict.fromkeys(range(args.n), 0)
    for i in range(args.busy):
        got = store.claim(worker_id=ids[i], worker_name=f"sim-{i}", lease_seconds=lease_s)
        if got is None:
            errors.append("no job to claim for a busy worker")
            break
        leases[i] = got[0]
    print(json.dumps({"ready": True}), flush=True)
    start = time.monotonic()

    def push(due: float, action: str, i: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (due, seq, action, i))

    for i in range(args.n):
        if i in leases:
            push(start + rng.uniform(0, hb_s), "beat", i)
        else:
            push(start + rng.uniform(0, idle_beat_s), "beat", i)
            push(start + rng.uniform(0, idle_poll_s), "claim", i)
    sweeper: set[int] = set()  # the simulated workers that hold the sweeper lease

    def run(due: float, action: str, i: int) -> None:
        try:
            if action == "beat":
                beats = []
                if i in leases:
                    step[i] += 1
                    beats = [Beat(leases[i], Progress(step[i], 10_000,
                                                      {"loss": 1.0 / step[i]}))]
                got = store.beat(ids[i], beats, lease_s,
                                 alive_for=lease_s if beats else 3 * idle_beat_s,
                                 sweeper=True)
                late = time.monotonic() - due
                if beats and got.held.get(leases[i].job_id) is None:
                    with lock:
                        lost["heartbeat"] += 1
                with lock:
                    (sweeper.add if got.sweeper else sweeper.discard)(i)
                if got.sweeper:
                    with contextlib.suppress(DatabaseSlow):
                        store.sweep_expired(within=slow)
                if beats and due - start >= args.warmup:  # busy beats after the warm-up
                    with lock:
                        lateness.append(late)
            else:
                # A pool with nothing queued: an idle worker's claim finds nothing, as in
                # a fleet whose queue is empty, and never takes a busy worker's job.
                store.claim(**ClaimRequest(ids[i], f"sim-{i}", lease_s, False, IDLE_POOL,
                                           uuid.uuid4().hex).params())
        except LeaseLost:
            with lock:
                lost["progress"] += 1
        except Exception as exc:  # a bench reports what went wrong, then goes on
            with lock:
                errors.append(f"{action}: {type(exc).__name__}: {str(exc)[:120]}")

    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        while True:
            now = time.monotonic()
            if now >= args.until_mono_offset + start:
                break
            due, _, action, i = heap[0]
            if due > now:
                time.sleep(min(due - now, 0.01))
                continue
            heapq.heappop(heap)
            pool.submit(run, due, action, i)
            if action == "claim":  # the idle poll, jittered as the worker's
                period = idle_poll_s * rng.uniform(0.5, 1.5)
            else:  # busy or the sweeper: every heartbeat; idle: a sign of life
                period = hb_s if i in leases or i in sweeper else idle_beat_s
            push(due + period, action, i)
    store.close()
    print(json.dumps({"lateness": lateness, "lost": lost, "errors": errors[:20],
                      "n_errors": len(errors)}), flush=True)


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
        procs = max(1, min(args.procs, n))
        per = [n // procs + (1 if k < n % procs else 0) for k in range(procs)]
        busy_per = [busy // procs + (1 if k < busy % procs else 0) for k in range(procs)]
        children = []
        for k in range(procs):
            argv = [sys.executable, __file__, "--child", "--url", url, "--n", str(per[k]),
                    "--busy", str(busy_per[k]), "--heartbeat", str(args.heartbeat),
                    "--lease", str(args.lease), "--threads", str(args.threads),
                    "--pool", str(args.pool), "--warmup", str(args.warmup),
                    "--run-seconds", str(args.warmup + args.seconds)]
            children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        for ch in children:
            assert ch.stdout is not None
            first = ch.stdout.readline()
            if not first:
                raise RuntimeError("a simulator process died before it was ready")
        time.sleep(args.warmup)
        x0, c0, t0 = _xacts(url), _pg_cpu(), time.monotonic()
        time.sleep(args.seconds)
        x1, c1, t1 = _xacts(url), _pg_cpu(), time.monotonic()
        late: list[float] = []
        lost_hb = lost_pr = n_err = 0
        errs: list[str] = []
        for ch in children:
            out, _ = ch.communicate(timeout=120)
            res = json.loads(out.strip().splitlines()[-1])
            late += res["lateness"]
            lost_hb += res["lost"]["heartbeat"]
            lost_pr += res["lost"]["progress"]
            n_err += res["n_errors"]
            errs += res["errors"]
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
        }
    finally:
        C.drop_pg_database(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="250,500,1000", help="comma-separated fleet sizes")
    p.add_argument("--busy-fraction", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per size")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--heartbeat", type=float, default=2.0)
    p.add_argument("--lease", type=float, default=10.0)
    p.add_argument("--procs", type=int, default=4, help="simulator processes")
    p.add_argument("--threads", type=int, default=16, help="calling threads per process")
    p.add_argument("--pool", type=int, default=16, help="connections per process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--busy", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.until_mono_offset = args.run_seconds
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
         "heartbeat p50 ms", "p99 ms", "leases lost", "errors"],
        [[r["workers"], r["busy"], r["tx_per_s"], r["tx_per_worker_s"], r["pg_cpu_cores"],
          r["hb_p50_ms"], r["hb_p99_ms"], r["leases_lost"], r["errors"]] for r in rows])
    md += (f"\n\nLargest fleet held (no lease lost, heartbeat p99 < 1 s): **{held}** "
           f"(heartbeat {args.heartbeat:g} s, lease {args.lease:g} s).\n")
    run.results = {"rows": rows, "held": held}
    run.finish(md)


if __name__ == "__main__":
    main()
