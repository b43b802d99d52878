"""Poison jobs: a job that kills its worker is failed after max_retries, not passed from
worker to worker; a job past its memory limit fails alone and its worker runs on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import fault_pipelines
from conftest import Env, WorkerProc, wait_until
from spotrun.events import FailCause, Failed, LeaseExpired, payload_of
from spotrun.jobs import EventKind, JobState
from spotrun.store import JobStore, Lease

FAST = ("--lease-seconds", "1.5", "--heartbeat-seconds", "0.3")


def _dead_pid() -> int:
    """The pid of a process of this host that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _attempt(store: JobStore, name: str, pid: int) -> Lease:
    wid = store.register_worker(name=name, host=socket.gethostname(), pid=pid, pool="spot",
                                has_cuda=False, lease_seconds=10)
    got = store.claim(worker_id=wid, worker_name=name, lease_seconds=10)
    assert got is not None
    lease = got[0]
    store.save_progress(lease, 4, 10, {})
    return lease


def _lapse(store: JobStore, job_id: str) -> None:
    store.expire_lease_now(job_id)
    assert store.sweep_expired() == [job_id]


def test_a_job_whose_worker_died_each_time_fails_as_a_poison_job(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0}, max_retries=2)
    for i in range(3):
        _attempt(store, f"w{i}", _dead_pid())
        _lapse(store, job.id)
    got = store.get(job.id)
    assert got.state is JobState.FAILED and got.retries == 3
    assert got.error == (
        "the job's worker died 3 times in a row while running it (killed by the kernel or "
        "a crash; last: w2 at step 4/10); not retried further (max_retries=2)")
    expiries = [e for e in got.events if e.kind == EventKind.LEASE_EXPIRED]
    assert [e.message for e in expiries] == [
        f"lease of worker w{i} expired at step 4/10 (its process had died); back in the queue"
        for i in range(2)]
    last = payload_of(got.events[-1])
    assert isinstance(last, Failed) and last.cause is FailCause.WORKER_DIED
    assert last.message() == got.events[-1].message == f"failed: {got.error}"


def test_a_graceful_hand_back_ends_the_run_and_a_live_workers_expiry_is_no_death(
        store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0}, max_retries=2)
    # A worker frozen or cut off (its process alive) lapses: counted, but no death.
    _attempt(store, "frozen", os.getpid())
    _lapse(store, job.id)
    # A preemption hands the job back gracefully: no retry, and the run of deaths restarts.
    lease = _attempt(store, "preempted", _dead_pid())
    store.hand_back(lease, "preempted on preempted at step 4/10; checkpoint saved in 0.1 s")
    for name in ("d1", "d2"):
        _attempt(store, name, _dead_pid())
        _lapse(store, job.id)
    got = store.get(job.id)
    assert got.state is JobState.FAILED and got.retries == 3 and got.preemptions == 1
    assert got.error == (
        "the job's worker died 2 times in a row while running it (killed by the kernel or "
        "a crash; last: d2 at step 4/10); it lost its worker 3 times in all; not retried "
        "further (max_retries=2)")
    first = next(payload_of(e) for e in got.events if e.kind == EventKind.LEASE_EXPIRED)
    assert isinstance(first, LeaseExpired) and first.worker == "frozen" and not first.died
    assert "(its process had died)" not in first.message()


def test_a_worker_that_had_this_processs_pid_is_dead(store: JobStore, db_url: str) -> None:
    # A container restarted in its pod: the worker before had the pid this one has.
    job = store.submit("sleep", {"seconds": 0}, max_retries=1)
    before = subprocess.run([sys.executable, "-c", (
        "import os, socket, sys\n"
        "from spotrun.store import JobStore\n"
        "s = JobStore.open(sys.argv[1])\n"
        "print(s.register_worker(name='pod-a', host=socket.gethostname(), pid=os.getppid(),"
        " pool='spot', has_cuda=False, lease_seconds=10))\n"), db_url],
        capture_output=True, text=True, check=True).stdout.strip()
    got = store.claim(worker_id=before, worker_name="pod-a", lease_seconds=10)
    assert got is not None
    _lapse(store, job.id)
    expired = payload_of(store.get(job.id).events[-1])
    assert isinstance(expired, LeaseExpired) and expired.died


# ------------------------------------------------------------- real worker processes


@pytest.fixture
def fenv(env_factory: Callable[..., Env], db_url: str, tmp_path: Path) -> Env:
    return env_factory(db_url, PYTHONPATH=fault_pipelines.install(tmp_path / "plugin"))


def _submit(env: Env, *args: str) -> str:
    return env.cli("submit", *args).stdout.strip()


def _final(st: JobStore, job_id: str, timeout: float = 90) -> None:
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, timeout,
               f"job {job_id} to end",
               on_fail=lambda: "\n".join(e.message for e in st.get(job_id).events))


@pytest.mark.slow
def test_a_segfaulting_job_takes_max_retries_plus_one_workers_then_fails(fenv: Env) -> None:
    st = fenv.store()
    try:
        job_id = _submit(fenv, "faults", "-p", "mode=segfault", "--max-retries", "2")
        crashed: list[WorkerProc] = []
        # A supervisor (systemd, a Deployment) restarts each worker that dies.
        while True:
            w = fenv.worker(f"w{len(crashed)}", *FAST)
            wait_until(lambda: w.proc.poll() is not None  # noqa: B023
                       or st.get(job_id, with_events=False).state.is_final, 90,
                       "the worker to die or the job to end", on_fail=w.log)
            if w.proc.poll() is None:
                break
            assert w.wait() == -signal.SIGSEGV, w.log()
            crashed.append(w)
            assert len(crashed) <= 3, "the job took a fourth worker down"
        _final(st, job_id)
        job = st.get(job_id)
        assert len(crashed) == 3
        assert job.state is JobState.FAILED, [e.message for e in job.events]
        assert job.error == (
            "the job's worker died 3 times in a row while running it (killed by the kernel "
            "or a crash; last: w2 at step 1/600); not retried further (max_retries=2)")
        # The survivor swept the last lease, and goes on: it runs the next job.
        ok = _submit(fenv, "sleep", "-p", "seconds=0.2", "-p", "steps=2")
        _final(st, ok)
        assert st.get(ok, with_events=False).state is JobState.SUCCEEDED
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
    finally:
        st.close()


@pytest.mark.slow
def test_a_job_over_its_memory_limit_fails_and_its_worker_runs_the_next(fenv: Env) -> None:
    st = fenv.store()
    try:
        w = fenv.worker("w1", *FAST, "--memory-limit", "1.5")
        w.wait_ready()
        big = _submit(fenv, "faults", "-p", "mode=allocate-torch", "-p", "steps=10")
        huge = _submit(fenv, "faults", "-p", "mode=allocate-python", "-p", "steps=10")
        ok = _submit(fenv, "sleep", "-p", "seconds=0.2", "-p", "steps=2")
        for job_id in (big, huge, ok):
            _final(st, job_id)
        torch_job, python_job = st.get(big), st.get(huge)
        assert torch_job.state is JobState.FAILED and python_job.state is JobState.FAILED
        assert torch_job.error is not None and torch_job.error.startswith(
            "the job used more than 1.5 GB (its memory limit) at step 1/10: RuntimeError: "
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 268435456 bytes"
        ), torch_job.error
        assert python_job.error == (
            "the job used more than 1.5 GB (its memory limit) at step 2/10: MemoryError: ")
        assert torch_job.retries == 0 and torch_job.attempt == 1
        after = st.get(ok, with_events=False)
        assert after.state is JobState.SUCCEEDED and after.worker == "w1"
        assert w.proc.poll() is None, w.log()
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
    finally:
        st.close()


def test_a_memory_limit_is_refused_on_a_cuda_worker(fenv: Env) -> None:
    w = fenv.worker("gpu", "--memory-limit", "4", SPOTRUN_WORKER_CUDA="1")
    assert w.wait(60) != 0
    assert "a job memory limit (SPOTRUN_JOB_MEMORY_GB, --memory-limit) is for CPU workers" \
        in w.log()
    assert "Traceback" not in w.log()
