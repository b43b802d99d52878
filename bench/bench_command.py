#!/usr/bin/env python
"""Command-job benchmark: notice-to-exit of a command job holding 100 MB and 1 GB of files.

For each size, one long command job is preempted N times (default 20) in a row: a worker
runs it, a spare worker waits idle; the running worker gets SIGTERM 1-2 s after the job is
stepping again; a fresh spare is started for the next round. The program (written by this
script) fills ``SPOTRUN_CHECKPOINT_DIR`` with 4 files of random bytes on its first
attempt, prints a progress line every 20 ms, and on SIGTERM writes a small ``step.json``
and exits: so every notice commits the whole directory (streamed, hashed, fsynced, the
manifest last, the pointer moved by a fenced write), and every resume restores it,
verifying each file.

* notice-to-exit: from ``os.kill(SIGTERM)`` in this script to the worker process's exit
  (``waitpid``): the program's exit, the directory's commit, the hand-back, the exit.
* notice commit: the seconds the worker reports in the job's 'preempted' event.
* exit-to-stepping: from the worker's exit until this script saw the job's progress move
  on the spare (claimed, directory restored and verified, program started), polled
  every 20 ms.

With ``--reference`` each size is also measured, right after, for the in-process ``sleep``
pipeline holding the same number of bytes in memory (one 20 ms step, like the program):
the same machine in the same minutes, so the two can be compared.

    python bench/bench_command.py            # 20 preemptions of 100 MB and of 1 GB
    python bench/bench_command.py --quick    # 5 preemptions of 100 MB
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
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

PROGRAM = '''
import json, os, signal, sys, time
mb = int(sys.argv[1])
d = os.environ["SPOTRUN_CHECKPOINT_DIR"]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
step = 0
if os.path.exists(os.path.join(d, "step.json")):
    step = json.load(open(os.path.join(d, "step.json")))["step"]
else:
    for i in range(4):
        with open(os.path.join(d, f"shard{i}.bin"), "wb") as fh:
            left = mb * 1_000_000 // 4
            while left:
                n = min(left, 16 << 20)
                fh.write(os.urandom(n))
                left -= n
while not stop:
    step += 1
    print(f"spotrun:progress step={step}", flush=True)
    time.sleep(0.02)
with open(os.path.join(d, "step.json"), "w") as fh:
    json.dump({"step": step}, fh)
'''


def preempt_series(kind: str, mb: int, n: int, base: Path) -> dict[str, Any]:
    from spotrun.store import JobStore

    db = "bench_command"
    url = fresh_pg_database(db)
    store = JobStore.open(url)
    home = Path(tempfile.mkdtemp(prefix="bench-command-", dir=base))
    program = home / "program.py"
    program.write_text(PROGRAM)
    env = {"SPOTRUN_HOME": str(home), "SPOTRUN_CHECKPOINT_URL": str(home / "checkpoints"),
           "SPOTRUN_MAX_PREEMPTIONS": "100000"}
    rng = random.Random(1)
    exits: list[float] = []
    moving_again: list[float] = []
    k = 0

    def start(children: Children) -> tuple[str, Any]:
        nonlocal k
        k += 1
        wname = f"cmd{k}"
        argv = [*spotrun_argv(url), "worker", "--name", wname, "--no-preload"]
        return wname, children.start(argv, env=env,
                                     log=RESULTS / "logs" / f"command-{wname}.log")

    def stepping(job_id: str, after_step: int) -> bool:
        j = store.get(job_id, with_events=False)
        return j.state.value == "running" and j.progress.step > after_step

    try:
        with Children() as children:
            procs = dict([start(children)])
            wait_until(lambda: spotrun_ready_workers(store, 1), 120, "first worker")
            if kind == "command":
                job = store.submit("command",
                                   {"argv": [sys.executable, str(program), str(mb)]},
                                   max_retries=1000, max_preemptions=100000)
            else:
                job = store.submit("sleep", {"seconds": 20000, "steps": 1_000_000,
                                             "state_mb": mb},
                                   max_retries=1000, max_preemptions=100000)
            wait_until(lambda: stepping(job.id, 0), 300, "the job to step")
            procs.update(dict([start(children)]))
            for i in range(n):
                wait_until(lambda: spotrun_ready_workers(store, 1), 120, "an idle spare")
                time.sleep(rng.uniform(1.0, 2.0))
                j = store.get(job.id, with_events=False)
                proc = procs.pop(j.worker)
                t0 = time.monotonic()
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(120)
                exits.append(time.monotonic() - t0)
                t_exit = time.monotonic()
                step = store.get(job.id, with_events=False).progress.step
                wait_until(lambda s=step: stepping(job.id, s), 300, "the job to resume",
                           interval=0.02)
                moving_again.append(time.monotonic() - t_exit)
                print(f"    {kind} {mb} MB #{i + 1}: exit {exits[-1]:.3f} s, stepping again "
                      f"{moving_again[-1]:.3f} s later", flush=True)
                procs.update(dict([start(children)]))
            final = store.get(job.id)
            commits = [float(m.group(1)) for e in final.events if e.kind == "preempted"
                       for m in [re.search(r"checkpoint saved in ([\d.]+) s", e.message)]
                       if m]
            store.cancel(job.id)
            children.stop_all(30)
    finally:
        store.close()
        drop_pg_database(db)
        shutil.rmtree(home, ignore_errors=True)
    return {"kind": kind, "mb": mb, "preemptions": len(exits), "exit_s": exits,
            "exit_p50_s": pct(exits, 50), "exit_p99_s": pct(exits, 99),
            "exit_max_s": max(exits), "commit_s": commits,
            "commit_p50_s": pct(commits, 50) if commits else float("nan"),
            "commit_MBps_p50": mb / pct(commits, 50) if commits else float("nan"),
            "exit_to_stepping_s": moving_again,
            "exit_to_stepping_p50_s": pct(moving_again, 50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preemptions", type=int, default=None, help="per size [20]")
    ap.add_argument("--sizes", default=None, help="MB, comma-separated [100,1000]")
    ap.add_argument("--reference", action="store_true",
                    help="also measure the sleep pipeline with the same bytes in memory")
    ap.add_argument("--reference-preemptions", type=int, default=None,
                    help="per size for the reference [as --preemptions]")
    ap.add_argument("--dir", default=tempfile.gettempdir(),
                    help="where the workers' homes and checkpoints go")
    args = ap.parse_args()
    args.preemptions = args.preemptions or (5 if args.quick else 20)
    sizes = [int(s) for s in (args.sizes or ("100" if args.quick else "100,1000")).split(",")]
    install_cleanup()
    run = Run("bench_command", args)
    print(run.header(), flush=True)
    base = Path(args.dir) / f"spotrun-bench-command-{os.getpid()}"
    base.mkdir(parents=True, exist_ok=True)
    goals = {100: 1.0, 1000: 5.0}
    series = []
    try:
        for mb in sizes:
            runs = [("command", args.preemptions)]
            if args.reference:
                runs.append(("sleep", args.reference_preemptions or args.preemptions))
            for kind, n in runs:
                series.append(preempt_series(kind, mb, n, base))
                s = series[-1]
                print(f"  {kind} {mb} MB: exit p50 {s['exit_p50_s']:.3f} s p99 "
                      f"{s['exit_p99_s']:.3f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    run.results = {"series": series}
    md = table(["job", "state", "preemptions", "notice → exit p50 s",
                "p99 s", "max s", "goal (p99)", "notice commit p50 s", "commit MB/s (p50)",
                "exit → stepping again p50 s"],
               [["command job (files)" if s["kind"] == "command" else
                 "sleep pipeline (memory)", f"{s['mb']} MB", s["preemptions"],
                 s["exit_p50_s"], s["exit_p99_s"],
                 s["exit_max_s"], f"< {goals[s['mb']]:g} s" if s["mb"] in goals else "",
                 s["commit_p50_s"], s["commit_MBps_p50"], s["exit_to_stepping_p50_s"]]
                for s in series])
    run.finish(md)


if __name__ == "__main__":
    main()
