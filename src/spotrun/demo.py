"""``spotrun demo``: the whole story in one command, on the embedded default.

Two workers start; a digits-train job is submitted; the worker running it is preempted
midway (SIGTERM, as a spot VM would get); the other worker resumes it from the checkpoint;
the final weights are compared with an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from spotrun.config import Settings
from spotrun.jobs import Job, JobState
from spotrun.local import run_inline
from spotrun.store import JobStore

Echo = Callable[[str], None]


@contextlib.contextmanager
def _workers(settings: Settings, names: list[str], log_dir: Path
             ) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    env = {**os.environ, "SPOTRUN_HOME": str(settings.home),
           "SPOTRUN_DATABASE_URL": settings.database_url,
           "SPOTRUN_CHECKPOINT_URL": settings.checkpoint_url}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in names:
            log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "spotrun", "worker", "--name", name],
                env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _bar(job: Job) -> str:
    total = job.progress.total or 0
    step = job.progress.step
    filled = int(30 * step / total) if total else 0
    where = f" on {job.worker}" if job.worker else ""
    return f"[{'#' * filled}{'.' * (30 - filled)}] step {step}/{total or '?'}{where}"


def run_demo(settings: Settings, *, epochs: int = 10, step_delay: float = 0.02,
             echo: Echo = print) -> int:
    """Run the story; return 0 when the resumed weights equal the uninterrupted ones."""
    store = JobStore.open(settings.database_url)
    log_dir = settings.home / "demo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    params = {"epochs": epochs, "step_delay": step_delay, "seed": 7, "device": "cpu"}
    echo("spotrun demo: two workers, one digits-train job, one preemption.")
    echo(f"  database: {settings.database_url}  (worker logs in {log_dir})")
    with _workers(settings, ["demo-w1", "demo-w2"], log_dir) as procs:
        _wait_ready(store, {name: p.pid for name, p in procs.items()}, echo)
        job = store.submit("digits-train", params)
        echo(f"submitted digits-train job {job.id} with {params}")
        preempted = ""
        last = ""
        while True:
            job = store.get(job.id, with_events=False)
            line = _bar(job)
            if line != last:
                echo("  " + line)
                last = line
            total = job.progress.total or 0
            if not preempted and job.state is JobState.RUNNING and total and \
                    job.progress.step >= total * 0.4 and job.worker in procs:
                preempted = job.worker
                echo(f"preempting {preempted} now (SIGTERM, as a spot VM gets it)...")
                procs[preempted].send_signal(signal.SIGTERM)
                notice = time.monotonic()
                code = procs[preempted].wait(30)
                echo(f"  {preempted} handed the job back and exited {code} after "
                     f"{time.monotonic() - notice:.2f} s")
            if job.state.is_final:
                break
            time.sleep(0.3)
    job = store.get(job.id)
    store.close()
    echo("")
    echo(f"job {job.id}: {job.state.value}")
    echo("timeline:")
    for e in job.events:
        echo(f"  {e.at.astimezone():%H:%M:%S.%f}"[:-3] + f"  {e.message}")
    if job.state is not JobState.SUCCEEDED:
        echo(f"the job did not succeed: {job.error}")
        return 1
    echo("")
    echo("training the same job uninterrupted, for comparison...")
    reference = run_inline("digits-train", {**params, "step_delay": 0})
    resumed_sha = job.result["weights_sha256"]
    echo(f"  weights after preemption and resume: {resumed_sha}")
    echo(f"  weights of an uninterrupted run:     {reference['weights_sha256']}")
    if resumed_sha == reference["weights_sha256"] and job.preemptions >= 1:
        echo(f"identical: the preemption cost no work, accuracy {job.result['accuracy']:.3f}.")
        return 0
    echo("the weights differ (or no preemption happened): see the worker logs")
    return 1


def _wait_ready(store: JobStore, pids: dict[str, int], echo: Echo) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = {(w.name, w.pid) for w in store.list_workers(include_stopped=False)}
        if all(item in live for item in pids.items()):
            echo(f"workers ready: {', '.join(pids)}")
            return
        time.sleep(0.2)
    raise RuntimeError("the demo workers did not start within 60 s")
