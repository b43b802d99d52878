"""The worker's preload of the ML stack: a job it claims meanwhile waits for it, and a
notice during that wait hands the job straight back."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from conftest import Env, wait_until
from spotrun.jobs import JobState

pytestmark = pytest.mark.slow


@pytest.fixture
def sqlite_env(env_factory: Callable[..., Env], sqlite_url: str) -> Env:
    return env_factory(sqlite_url)


def test_a_notice_while_the_preload_runs_hands_the_claimed_job_back(sqlite_env: Env) -> None:
    env = sqlite_env
    job_id = env.cli("submit", "sleep", "-p", "seconds=1", "-p", "steps=10").stdout.strip()
    w1 = env.worker("w1", preload=True)  # claims the job at once, seconds before its preload ends
    st = env.store()
    try:
        wait_until(lambda: st.get(job_id, with_events=False).state is JobState.RUNNING, 60,
                   "the job to be claimed", on_fail=w1.log)
        w1.signal(signal.SIGTERM)
        assert w1.wait(60) == 0, w1.log()
        job = st.get(job_id)
        assert job.state is JobState.QUEUED and job.preemptions == 1, job.events
        handed = [e.message for e in job.events if e.kind == "preempted"][-1]
        log = w1.log()
        if job.checkpoint_step is not None:
            # The preload ended before the notice (a fast machine): the job ran, and
            # stopped at a step with its checkpoint.
            assert "checkpoint saved in" in handed, handed
        else:
            # The notice came first: the pipeline never started (nothing to checkpoint,
            # nothing imported beside the preload).
            assert "no checkpoint, the next attempt starts from the beginning" in handed, (
                handed, log)
            assert job.progress.step == 0, job.events
        assert "Traceback" not in log, log

        w2 = env.worker("w2")  # the job runs whole on the next worker
        wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 60,
                   "the job to end", on_fail=w2.log)
        job = st.get(job_id)
        assert job.state is JobState.SUCCEEDED and job.progress.step == 10, job.events
    finally:
        st.close()
