#!/usr/bin/env python
"""Overhead of progress reporting and heartbeats on a digits-train run.

The same digits-train job (same params, same seed) is run, alternately:

* inline: ``spotrun.local.run_inline`` in a fresh process that has imported torch first:
  the pipeline with a driver whose progress, stop and checkpoint calls do nothing;
* worker: submitted to a real ``spotrun worker`` (PostgreSQL by default, default
  heartbeat 2 s and lease 10 s; progress flushed every 0.5 s), torch preloaded. The job
  asks for a fixed checkpoint period longer than the run, so no checkpoint is taken: only
  progress reporting and heartbeats differ. Its time is the job's ``run_seconds`` (the
  runner's clock from the claim to the completion, including the last progress flush).

Each side first runs a 1-epoch warm-up (importing scikit-learn and loading the data
cost ~1.5 s once per process). Both timed runs cover the same work: loading the data,
building the net, training, evaluating and saving the model. The runs are interleaved
(inline, worker, inline, worker, ...) so that slow drifts of a shared machine hit both.
Reported: the medians, and the median of the per-pair ratios, of wall time and of CPU
time (the worker process's user+system time from submit to finish, which includes its
idle polling, reporter and claim; the inline process's time.process_time() around the
run). Both sides use one torch thread by default (OMP_NUM_THREADS=1): with two OpenMP
threads on a 2-core machine shared with other work, barrier spinning makes run times vary
several-fold.

    python bench/bench_overhead.py            # 7 pairs of ~10-25 s runs
    python bench/bench_overhead.py --quick    # 3 pairs of ~2-5 s runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    Children,
    Run,
    drop_pg_database,
    fresh_pg_database,
    install_cleanup,
    pct,
    spotrun_argv,
    spotrun_ready_workers,
    table,
    wait_until,
)

INLINE = """
import json, sys, time
import torch, spotrun.pipelines.digits  # imported before the clock starts, as preloaded
from spotrun.local import run_inline
params = json.loads(sys.argv[1])
run_inline("digits-train", {**params, "epochs": 1})  # warm-up: sklearn import, data load
t0, c0 = time.monotonic(), time.process_time()
result = run_inline("digits-train", params)
print(json.dumps({"seconds": time.monotonic() - t0, "cpu": time.process_time() - c0,
                  "steps": result["steps"]}))
"""


def proc_cpu(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=None, help="inline/worker pairs [7]")
    ap.add_argument("--epochs", type=int, default=None, help="digits-train epochs [1000]")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on both sides (OMP_NUM_THREADS) [1]")
    ap.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    args = ap.parse_args()
    args.pairs = args.pairs or (3 if args.quick else 7)
    args.epochs = args.epochs or (200 if args.quick else 1000)
    install_cleanup()
    run = Run("bench_overhead", args)
    print(run.header(), flush=True)
    params = {"epochs": args.epochs, "seed": 0}

    from spotrun.store import JobStore

    home = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    url = (fresh_pg_database("bench_overhead") if args.backend == "postgresql"
           else f"sqlite:///{home / 'spotrun.db'}")
    store = JobStore.open(url)
    inline: list[float] = []
    worker: list[float] = []
    inline_cpu: list[float] = []
    worker_cpu: list[float] = []
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    try:
        with Children() as children:
            wproc = children.start([*spotrun_argv(url), "worker", "--name", "ovh"],
                           env={"SPOTRUN_HOME": str(home), **threads},
                           log=RESULTS / "logs" / "overhead-worker.log")
            wait_until(lambda: spotrun_ready_workers(store, 1), 120, "the worker")
            time.sleep(5)  # the torch preload
            # Warm-up job (the first run in a process imports sklearn and loads the data).
            warm = store.submit("digits-train", {**params, "epochs": 1},
                                checkpoint_every_seconds=86400.0)
            wait_until(lambda: store.get(warm.id, with_events=False).state.value
                       in ("succeeded", "failed"), 600, "the warm-up job")
            for i in range(args.pairs):
                out = subprocess.run([sys.executable, "-c", INLINE, json.dumps(params)],
                                     check=True, capture_output=True, text=True,
                                     env={**os.environ, **threads})
                res = json.loads(out.stdout.strip().splitlines()[-1])
                inline.append(res["seconds"])
                inline_cpu.append(res["cpu"])
                cpu0 = proc_cpu(wproc.pid)
                job = store.submit("digits-train", params,
                                   checkpoint_every_seconds=86400.0)
                done: Any = wait_until(
                    lambda j=job.id: (lambda x: x if x.state.value in ("succeeded", "failed")
                                      else None)(store.get(j, with_events=False)),
                    3600, "the worker's run", interval=0.1)
                if done.state.value != "succeeded":
                    raise RuntimeError(f"job failed: {done.error}")
                worker.append(done.run_seconds)
                worker_cpu.append(proc_cpu(wproc.pid) - cpu0)
                print(f"  pair {i + 1}: inline {inline[-1]:.2f} s (cpu {inline_cpu[-1]:.2f}), "
                      f"worker {worker[-1]:.2f} s (cpu {worker_cpu[-1]:.2f}) "
                      f"({(worker[-1] / inline[-1] - 1) * 100:+.2f} % wall, "
                      f"{(worker_cpu[-1] / inline_cpu[-1] - 1) * 100:+.2f} % cpu)", flush=True)
            children.stop_all()
    finally:
        store.close()
        if args.backend == "postgresql":
            drop_pg_database("bench_overhead")
        shutil.rmtree(home, ignore_errors=True)
    ratios = [w / i for w, i in zip(worker, inline, strict=True)]
    cpu_ratios = [w / i for w, i in zip(worker_cpu, inline_cpu, strict=True)]
    run.results = {"inline_s": inline, "worker_s": worker, "ratios": ratios,
                   "inline_cpu_s": inline_cpu, "worker_cpu_s": worker_cpu,
                   "cpu_ratios": cpu_ratios,
                   "cpu_overhead_pct_median": (pct(cpu_ratios, 50) - 1) * 100,
                   "overhead_pct_median": (pct(ratios, 50) - 1) * 100,
                   "overhead_pct_of_medians": (pct(worker, 50) / pct(inline, 50) - 1) * 100}
    md = table(["digits-train, epochs=" + str(args.epochs) + f", {args.threads} thread(s)",
                "runs", "median wall s", "min s", "max s", "median CPU s"],
               [["inline (no-op driver)", len(inline), pct(inline, 50), min(inline),
                 max(inline), pct(inline_cpu, 50)],
                [f"spotrun worker ({args.backend})", len(worker), pct(worker, 50),
                 min(worker), max(worker), pct(worker_cpu, 50)]])
    md += (f"\n\nOverhead: median of per-pair ratios {run.results['overhead_pct_median']:+.2f} %"
           f" (pairs: {', '.join(f'{(r - 1) * 100:+.2f} %' for r in ratios)}); ratio of "
           f"medians {run.results['overhead_pct_of_medians']:+.2f} %. CPU time (whole "
           f"worker process from submit to finish, against the inline process's run): "
           f"median of per-pair ratios {run.results['cpu_overhead_pct_median']:+.2f} % "
           f"(pairs: {', '.join(f'{(r - 1) * 100:+.2f} %' for r in cpu_ratios)}).")
    run.finish(md)


if __name__ == "__main__":
    main()
