#!/usr/bin/env python
"""Queue benchmark: claim-plus-complete throughput and enqueue-to-start latency.

For each backend (SQLite, PostgreSQL) and each worker count (1, 4 processes of
``spotrun worker --concurrency 1``):

* throughput: the workers are started and idle; then N ``sleep`` jobs (seconds=0, steps=1)
  are queued in ONE transaction, and the run is timed from that commit to the last job's
  ``finished_at`` (database clock). jobs/s = N / that time. Repeated (``--repeat``, on the
  same workers and database) and reported as the median run with the range.
* latency: with the workers idle, one job at a time is submitted through
  ``JobStore.submit`` (its own transaction); the next is submitted only after the previous
  one finished plus a gap. Reported: ``started_at`` minus the time the submit's commit
  returned to the client, and ``started_at`` minus ``created_at`` (the row's insert time,
  just before the commit: the conservative one). PostgreSQL stamps times with
  ``clock_timestamp()`` (microseconds); SQLite with ``julianday('now')`` (milliseconds).
  The database and the client share the host's clock.

    python bench/bench_queue.py            # full run (a few minutes)
    python bench/bench_queue.py --quick    # a short trial
"""

from __future__ import annotations

import argparse
import shutil
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
    bulk_submit,
    fresh_pg_database,
    install_cleanup,
    pct,
    pg_available,
    spotrun_argv,
    spotrun_ready_workers,
    table,
    wait_until,
)


def start_workers(children: Children, url: str, home: Path, n: int, tag: str
                  ) -> list[Any]:
    procs = []
    for i in range(n):
        procs.append(children.start(
            [*spotrun_argv(url), "worker", "--name", f"{tag}-{i}", "--no-preload"],
            env={"SPOTRUN_HOME": str(home)},
            log=RESULTS / "logs" / f"queue-{tag}-{i}.log"))
    return procs


def throughput(store: Any, n_jobs: int) -> dict[str, float]:
    import sqlalchemy as sa

    from spotrun.schema import jobs

    batch_start = store.now()  # this batch's rows: a repeat runs on the same database
    commit = bulk_submit(store, n_jobs, "sleep", {"seconds": 0, "steps": 1})
    mine = jobs.c.created_at >= batch_start

    def done() -> bool:
        with store.engine.connect() as c:
            left = c.execute(sa.select(sa.func.count()).select_from(jobs).where(
                jobs.c.state.in_(("queued", "running")))).scalar_one()
        return left == 0

    wait_until(done, 600, "the jobs to finish", interval=0.05)
    with store.engine.connect() as c:
        row = c.execute(sa.select(sa.func.min(jobs.c.started_at),
                                  sa.func.max(jobs.c.finished_at),
                                  sa.func.count()).where(
            jobs.c.state == "succeeded", mine)).one()
        failed = c.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.state != "succeeded", mine)).scalar_one()
    first_start, last_finish, ok = float(row[0]), float(row[1]), int(row[2])
    span = last_finish - commit
    return {"jobs": ok, "not_succeeded": failed, "seconds": span,
            "jobs_per_s": ok / span,
            "jobs_per_s_first_start_to_last_finish": ok / (last_finish - first_start)}


def latency(store: Any, samples: int, gap: float) -> dict[str, Any]:
    import sqlalchemy as sa

    from spotrun.schema import events, jobs

    from_commit: list[float] = []
    from_insert: list[float] = []
    from_event: list[float] = []
    for _ in range(samples):
        job = store.submit("sleep", {"seconds": 0, "steps": 1})
        committed = time.time()

        def finished(job_id: str = job.id) -> Any:
            with store.engine.connect() as c:
                return c.execute(sa.select(jobs.c.created_at, jobs.c.started_at).where(
                    jobs.c.id == job_id, jobs.c.state == "succeeded")).first()

        row = wait_until(finished, 60, "a job to finish", interval=0.002)
        with store.engine.connect() as c:
            ev = dict(c.execute(sa.select(events.c.kind, events.c.at).where(
                events.c.job_id == job.id)).all())
        from_commit.append(float(row.started_at) - committed)
        from_insert.append(float(row.started_at) - float(row.created_at))
        from_event.append(float(ev["started"]) - float(ev["submitted"]))
        time.sleep(gap)
    ms = 1000.0
    return {
        "samples": samples,
        "p50_ms_from_commit": pct(from_commit, 50) * ms,
        "p99_ms_from_commit": pct(from_commit, 99) * ms,
        "p50_ms_from_insert": pct(from_insert, 50) * ms,
        "p99_ms_from_insert": pct(from_insert, 99) * ms,
        "p50_ms_events": pct(from_event, 50) * ms,
        "p99_ms_events": pct(from_event, 99) * ms,
        "max_ms_from_insert": max(from_insert) * ms,
    }


def run_case(backend: str, n_workers: int, args: argparse.Namespace) -> dict[str, Any]:
    from spotrun.store import JobStore

    home = Path(tempfile.mkdtemp(prefix=f"bench-queue-{backend}-"))
    if backend == "postgresql":
        url = fresh_pg_database("bench_spotrun")
    else:
        url = f"sqlite:///{home / 'spotrun.db'}"
    store = JobStore.open(url)
    tag = f"{backend[:2]}{n_workers}"
    try:
        with Children() as children:
            procs = start_workers(children, url, home, n_workers, tag)
            wait_until(lambda: spotrun_ready_workers(store, n_workers), 120,
                       f"{n_workers} idle workers")
            runs = []
            for _ in range(args.repeat):
                time.sleep(0.5)
                runs.append(throughput(store, args.jobs))
                print(f"  {backend} x{n_workers}: {runs[-1]['jobs_per_s']:.0f} jobs/s "
                      f"({runs[-1]['jobs']} jobs in {runs[-1]['seconds']:.2f} s)", flush=True)
            # The median run: on a shared VM one run can land in a slow minute.
            tp = dict(sorted(runs, key=lambda r: r["jobs_per_s"])[len(runs) // 2])
            tp["runs_jobs_per_s"] = [r["jobs_per_s"] for r in runs]
            time.sleep(0.5)
            lat = latency(store, args.samples, args.gap)
            print(f"  {backend} x{n_workers}: latency p50 {lat['p50_ms_from_insert']:.1f} ms, "
                  f"p99 {lat['p99_ms_from_insert']:.1f} ms (from insert)", flush=True)
            children.stop_all()
            codes = [p.returncode for p in procs]
    finally:
        store.close()
        shutil.rmtree(home, ignore_errors=True)
    return {"backend": backend, "workers": n_workers, "throughput": tp, "latency": lat,
            "worker_exit_codes": codes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, for a trial")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--workers", default="1,4", help="worker process counts")
    ap.add_argument("--jobs", type=int, default=None, help="jobs per throughput run [3000]")
    ap.add_argument("--samples", type=int, default=None, help="latency samples [200]")
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between latency jobs")
    ap.add_argument("--repeat", type=int, default=5, help="throughput runs per case [5]")
    args = ap.parse_args()
    args.jobs = args.jobs or (300 if args.quick else 3000)
    args.samples = args.samples or (30 if args.quick else 200)
    install_cleanup()
    run = Run("bench_queue", args)
    print(run.header(), flush=True)
    cases = []
    for backend in args.backends.split(","):
        if backend == "postgresql" and not pg_available():
            print("PostgreSQL unreachable: skipped", flush=True)
            continue
        for n in (int(x) for x in args.workers.split(",")):
            cases.append(run_case(backend, n, args))
    run.results = {"cases": cases}
    rows = []
    for c in cases:
        t, lat = c["throughput"], c["latency"]
        spread = t["runs_jobs_per_s"]
        rows.append([c["backend"], c["workers"], t["jobs"],
                     f"{t['jobs_per_s']:.0f} ({min(spread):.0f}-{max(spread):.0f})",
                     lat["p50_ms_from_insert"], lat["p99_ms_from_insert"],
                     lat["p50_ms_from_commit"], lat["p99_ms_from_commit"]])
    md = table(["backend", "workers", "jobs a run",
                f"jobs/s, median of {args.repeat} runs (min-max)",
                "start latency p50 ms (insert → started)", "p99 ms",
                "p50 ms (commit returned → started)", "p99 ms"], rows)
    run.finish(md)


if __name__ == "__main__":
    main()
