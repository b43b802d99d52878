#!/usr/bin/env python
"""Hand-off benchmark: notice-to-exit, checkpoint write speed, hand-back-to-resume.

For each workload (digits-train; the sleep pipeline holding 100 MB and 1 GB of state),
one long job is preempted N times (default 20) in a row: a worker runs it, a second
worker waits idle; the running worker gets SIGTERM at a random moment 1-2 s after the job
is stepping again; a fresh idle worker is started for the next round.

* notice-to-exit: from ``os.kill(SIGTERM)`` in this script to the worker process's exit
  (``waitpid``), which includes stopping at the next step boundary, the checkpoint
  (written and fsynced, then its pointer committed), the hand-back and the process exit.
* hand-back-to-resume: from the job's 'preempted' event to its next 'resumed' event
  (database clock): how long the job sits in the queue with an idle worker waiting.
  Also: exit to stepping again, from the old worker's exit to the resuming worker's log
  line for the job's first step after loading (and verifying) the checkpoint. (The store
  shows that step only at the next heartbeat, up to 2.5 s later at the defaults.)
* checkpoint write throughput: ``CheckpointStore.save`` of a 1 GB state to the local
  checkpoint directory, against the raw sequential write speed of the same disk in the
  same run (Python 8 MiB writes + fsync, and ``dd bs=8M conv=fsync``); plus the
  checkpoint speeds the workers reported in their 'preempted' events.

    python bench/bench_handoff.py            # full run (~6 minutes)
    python bench/bench_handoff.py --quick    # 5 preemptions, 100 MB and digits only
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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

WORKLOADS: dict[str, tuple[str, dict[str, Any], float]] = {
    # name: (pipeline, params, state MB)
    "digits-train": ("digits-train", {"epochs": 1000, "step_delay": 0.01}, 0.05),
    "sleep 100 MB": ("sleep", {"seconds": 36000, "steps": 360000, "state_mb": 100}, 100),
    "sleep 1 GB": ("sleep", {"seconds": 36000, "steps": 360000, "state_mb": 1000}, 1000),
}


# ------------------------------------------------------------------ disk speed

def raw_write_python(path: Path, nbytes: int, chunk: int = 8 << 20) -> float:
    buf = os.urandom(chunk)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(nbytes // chunk):
            fh.write(buf)
        fh.flush()
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return nbytes / dt / 1e6


def raw_write_dd(path: Path, mb8: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={mb8}",
                    "conv=fsync", "status=none"], check=True)
    dt = time.perf_counter() - t0
    path.unlink()
    return mb8 * (8 << 20) / dt / 1e6


def disk_speeds(directory: Path, mb: int, reps: int) -> dict[str, Any]:
    from spotrun.checkpoints import CheckpointStore

    directory.mkdir(parents=True, exist_ok=True)
    nbytes = mb * 1_000_000
    store = CheckpointStore(str(directory / "ckpt"))
    from spotrun.pipelines.sleep import make_state

    blob = make_state(nbytes)
    py, dd, ck = [], [], []
    for i in range(reps):
        drop_caches()
        py.append(raw_write_python(directory / "raw.bin", nbytes))
        dd.append(raw_write_dd(directory / "raw.bin", nbytes // (8 << 20)))
        saved = store.save("bench", 1, i, {"state.json": b"{}", "blob.bin": blob})
        ck.append(saved.nbytes / saved.seconds / 1e6)
        store.delete(saved.path)
    shutil.rmtree(directory / "ckpt", ignore_errors=True)
    return {"mb": mb, "reps": reps, "python_fsync_MBps": py, "dd_fsync_MBps": dd,
            "checkpoint_save_MBps": ck}


def drop_caches() -> None:
    # Only writes are measured; a sync keeps earlier dirty pages out of the timing.
    os.sync()


# ------------------------------------------------------------------ preemptions

def preempt_series(name: str, n: int, args: argparse.Namespace,
                   ckpt_dir: Path) -> dict[str, Any]:
    from spotrun.store import JobStore

    pipeline, params, state_mb = WORKLOADS[name]
    db = "bench_handoff"
    url = fresh_pg_database(db)
    store = JobStore.open(url)
    home = Path(tempfile.mkdtemp(prefix="bench-handoff-", dir=ckpt_dir))
    env = {"SPOTRUN_HOME": str(home), "SPOTRUN_CHECKPOINT_URL": str(home / "checkpoints"),
           # The job is preempted on purpose many times: keep it in the spot pool (by
           # default it moves to the on-demand pool after 5 preemptions).
           "SPOTRUN_MAX_PREEMPTIONS": "100000"}
    rng = random.Random(1)
    exits: list[float] = []
    moving_again: list[float] = []
    claim_to_step: list[float] = []
    k = 0

    def start(children: Children) -> tuple[str, Any]:
        nonlocal k
        k += 1
        wname = f"ho{k}"
        argv = [*spotrun_argv(url), "worker", "--name", wname]
        if pipeline != "digits-train":
            argv.append("--no-preload")
        return wname, children.start(argv, env=env, log=_log(wname))

    def _log(wname: str) -> Path:
        return RESULTS / "logs" / f"handoff-{wname}.log"

    def resumed_by(job_id: str, old: str | None) -> bool:
        j = store.get(job_id, with_events=False)
        return j.state.value == "running" and j.worker not in (None, old)

    def stepping(job_id: str, after_step: int) -> bool:
        j = store.get(job_id, with_events=False)
        return j.state.value == "running" and j.progress.step > after_step

    try:
        with Children() as children:
            procs = dict([start(children)])
            wait_until(lambda: spotrun_ready_workers(store, 1), 120, "first worker")
            time.sleep(3 if pipeline == "digits-train" else 0.2)  # the torch preload
            try:
                job = store.submit(pipeline, params, max_retries=1000,
                                   max_preemptions=100000)
            except TypeError:  # a spotrun without max_preemptions
                job = store.submit(pipeline, params, max_retries=1000)
            wait_until(lambda: stepping(job.id, 0), 300, "the job to step")
            extra_mb: list[float] = []
            spare = dict([start(children)])
            procs.update(spare)
            for i in range(n):
                wait_until(lambda: spotrun_ready_workers(store, 1), 120, "an idle spare")
                if pipeline == "digits-train":
                    time.sleep(3)  # let the spare's torch preload finish
                time.sleep(rng.uniform(1.0, 2.0))
                j = store.get(job.id, with_events=False)
                proc = procs.pop(j.worker)
                rss0 = _status_kb(proc.pid, "VmRSS")
                _reset_peak(proc.pid)
                peak = _PeakWatch(proc.pid)
                t0, t_kill = time.monotonic(), time.time()
                os.kill(proc.pid, signal.SIGTERM)
                # No timeout: Popen.wait(timeout) polls with sleeps of up to 50 ms, which
                # would be in the figure. The worker exits at the notice's deadline anyway.
                proc.wait()
                exits.append(time.monotonic() - t0)
                t_exit = time.time()
                hwm = peak.stop()
                if rss0 is not None and hwm is not None:
                    extra_mb.append(max(0, hwm - rss0) / 1024)
                # The job is now queued or already claimed by the spare; note when it
                # steps again.
                wait_until(lambda old=j.worker: resumed_by(job.id, old), 300,
                           "the job to be claimed again", interval=0.005)
                by = store.get(job.id, with_events=False).worker
                assert by is not None
                at, since_claim = wait_until(
                    lambda w=by, t=t_kill: _stepping_again_at(_log(w), job.id, t), 300,
                    "the job to step again", interval=0.02)
                moving_again.append(at - t_exit)
                claim_to_step.append(since_claim)
                print(f"    {name} #{i + 1}: exit {exits[-1]:.3f} s", flush=True)
                procs.update(dict([start(children)]))
            final = store.get(job.id)
            handoffs = [h for h in store.analytics.preemption_handoffs() if h is not None]
            ck_secs = []
            pre_at: list[float] = []
            for e in final.events:
                if e.kind == "preempted":
                    pre_at.append(e.at.timestamp())
                    m = re.search(r"checkpoint saved in ([\d.]+) s", e.message)
                    if m:
                        ck_secs.append(float(m.group(1)))
            store.cancel(job.id)
            children.stop_all(30)
    finally:
        store.close()
        drop_pg_database(db)
        shutil.rmtree(home, ignore_errors=True)
    return {
        "workload": name, "state_mb": state_mb, "preemptions": len(exits),
        "exit_s": exits, "exit_p50_s": pct(exits, 50), "exit_p99_s": pct(exits, 99),
        "exit_max_s": max(exits),
        "resume_s": handoffs, "resume_p50_s": pct(handoffs, 50),
        "resume_p99_s": pct(handoffs, 99),
        "exit_to_stepping_s": moving_again,
        "exit_to_stepping_p50_s": pct(moving_again, 50),
        "exit_to_stepping_p99_s": pct(moving_again, 99),
        # The resuming worker's own count, from its claim to the first step after loading.
        "claim_to_step_s": claim_to_step,
        "claim_to_step_p50_s": pct(claim_to_step, 50),
        "claim_to_step_p99_s": pct(claim_to_step, 99),
        # The worker's peak resident memory from just before the notice to its exit,
        # above its resident memory then (which holds the state): what the checkpoint
        # and the hand-back add. As a multiple of the state: (state + added) / state.
        "notice_extra_memory_mb": extra_mb,
        "notice_extra_memory_mb_max": max(extra_mb) if extra_mb else None,
        "notice_peak_over_state": ((state_mb + max(extra_mb)) / state_mb
                                   if extra_mb and state_mb >= 1 else None),
        "notice_checkpoint_s": ck_secs,
        "notice_checkpoint_MBps_p50": (state_mb / pct(ck_secs, 50)) if ck_secs else None,
    }


_STEPPING = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO spotrun\.worker: "
                       r"job (\S+): stepping again from step \d+, ([\d.]+) s after its claim")


def _stepping_again_at(log: Path, job_id: str, after: float) -> tuple[float, float] | None:
    """(wall time, seconds since its claim) of the worker's 'stepping again' line for
    ``job_id`` (its first step after loading the checkpoint) logged after ``after``, or
    None while there is none."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        m = _STEPPING.match(line)
        if m and m.group(3) == job_id:
            at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + \
                int(m.group(2)) / 1000
            if at >= after - 0.002:  # (the log's clock has millisecond steps)
                return at, float(m.group(4))
    return None


def _status_kb(pid: int, field: str) -> int | None:
    """A /proc/PID/status figure in kB (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak(pid: int) -> None:
    # Writing 5 resets VmHWM (Linux >= 4.0): the job's own start (its state built in
    # chunks, then joined) must not count as the checkpoint's peak.
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


class _PeakWatch:
    """Samples a process's VmHWM every 5 ms until it exits; the last value seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.hwm = pid, _status_kb(pid, "VmHWM")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.005):
            v = _status_kb(self.pid, "VmHWM")
            if v is None:
                return
            self.hwm = v

    def stop(self) -> int | None:
        self._done.set()
        self._thread.join()
        return self.hwm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preemptions", type=int, default=None, help="per workload [20]")
    ap.add_argument("--workloads", default=None,
                    help="comma-separated from: " + ", ".join(WORKLOADS))
    ap.add_argument("--dir", default=tempfile.gettempdir(),
                    help="where checkpoints and the raw-write test go (same disk)")
    ap.add_argument("--disk-mb", type=int, default=None, help="size of the write test [1000]")
    ap.add_argument("--disk-reps", type=int, default=3)
    args = ap.parse_args()
    args.preemptions = args.preemptions or (5 if args.quick else 20)
    args.workloads = (args.workloads or ("digits-train,sleep 100 MB" if args.quick
                                         else ",".join(WORKLOADS))).split(",")
    args.disk_mb = args.disk_mb or (200 if args.quick else 1000)
    install_cleanup()
    run = Run("bench_handoff", args)
    print(run.header(), flush=True)
    base = Path(args.dir) / f"spotrun-bench-handoff-{os.getpid()}"
    base.mkdir(parents=True, exist_ok=True)
    try:
        free = shutil.disk_usage(base).free / 1e9
        print(f"  {free:.0f} GB free under {base}", flush=True)
        disk = disk_speeds(base / "disk", args.disk_mb, args.disk_reps)
        print(f"  disk: python+fsync {pct(disk['python_fsync_MBps'], 50):.0f} MB/s, dd "
              f"{pct(disk['dd_fsync_MBps'], 50):.0f} MB/s, CheckpointStore.save "
              f"{pct(disk['checkpoint_save_MBps'], 50):.0f} MB/s", flush=True)
        series = []
        for name in args.workloads:
            series.append(preempt_series(name, args.preemptions, args, base))
            s = series[-1]
            print(f"  {name}: exit p50 {s['exit_p50_s']:.3f} s p99 {s['exit_p99_s']:.3f} s; "
                  f"resume p50 {s['resume_p50_s']:.3f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    run.results = {"disk": disk, "series": series}
    md1 = table(["workload", "preemptions", "notice → exit p50 s", "p99 s", "max s",
                 "preempted → resumed p50 s", "p99 s", "exit → stepping again p50 s",
                 "p99 s", "claim → first step p50 s", "p99 s",
                 "notice checkpoint MB/s (p50)", "memory added at the notice, max MB",
                 "peak ÷ state"],
                [[s["workload"], s["preemptions"], s["exit_p50_s"], s["exit_p99_s"],
                  s["exit_max_s"], s["resume_p50_s"], s["resume_p99_s"],
                  s["exit_to_stepping_p50_s"], s["exit_to_stepping_p99_s"],
                  s["claim_to_step_p50_s"], s["claim_to_step_p99_s"],
                  s["notice_checkpoint_MBps_p50"] if s["notice_checkpoint_MBps_p50"]
                  else float("nan"),
                  s["notice_extra_memory_mb_max"] if s["notice_extra_memory_mb_max"]
                  is not None else float("nan"),
                  s["notice_peak_over_state"] if s["notice_peak_over_state"]
                  else float("nan")] for s in series])
    py, dd, ck = (pct(disk[k], 50) for k in ("python_fsync_MBps", "dd_fsync_MBps",
                                              "checkpoint_save_MBps"))
    md2 = table(["write of " + f"{disk['mb']} MB, median of {disk['reps']}", "MB/s",
                 "÷ raw (python+fsync)", "÷ raw (dd conv=fsync)"],
                [["python 8 MiB writes + fsync", py, 1.0, py / dd],
                 ["dd bs=8M conv=fsync", dd, dd / py, 1.0],
                 ["CheckpointStore.save (blake3 + write + fsync + manifest)", ck, ck / py,
                  ck / dd]])
    run.finish(md1 + "\n\n" + md2)


if __name__ == "__main__":
    main()
