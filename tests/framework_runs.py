"""What the framework-integration tests share: an example installed for real processes, its
uninterrupted reference run in a process of its own, and a job preempted by real SIGTERMs
at random steps."""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conftest import Env, wait_until
from spotrun.jobs import Job, JobState
from spotrun.store import JobStore

REFERENCE = """
import json, sys
from spotrun.local import run_inline
print("RESULT " + json.dumps(run_inline(sys.argv[1], json.loads(sys.argv[2]))))
"""


class Reference:
    """An uninterrupted run, in a process of its own (the framework is imported there, not
    in the test process), started by :meth:`start` so that it runs while the test's own job
    does. Its temporary files go to a directory of its own, apart from the workers'."""

    def __init__(self, env: Env, pipeline: str, params: dict[str, Any]) -> None:
        self.env, self.pipeline, self.params = env, pipeline, params
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        tmp = self.env.home / "reference-tmp"
        tmp.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REFERENCE, self.pipeline, json.dumps(self.params)],
            env={**self.env.vars, "TMPDIR": str(tmp)}, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def result(self) -> dict[str, Any]:
        """The run's result, once it ended (started now if it was not)."""
        if self.proc is None:
            self.start()
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, err[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        return dict(json.loads(line[len("RESULT "):]))


def _running_past(st: JobStore, job_id: str, step: int) -> str | None:
    job = st.get(job_id, with_events=False)
    # A job that ended (failed, or done before the notice) will never get there: say so now,
    # with its history, rather than after the whole wait.
    assert not job.state.is_final, (job.state, job.error, _messages(st, job_id))
    if job.state is JobState.RUNNING and job.worker and job.progress.step >= step:
        return job.worker
    return None


def _messages(st: JobStore, job_id: str) -> list[str]:
    return [e.message for e in st.get(job_id).events]


@dataclass
class Preempted:
    """A job after its preemptions: the steps it was handed back at, the metrics seen while
    it ran, and the job once it ended."""

    seed: int
    targets: list[int] = field(default_factory=list)  # the store's step each notice followed
    handed: list[int] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    files: list[set[str]] = field(default_factory=list)  # of each hand-back's checkpoint
    job: Job | None = None

    def messages(self) -> list[str]:
        assert self.job is not None
        return [e.message for e in self.job.events]


PROGRESS_LAG_SECONDS = 3.0  # a heartbeat (2 s), and then some


def preempt_three_times(env: Env, pipeline: str, params: dict[str, Any], *, total: int,
                        step_delay: float,
                        after_first: Callable[[], None] | None = None) -> Preempted:
    """Submit ``pipeline``, SIGTERM the worker running it three times at random steps
    (each time past the previous hand-back), replace the first two workers (a warm spare
    takes the job each time), and wait for the end. ``after_first`` runs after the first
    hand-back, once the workers' start-up imports are done (a reference run's start)."""
    args = ["submit", pipeline, "-p", f"step_delay={step_delay}"]
    for k, v in params.items():
        args += ["-p", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    job_id = env.cli(*args).stdout.strip()
    st = env.store()
    try:
        live = {name: env.worker(name, preload=True) for name in ("w1", "w2")}
        run = Preempted(seed=random.randrange(2**32))
        rng = random.Random(run.seed)
        last = 0
        # Progress reaches the store up to a heartbeat late: every notice must leave the
        # job that long still to run, or it may finish before the notice comes.
        end = total - math.ceil(PROGRESS_LAG_SECONDS / step_delay)
        assert end > 12, "too few steps at this step_delay to place three notices"
        for round_ in range(3):
            # Spread the three notices over the run, each at a random step.
            target = last + rng.randint(3, max(4, (end - last) // (4 - round_) - 2))
            target = max(last + 1, min(target, end))
            name = wait_until(functools.partial(_running_past, st, job_id, target), 180,
                              f"job past step {target} (seed {run.seed})",
                              on_fail=lambda: "\n".join(_messages(st, job_id)))
            run.targets.append(target)
            run.metrics.append(dict(st.get(job_id, with_events=False).progress.metrics))
            w = live.pop(name)
            w.signal(signal.SIGTERM)
            assert w.wait(60) == 0, w.log()
            job = st.get(job_id)
            assert job.preemptions == round_ + 1, [e.message for e in job.events]
            handed = [e.message for e in job.events if e.kind == "preempted"][-1]
            assert "checkpoint saved in" in handed, handed
            last = int(handed.split("at step ")[1].split("/")[0])
            assert job.checkpoint is not None
            run.files.append({p.name for p in (env.home / "checkpoints" / job.checkpoint)
                              .rglob("*") if p.is_file()})
            run.handed.append(last)
            if round_ == 0 and after_first is not None:
                after_first()
            if round_ < 2:  # after the last notice, the spare left finishes the job
                live[f"w{round_ + 3}"] = env.worker(f"w{round_ + 3}", preload=True)
        wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 300,
                   "the job to end")
        run.job = st.get(job_id)
        return run
    finally:
        st.close()
