"""What each dialect's store must do alike, and what the store promises its callers
beyond the queue: its connections follow the URL, its errors are its own."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from spotrun.events import (
    DATA_VERSION,
    CancelCause,
    Cancelled,
    Failed,
    HandedBack,
    LeaseExpired,
    Preempted,
    Resume,
    Resumed,
    ResumeHow,
    Started,
    Submitted,
    Succeeded,
    payload_of,
)
from spotrun.jobs import EventKind, JobState
from spotrun.store import (
    DatabaseUnavailable,
    JobNotFound,
    JobStore,
    Lease,
    NewJob,
    PostgresStore,
    SqliteStore,
    create_engine,
    worker_channel,
)
from spotrun.store.claim_event import claim_event

# The store suite runs through PgBouncer in transaction mode too (see conftest.py).
PGBOUNCER = True


def _worker(store: JobStore, name: str = "w1") -> str:
    return store.register_worker(name=name, host="h", pid=1, pool="spot", has_cuda=False,
                                 lease_seconds=10)


def test_open_gives_the_dialects_store(store: JobStore) -> None:
    assert isinstance(store, PostgresStore if store.is_postgres else SqliteStore)
    assert type(JobStore(store.engine)) is type(store)
    other = store.reopen(pool_size=1)
    try:
        assert type(other) is type(store)
        assert other.get(store.submit("sleep", {"seconds": 0}).id).state is JobState.QUEUED
    finally:
        other.close()


def test_the_claims_event_is_worded_alike_on_both_dialects(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)

    def claim() -> tuple[Lease, tuple[str, str]]:
        got = store.claim(worker_id=wid, worker_name="w1", lease_seconds=10)
        assert got is not None
        last = store.get(job.id).events[-1]
        return got[0], (last.kind, last.message)

    lease, said = claim()
    assert said == (EventKind.STARTED, "started on w1")
    store.hand_back(lease, HandedBack("w1", 0))
    lease, said = claim()
    assert said == (EventKind.STARTED, "restarted on w1 from the beginning (attempt 2)")
    store.save_progress(lease, 3, 10, {})
    store.commit_checkpoint(lease, "ckpt/3", 3)
    store.hand_back(lease, Preempted("w1", 3, 10, resume=Resume(ResumeHow.KEPT, 3)))
    lease, said = claim()
    assert said == (EventKind.RESUMED, "resumed on w1 from step 3/10")
    # The one wording the SQLite claim renders and PostgreSQL's SQL is generated from.
    assert claim_event(worker="w1", attempt=lease.attempt, checkpoint="ckpt/3",
                       checkpoint_step=3, progress_total=10) == said
    # Each claim's event carries its payload, the same on both dialects.
    claims = [e for e in store.get(job.id).events
              if e.kind in (EventKind.STARTED, EventKind.RESUMED)]
    assert [payload_of(e) for e in claims] == [
        Started("w1", 1), Started("w1", 2), Resumed("w1", 3, 10)]
    assert all(e.data is not None and e.data["v"] == DATA_VERSION for e in claims)


def test_the_stores_own_events_carry_their_payloads(store: JobStore) -> None:
    wid = _worker(store)
    queued = store.submit("sleep", {"seconds": 0})
    store.cancel(queued.id)
    lost = store.submit("sleep", {"seconds": 0}, max_retries=1)
    for _ in range(2):
        got = store.claim(worker_id=wid, worker_name="w1", lease_seconds=10)
        assert got is not None and got[0].job_id == lost.id
        store.save_progress(got[0], 4, 8, {})
        store.expire_lease_now(lost.id)
        store.sweep_expired()
    done = store.submit("sleep", {"seconds": 0})
    got = store.claim(worker_id=wid, worker_name="w1", lease_seconds=10)
    assert got is not None
    store.complete(got[0], {"ok": True}, run_seconds=1.5)

    def payloads(job_id: str) -> list[object]:
        evs = store.get(job_id).events
        assert all(e.data is not None for e in evs), evs
        # The words are the payload's own.
        assert [e.message for e in evs] == [payload_of(e).message() for e in evs]
        return [payload_of(e) for e in evs]

    assert payloads(queued.id) == [Submitted(), Cancelled(CancelCause.QUEUED)]
    assert payloads(lost.id) == [
        Submitted(), Started("w1", 1),
        LeaseExpired("w1", 4, 8, retries=1, max_retries=1), Started("w1", 2),
        Failed.lease_expired(worker="w1", step=4, total=8, retries=2, max_retries=1)]
    assert payloads(done.id) == [Submitted(), Started("w1", 1), Succeeded(run_seconds=1.5)]


def test_expire_lease_now_lets_the_sweep_bring_the_job_back(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    got = store.claim(worker_id=_worker(store), worker_name="w1", lease_seconds=600)
    assert got is not None
    assert store.sweep_expired() == []
    store.expire_lease_now(job.id)
    assert store.sweep_expired() == [job.id]
    assert store.get(job.id).state is JobState.QUEUED
    with pytest.raises(JobNotFound):
        store.expire_lease_now(job.id)  # queued: it holds no lease


def test_a_database_out_of_reach_is_the_stores_own_error() -> None:
    dead = JobStore(create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"))
    try:
        with pytest.raises(DatabaseUnavailable):
            dead.submit("sleep", {"seconds": 0})
        with pytest.raises(DatabaseUnavailable):  # the hot path's own connections too
            dead.claim(worker_id="w", worker_name="w", lease_seconds=10)
        with pytest.raises(DatabaseUnavailable):
            dead.tokens.verify("spr_x")
    finally:
        dead.close()


def test_stalled_writes_wait_while_reads_go_on(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    stall = threading.Thread(target=store.stall_writes, args=(1.5,))
    stall.start()
    time.sleep(0.3)
    try:
        t0 = time.monotonic()
        assert store.get(job.id).state is JobState.QUEUED
        assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        store.submit("sleep", {"seconds": 0})
        assert time.monotonic() - t0 > 0.5
    finally:
        stall.join()


def test_every_connection_keeps_the_urls_query_string(pg_url: str) -> None:
    """The pool's (the hot path's too), the LISTEN waker's and a reopened store's."""
    app = f"spotrun_qs_{uuid.uuid4().hex[:8]}"
    dbname = pg_url.rsplit("/", 1)[1]
    store = JobStore.open(f"{pg_url}?sslmode=disable&application_name={app}")
    wid = _worker(store)
    waker = store.waker(wid)
    beats = store.reopen(pool_size=1, pre_ping=False, statement_timeout=5)
    try:
        store.submit("sleep", {"seconds": 0})
        got = store.claim(worker_id=wid, worker_name="w1", lease_seconds=10)  # hot path
        assert got is not None
        assert beats.heartbeat(wid, [got[0]], 10) == {got[0].job_id: False}
        waker.wait(0.05)  # opens its LISTEN connection
        store.list_jobs()
        with psycopg.connect(pg_url, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT application_name, ssl, query FROM pg_stat_activity a "
                "LEFT JOIN pg_stat_ssl s USING (pid) "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchall()
            listening = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND query LIKE 'LISTEN%%'", (dbname,)).fetchone()
        # The pool's (list_jobs and the hot path's claim), the reopened store's
        # (heartbeat) and the waker's (LISTEN): every one opened with the URL's query
        # string.
        assert len(rows) >= 3, rows
        assert {r[0] for r in rows} == {app}, rows
        assert not any(r[1] for r in rows), rows
        assert listening is not None and listening[0] == 1
    finally:
        waker.close()
        beats.close()
        store.close()


def test_a_claim_keeps_its_workers_row_true_for_the_wake_ups(pg_url: str) -> None:
    """The row says busy from a claim that took a job, so that the next job queued wakes
    another worker; idle again from a claim that found nothing for a worker that holds
    nothing else, and left as it is for one that still runs a job."""
    store = JobStore.open(pg_url)
    try:
        wid = _worker(store, "solo")

        def state() -> str:
            return next(w.state.value for w in store.list_workers() if w.id == wid)

        def claim(idle_if_empty: bool) -> object:
            return store.claim(worker_id=wid, worker_name="solo", lease_seconds=10,
                               idle_if_empty=idle_if_empty)

        job = store.submit("sleep", {"seconds": 0})
        assert state() == "idle"
        assert claim(True) is not None
        assert state() == "busy"
        assert next(w.current_job for w in store.list_workers() if w.id == wid) == job.id
        assert claim(False) is None and state() == "busy"  # it still runs the job
        assert claim(True) is None and state() == "idle"
    finally:
        store.close()


def test_a_queued_job_wakes_as_many_idle_workers_as_it_needs_not_the_fleet(
        pg_url: str) -> None:
    """Each idle worker listens on its own channel; a submit, a batch, a hand-back and a
    lapsed lease wake the idle workers that beat last, one more than the jobs, and only
    workers that could run them."""
    store = JobStore.open(pg_url)
    listeners: dict[str, psycopg.Connection[Any]] = {}
    try:
        idle = [_worker(store, f"idle{i}") for i in range(6)]
        gpu = store.register_worker(name="gpu", host="h", pid=1, pool="spot",
                                    has_cuda=True, lease_seconds=10)
        for wid in [*idle, gpu]:
            store.beat(wid, [], 10.0, alive_for=60.0)
            conn = psycopg.connect(pg_url, autocommit=True)
            conn.execute(f"LISTEN {worker_channel(wid)}")
            listeners[wid] = conn

        def woken() -> set[str]:
            time.sleep(0.2)
            out = set()
            for wid, conn in listeners.items():
                if list(conn.notifies(timeout=0.3, stop_after=1)):
                    out.add(wid)
                    for _ in conn.notifies(timeout=0.05):
                        pass  # the rest of this worker's wake-ups
            return out

        job = store.submit("sleep", {"seconds": 0})
        assert len(woken()) == 2  # one job: two idle workers of the seven
        store.submit_many([NewJob("sleep", {"seconds": 0}) for _ in range(3)])
        assert len(woken()) == 4
        store.submit_many([NewJob("sleep", {"seconds": 0}) for _ in range(20)])
        assert woken() == set(listeners)  # more jobs than idle workers: every one
        store.submit("sleep", {"seconds": 0}, requires_cuda=True)
        assert woken() == {gpu}  # only a worker that could run it
        # A hand-back and a lapsed lease queue the job again: two wake-ups each.
        runner = _worker(store, "runner")
        got = store.claim(worker_id=runner, worker_name="runner", lease_seconds=10)
        assert got is not None and got[0].job_id == job.id
        woken()
        store.hand_back(got[0], HandedBack(worker="runner"))
        assert len(woken()) == 2
        got = store.claim(worker_id=runner, worker_name="runner", lease_seconds=10)
        assert got is not None
        woken()
        store.expire_lease_now(got[0].job_id)
        store.sweep_expired()
        assert len(woken()) == 2
    finally:
        for conn in listeners.values():
            conn.close()
        store.close()
