"""Stop paths under faults: real workers, real signals, pipelines that misbehave.

SIGINT checkpoints; a hung step cannot keep its job past a cancel or a time limit; an
error while unwinding after a notice hands the job back; the forced hand-back at the
deadline applies the job's policy. The policy itself, for every stop, is tested in-process
in test_worker_decisions.py.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fault_pipelines
from conftest import Env, WorkerProc, wait_until
from spotrun.events import end_step, payload_of
from spotrun.jobs import JobState
from spotrun.store import JobStore
from spotrun.worker import EXIT_STUCK
from test_worker import FAST, exits_within, final, messages, running_on, submit

pytestmark = pytest.mark.slow


@pytest.fixture
def fenv(env_factory: Callable[..., Env], db_url: str, tmp_path: Path) -> Env:
    """Real processes on both databases, with the misbehaving pipeline installed."""
    return env_factory(db_url, PYTHONPATH=fault_pipelines.install(tmp_path / "plugin"))


@pytest.fixture
def st(fenv: Env) -> Iterator[JobStore]:
    s = fenv.store()
    yield s
    s.close()


def _exit_code(w: WorkerProc, timeout: float = 60) -> int:
    return w.wait(timeout)


def _hang(env: Env, tmp_path: Path, name: str, *extra: str) -> tuple[str, Path]:
    """Submit a job whose second step never returns; the path its attempts touch there."""
    flag = tmp_path / name
    return submit(env, "faults", "mode=hang", f"flag={flag}", extra=extra), flag


def _hanging(flag: Path, attempt: int) -> None:
    wait_until(Path(f"{flag}.{attempt}").exists, 60, f"attempt {attempt} to hang")


# ------------------------------------------------------------------- item: SIGINT


def test_sigint_hands_back_with_a_checkpoint_and_is_no_preemption(
        fenv: Env, st: JobStore) -> None:
    w1 = fenv.worker("w1", *FAST)
    job_id = submit(fenv, "sleep", "seconds=60", "steps=600")
    running_on(st, job_id, min_step=10)
    w1.signal(signal.SIGINT)
    exits_within(w1, 10)
    job = st.get(job_id)
    assert job.state is JobState.QUEUED and job.preemptions == 0, messages(job)
    handed = job.events[-1]
    assert handed.kind == "handed_back", messages(job)
    assert handed.message.startswith("worker w1 was stopped at step ")
    assert "checkpoint saved in" in handed.message, handed.message
    at = end_step(payload_of(handed))
    assert at is not None, handed.message
    assert job.checkpoint_step == at
    w2 = fenv.worker("w2", *FAST)
    running_on(st, job_id, min_step=at + 1)
    assert f"resumed on w2 from step {at}/600" in messages(st.get(job_id))
    w2.signal(signal.SIGTERM)
    exits_within(w2, 10)


# -------------------------------------------------------- item: errors while unwinding


def test_an_error_while_unwinding_after_a_notice_hands_the_job_back(
        fenv: Env, st: JobStore) -> None:
    w1 = fenv.worker("w1", "--concurrency", "2", *FAST)
    raising = submit(fenv, "faults", "mode=unwind-error")
    swallowing = submit(fenv, "faults", "mode=swallow-stop")
    running_on(st, raising, min_step=5)
    running_on(st, swallowing, min_step=5)
    w1.signal(signal.SIGTERM)
    exits_within(w1, 10)
    job = st.get(raising)
    assert job.state is JobState.QUEUED and job.preemptions == 1, messages(job)
    handed = job.events[-1].message
    assert "checkpoint saved in" in handed and "while it unwound" in handed, handed
    assert "RuntimeError: DataLoader worker (pid 4242) is killed by signal" in handed
    # JobStopped is no Exception: `except Exception:` cannot turn the stop into a success.
    job = st.get(swallowing)
    assert job.state is JobState.QUEUED and job.result is None, messages(job)
    assert "checkpoint saved in" in job.events[-1].message
    fenv.worker("w2", "--concurrency", "2", *FAST)
    for job_id in (raising, swallowing):
        job = final(st, job_id, 120)
        assert job.state is JobState.SUCCEEDED and job.result["resumed_from"] > 0, \
            messages(job)


# ------------------------------------------------- item: the forced hand-back's policy


def test_the_forced_hand_back_at_the_deadline_applies_the_jobs_policy(
        fenv: Env, st: JobStore, tmp_path: Path) -> None:
    # Steps that never return: no step boundary before the deadline.
    w1 = fenv.worker("w1", "--concurrency", "2", "--grace-seconds", "3", *FAST)
    must_fail, fail_flag = _hang(fenv, tmp_path, "fail", "--on-preempt", "fail")
    escalates, esc_flag = _hang(fenv, tmp_path, "esc", "--max-preemptions", "0")
    _hanging(fail_flag, 1)
    _hanging(esc_flag, 1)
    w1.signal(signal.SIGTERM)
    exits_within(w1, 10)
    job = st.get(must_fail)
    assert job.state is JobState.FAILED, messages(job)
    assert job.error is not None and "on_preempt=fail" in job.error
    assert "before the step in flight finished" in job.error
    job = st.get(escalates)
    assert job.state is JobState.QUEUED and job.preemptions == 1, messages(job)
    assert job.pool == "on-demand"  # type: ignore[attr-defined]
    assert messages(job)[-1].startswith("moved to the on-demand pool: preempted 1 times")

    # SIGINT: the operator stopping a worker, not a preemption, even when forced.
    w2 = fenv.worker("w2", "--grace-seconds", "3", "--pool", "on-demand", *FAST)
    _hanging(esc_flag, 2)
    w2.signal(signal.SIGINT)
    exits_within(w2, 10)
    job = st.get(escalates)
    assert job.state is JobState.QUEUED and job.preemptions == 1, messages(job)
    assert job.events[-1].kind == "handed_back"
    assert job.events[-1].message.startswith(
        "worker w2 was stopped at step 1/2 before the step in flight finished")


# ----------------------------------------------------------- item: a step that hangs


def test_a_hung_step_ends_at_its_cancel_or_time_limit_and_the_worker_restarts(
        fenv: Env, st: JobStore, tmp_path: Path) -> None:
    # Today a cancel or a time limit only raises a flag the hung step never reads.
    hung, flag = _hang(fenv, tmp_path, "hung")
    other = submit(fenv, "sleep", "seconds=60", "steps=600")
    w1 = fenv.worker("w1", "--concurrency", "2", "--grace-seconds", "3", *FAST)
    _hanging(flag, 1)
    running_on(st, other, min_step=2)
    fenv.cli("cancel", hung)
    job = final(st, hung, 60)
    assert job.state is JobState.CANCELLED, messages(job)
    assert _exit_code(w1) == EXIT_STUCK, w1.log()
    log = w1.log()
    assert "did not stop within 3.0 s" in log and f"exiting {EXIT_STUCK}" in log
    job = st.get(other)
    # The worker's other job went back with a checkpoint, not as a preemption.
    assert job.state is JobState.QUEUED and job.preemptions == 0, messages(job)
    assert "checkpoint saved in" in job.events[-1].message, messages(job)

    timed, _ = _hang(fenv, tmp_path, "timed", "--timeout", "2")
    w2 = fenv.worker("w2", "--concurrency", "2", "--grace-seconds", "3", *FAST)
    job = final(st, timed, 60)
    assert job.state is JobState.FAILED, messages(job)
    assert job.error is not None and "time limit of 2 s" in job.error
    assert _exit_code(w2) == EXIT_STUCK, w2.log()
    # Ended without its thread: no lease of it was renewed, no write of it reached the
    # store after the failure.
    failed_at = next(e.at for e in job.events if e.kind == "failed")
    assert not [e for e in st.get(timed).events if e.at > failed_at]
