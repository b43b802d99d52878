"""What a real worker costs its PostgreSQL at the default settings: connections held, and
transactions (a heartbeat carries the progress; no sweep but the sweeper's; no busy poll).

The rates themselves are measured in bench/bench_worker_load.py; here, the behaviour
behind them: a count of what the database saw, with generous bounds that a worker which
flushed progress on its own, swept on every beat or polled while idle would break by far.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from conftest import Env, wait_until
from spotrun.jobs import JobState

pytestmark = pytest.mark.slow


def _admin(url: str) -> psycopg.Connection[Any]:
    """A connection to the server's ``postgres`` database: reading another database's
    counters from there adds nothing to them."""
    return psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True)


def _window(url: str, seconds: float, apps: list[str]) -> tuple[int, int]:
    """Transactions the database of ``url`` counted over ``seconds``, and the most
    connections any of ``apps`` held (sampled every second)."""
    dbname = url.rsplit("/", 1)[1]
    with _admin(url) as conn:
        def xacts() -> int:
            row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                               "WHERE datname = %s", (dbname,)).fetchone()
            assert row is not None
            return int(row[0])

        start, most = xacts(), 0
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            time.sleep(1.0)
            for app in apps:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                                   " AND application_name = %s", (dbname, app)).fetchone()
                assert row is not None
                most = max(most, int(row[0]))
        return xacts() - start, most


def test_a_busy_and_an_idle_worker_hold_two_connections_each_and_cost_a_beat_or_less(
        env_factory: Any, pg_url: str) -> None:
    env: Env = env_factory(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # Autovacuum's transactions are counted as the database's too: not the workers'.
        for (table,) in conn.execute("SELECT tablename FROM pg_tables "
                                     "WHERE schemaname = 'public'").fetchall():
            conn.execute(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')
    store = env.store()
    job = store.submit("sleep", {"seconds": 600, "steps": 6000})
    # Defaults everywhere (the tests' short heartbeats unset): only the pool of the idle
    # worker differs (nothing runs there).
    defaults = {"SPOTRUN_HEARTBEAT_SECONDS": "", "SPOTRUN_IDLE_HEARTBEAT_SECONDS": ""}
    busy = env.worker("busy", **defaults,
                      SPOTRUN_DATABASE_URL=f"{pg_url}?application_name=t-busy")
    idle = env.worker("idle", "--pool", "nowhere", **defaults,
                      SPOTRUN_DATABASE_URL=f"{pg_url}?application_name=t-idle")
    busy.wait_ready()
    idle.wait_ready()
    try:
        wait_until(lambda: store.get(job.id).state is JobState.RUNNING, 30, "job running")
        # Past the workers' start-up: a backend reports its counts to pg_stat_database up
        # to 10 s late (PGSTAT_IDLE_INTERVAL), so the window must start after that.
        time.sleep(12.0)
        step0 = store.get(job.id).progress.step
        txs, most = _window(pg_url, 20.0, ["t-busy", "t-idle"])
        seen = store.get(job.id)
    finally:
        store.close()
    assert most <= 2, f"a worker held {most} connections"
    # 20 s: the busy worker beats 8 times (2.5 s) with its progress; the idle one beats
    # once (20 s), or 8 times if it holds the sweeper lease, and polls once or twice (15 s,
    # jittered). The database's counters lag by about a second at each end. A progress
    # flush of its own (the old 0.5 s) would be 40 more, a sweep every beat 16, an idle
    # poll every 0.1 s 200.
    assert txs <= 26, f"the two workers sent {txs} transactions in 20 s"
    assert seen.progress.step > step0  # the progress still comes, with the heartbeat
    assert seen.state is JobState.RUNNING and seen.attempt == 1


def test_an_idle_worker_hears_a_new_job_on_the_connection_its_claims_use(
        env_factory: Any, pg_url: str) -> None:
    env: Env = env_factory(pg_url)
    # A fallback poll of ten minutes: only the wake-up can start the job in time.
    w = env.worker("w1", SPOTRUN_IDLE_POLL_SECONDS="600",
                   SPOTRUN_DATABASE_URL=f"{pg_url}?application_name=t-wake")
    w.wait_ready()
    store = env.store()
    try:
        time.sleep(2.0)  # the worker waits, listening
        # A first job, and the next ones after it went idle again: each runs past a
        # heartbeat, so that the worker's row said busy before it said idle again.
        for n in range(3):
            job = store.submit("sleep", {"seconds": 3, "steps": 3})
            wait_until(lambda j=job: store.get(j.id).state is JobState.SUCCEEDED, 20,
                       f"job {n} to run", on_fail=w.log)
            time.sleep(1.0)
        with _admin(pg_url) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name"
                               " = 't-wake'").fetchone()
        assert row is not None and row[0] <= 2
    finally:
        store.close()


def test_an_idle_worker_hears_the_next_job_after_one_shorter_than_its_reporters_tick(
        env_factory: Any, pg_url: str) -> None:
    """Jobs of no time at all, one after another, each queued once the last has ended:
    each starts on its wake-up. The claim marked the worker's row busy and no beat saw the
    job, so the claim that found nothing next must mark it idle again, or no later job
    would wake it."""
    env: Env = env_factory(pg_url)
    w = env.worker("w1", SPOTRUN_IDLE_POLL_SECONDS="600")
    w.wait_ready()
    store = env.store()
    try:
        time.sleep(1.0)
        for n in range(5):
            job = store.submit("sleep", {"seconds": 0, "steps": 1})
            wait_until(lambda j=job: store.get(j.id).state is JobState.SUCCEEDED, 10,
                       f"job {n} to run", on_fail=w.log)
            time.sleep(0.3)  # the worker waits again, listening
    finally:
        env.stop_all()
        store.close()
