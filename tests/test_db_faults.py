"""Database faults a spot fleet meets, reproduced for real: a restart of the server, a
stalled table, a link that blackholes, a reply lost after its commit.

A restart runs against a private PostgreSQL (as ``spotrun chaos --db-restart`` does), never
the shared one; the other faults go through loopback proxies in ``fault_proxy``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import pytest

from conftest import Env, wait_until
from spotrun.chaos import ChaosError, PrivatePostgres
from spotrun.jobs import EventKind, JobState
from spotrun.store import JobStore

pytestmark = pytest.mark.slow

FAST = ("--lease-seconds", "3", "--heartbeat-seconds", "0.5")


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    try:
        pg = PrivatePostgres.locate()
    except ChaosError as exc:
        pytest.skip(str(exc))
    try:
        pg.create()
        yield pg
    finally:
        pg.destroy()


def submit(env: Env, pipeline: str, *params: str) -> str:
    args = ["submit", pipeline]
    for p in params:
        args += ["-p", p]
    return env.cli(*args).stdout.strip()


def restart(pg: PrivatePostgres, down_seconds: float) -> None:
    import time

    assert pg.stop("fast"), pg.log_tail()
    time.sleep(down_seconds)
    assert pg.start(), pg.log_tail()


def test_a_database_restart_while_idle_and_while_busy_crashes_no_worker(
        env_factory: Callable[..., Env], private_pg: PrivatePostgres) -> None:
    env = env_factory(private_pg.url)
    JobStore.open(private_pg.url).close()
    w = env.worker("w1", *FAST)
    w.wait_ready()
    # Idle: the claim loop and the LISTEN connection meet the restart.
    restart(private_pg, 3.0)
    st = env.store()
    job_id = submit(env, "sleep", "seconds=12", "steps=120")
    wait_until(lambda: st.get(job_id, with_events=False).progress.step >= 10, 60,
               "the job to run", on_fail=w.log)
    # Busy: the reporter and the runner meet it.
    restart(private_pg, 2.0)
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 90,
               "the job to end", on_fail=w.log)
    job = st.get(job_id)
    assert w.proc.poll() is None, w.log()
    assert job.state is JobState.SUCCEEDED, w.log()
    # The outage was short of the lease after the restart: the job kept its one attempt.
    assert job.attempt == 1 and job.retries == 0, [e.message for e in job.events]
    assert EventKind.LEASE_EXPIRED not in [e.kind for e in job.events]
    log = w.log()
    assert "Traceback" not in log, log
    assert "database unreachable" in log, log
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.log()
    st.close()
