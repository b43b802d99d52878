"""spotrun through a real PgBouncer in transaction pooling mode (as Cloud SQL and RDS users
run one): its bounds hold per transaction and leave nothing on the pooler's connections,
an idle worker polls or LISTENs on a direct URL, and real workers hand jobs back through
it. The store's contract suite runs through it too (``db_url``'s ``pgbouncer``)."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from conftest import (
    Env,
    _pg_admin,
    _pg_url_for,
    fresh_pg_database,
    through_pgbouncer,
    wait_until,
)
from spotrun.jobs import JobState
from spotrun.store import JobStore
from spotrun.store.errors import StoreError
from spotrun.store.postgres import ListenWaker, PollWaker
from test_worker import exits_within, final, messages, reference_sha, running_on, submit


@pytest.fixture
def direct_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def pooled_url(direct_url: str, pgbouncer_port: int) -> str:
    return through_pgbouncer(direct_url, pgbouncer_port)


def _worker(store: JobStore) -> str:
    return store.register_worker(name="w1", host="h", pid=1, pool="spot", has_cuda=False,
                                 lease_seconds=10)


def test_the_bounds_hold_per_transaction_and_leave_the_pooled_sessions_as_they_were(
        pooled_url: str, pgbouncer_port: int) -> None:
    store = JobStore.open(pooled_url, statement_timeout=1)
    stall = JobStore.open(pooled_url)
    try:
        wid = _worker(store)
        store.submit("sleep", {"seconds": 0})
        assert store.claim(worker_id=wid, worker_name="w1", lease_seconds=10) is not None
        # A write that waits on a lock past the bound fails instead of hanging: the bound
        # held in its transaction, on whichever server connection the pooler gave it.
        t = threading.Thread(target=stall.stall_writes, args=(3.0,))
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        with pytest.raises(StoreError):
            store.submit("sleep", {"seconds": 0})
        assert time.monotonic() - t0 < 2.5
        t.join()
        # Other clients of the pooler find the server's defaults: nothing was left set.
        with psycopg.connect(pooled_url.split("?", 1)[0], autocommit=True,
                             prepare_threshold=None) as other:
            for _ in range(10):  # PgBouncer may hand any of its server connections
                assert other.execute("SHOW statement_timeout").fetchone() == ("0",)
                assert other.execute("SHOW lock_timeout").fetchone() == ("0",)
                assert other.execute(
                    "SHOW idle_in_transaction_session_timeout").fetchone() == ("0",)
    finally:
        stall.close()
        store.close()


def test_an_idle_worker_polls_or_listens_on_the_direct_url(
        pooled_url: str, direct_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore.open(pooled_url)
    try:
        monkeypatch.delenv("SPOTRUN_LISTEN_URL", raising=False)
        wid = _worker(store)
        store.beat(wid, [], 10.0, alive_for=60.0)  # idle: a submit wakes it
        poll = store.waker(wid)
        assert isinstance(poll, PollWaker)
        t0 = time.monotonic()
        assert not poll.wait(0.2)  # no wake-up comes through a pooler: only the poll's time
        assert time.monotonic() - t0 >= 0.2
        poll.close()

        monkeypatch.setenv("SPOTRUN_LISTEN_URL", direct_url)
        waker = store.waker(wid)
        assert isinstance(waker, ListenWaker)
        try:
            assert waker.wait(0.2)  # it starts listening: look once more, a job queued
            # before the LISTEN sent a notice nobody heard
            assert not waker.wait(0.2)  # listening, nothing changed
            threading.Timer(0.3, store.submit, args=("sleep", {"seconds": 0})).start()
            t0 = time.monotonic()
            assert waker.wait(10)  # the submit's wake-up of the idle worker, past the pooler
            assert time.monotonic() - t0 < 5
        finally:
            waker.close()
    finally:
        store.close()


def test_processes_starting_at_once_migrate_a_new_database_through_the_pooler(
        pgbouncer_port: int) -> None:
    """The migration lock is transaction-scoped: it holds through the pooler."""
    from spotrun import migrations

    name = f"spotrun_m_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        url = through_pgbouncer(_pg_url_for(name), pgbouncer_port)
        opened: list[JobStore] = []
        threads = [threading.Thread(target=lambda: opened.append(JobStore.open(url)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(opened) == 3
        for s in opened:
            assert s.current_revision() == migrations.head_revision()
            s.close()
    finally:
        with _pg_admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_bad_pooler_option_is_a_clear_error(direct_url: str) -> None:
    with pytest.raises(StoreError, match="spotrun_pooler=session"):
        JobStore.open(direct_url + "?spotrun_pooler=session")


@pytest.mark.slow
def test_workers_hand_a_job_back_and_finish_it_through_the_pooler(
        pooled_url: str, env_factory: Callable[..., Env]) -> None:
    """The drill: real workers, no LISTEN (they poll), a SIGTERM mid-job, a resume."""
    # Behind a pooler with no direct URL the poll is an idle worker's only wake-up: a
    # small fleet lowers it (docs/deploy-gke.md).
    env = env_factory(pooled_url, SPOTRUN_IDLE_POLL_SECONDS="1")
    st = env.store()
    try:
        params = {"epochs": 4, "seed": 3, "step_delay": 0.03}
        job_id = submit(env, "digits-train", *(f"{k}={v}" for k, v in params.items()))
        quick = [submit(env, "sleep", "seconds=0") for _ in range(5)]
        live = {name: env.worker(name, preload=True) for name in ("w1", "w2")}
        name = running_on(st, job_id, min_step=15)
        w = live.pop(name)
        w.signal(signal.SIGTERM)
        exits_within(w, 5)
        live["w3"] = env.worker("w3", preload=True)
        job = final(st, job_id, 120)
        assert job.state is JobState.SUCCEEDED, messages(job)
        assert job.preemptions == 1 and job.retries == 0
        assert job.result["weights_sha256"] == reference_sha(epochs=4, seed=3), messages(job)
        for q in quick:
            assert final(st, q).state is JobState.SUCCEEDED
        wait_until(lambda: all("ready" in p.log() for p in live.values()), 30, "ready")
        for p in live.values():
            assert "Traceback" not in p.log(), p.log()
    finally:
        st.close()


def test_a_pooler_the_url_does_not_declare_is_named_in_one_line(
        direct_url: str, pgbouncer_port: int) -> None:
    # Directly connected, the hot path prepares its statements on the connection; through
    # a transaction pooler the next execute may reach another server session, where the
    # statement is unknown. The user learns which setting they missed, and nothing is
    # half-written.
    undeclared = through_pgbouncer(direct_url, pgbouncer_port).split("?", 1)[0]
    store = JobStore.open(undeclared, pool_size=1)
    holder = psycopg.connect(undeclared)
    try:
        store.submit("sleep", {"seconds": 0})  # prepared on the server session it got
        # Another client holds that session (the pooler hands out the one freed last),
        # so the store's next statement goes to a session that never saw it prepared.
        holder.execute("SELECT 1")
        with pytest.raises(StoreError) as raised:
            store.submit("sleep", {"seconds": 1})
        message = str(raised.value)
        assert "spotrun_pooler=transaction" in message and "\n" not in message
        holder.rollback()
        direct = JobStore.open(direct_url)
        try:
            assert [j.params for j in direct.list_jobs()] == [{"seconds": 0}]
        finally:
            direct.close()
    finally:
        holder.close()
        store.close()
