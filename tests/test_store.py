"""The store's contract, run on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

import pgbouncer
from spotrun.events import Failed, Note, Preempted, Resume, ResumeHow
from spotrun.jobs import EventKind, JobState, OnPreempt, Progress
from spotrun.store import (
    Beat,
    DatabaseUnavailable,
    JobNotFound,
    JobStore,
    Lease,
    LeaseLost,
)
from spotrun.store.connect import PING_AFTER_IDLE_SECONDS
from spotrun.store.leases import SWEEP_BATCH

# The store suite runs through PgBouncer in transaction mode too (see conftest.py).
PGBOUNCER = True


def _worker(store: JobStore, name: str = "w1", lease: float = 10.0) -> str:
    return store.register_worker(name=name, host="h", pid=1, pool="spot", has_cuda=False,
                                 lease_seconds=lease)


def _claim(store: JobStore, wid: str, name: str = "w1", lease: float = 10.0,
           **kw: object) -> tuple[Lease, object]:
    got = store.claim(worker_id=wid, worker_name=name, lease_seconds=lease, **kw)  # type: ignore[arg-type]
    assert got is not None
    return got


def _expire_now(store: JobStore, job_id: str) -> None:
    # Move the lease into the past by the database's clock, as time passing would.
    store.expire_lease_now(job_id)


def test_claim_order_is_priority_then_first_in(store: JobStore) -> None:
    a = store.submit("sleep", {"seconds": 0})
    b = store.submit("sleep", {"seconds": 0}, priority=5)
    c = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    order = [_claim(store, wid)[0].job_id for _ in range(3)]
    assert order == [b.id, a.id, c.id]
    assert store.claim(worker_id=wid, worker_name="w1", lease_seconds=10) is None


def test_claim_takes_a_lease_and_attempt_is_the_fencing_token(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    assert job.state is JobState.QUEUED and job.attempt == 0
    wid = _worker(store)
    lease, _claimed = _claim(store, wid)
    got = store.get(job.id)
    assert lease.attempt == 1 and got.attempt == 1
    assert got.state is JobState.RUNNING and got.worker == "w1"
    assert got.lease_expires_at is not None
    assert [e.message for e in got.events] == ["queued", "started on w1"]


def test_stale_attempt_cannot_write_after_the_job_moved_on(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    w1, w2 = _worker(store, "w1"), _worker(store, "w2")
    old, _ = _claim(store, w1, "w1")
    _expire_now(store, job.id)
    assert store.sweep_expired() == [job.id]
    new, _ = _claim(store, w2, "w2")
    assert new.attempt == old.attempt + 1
    for write in (
        lambda: store.save_progress(old, 5, 10, {}),
        lambda: store.complete(old, {"zombie": True}),
        lambda: store.fail(old, Failed("zombie")),
        lambda: store.hand_back(old, Preempted("w1", 5)),
        lambda: store.commit_checkpoint(old, "jobs/x/a1", 3),
        lambda: store.add_event(old, Note("zombie")),
    ):
        with pytest.raises(LeaseLost, match="no longer holds the lease"):
            write()
    assert store.heartbeat(w1, [old], 10) == {job.id: None}
    store.complete(new, {"ok": 1})
    final = store.get(job.id)
    assert final.state is JobState.SUCCEEDED and final.result == {"ok": 1}
    assert final.attempt == 2 and final.worker == "w2"


def test_expiry_requeues_with_an_event_and_counts_a_retry(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    lease, _ = _claim(store, wid)
    store.save_progress(lease, 120, 900, {})
    assert store.sweep_expired() == []  # lease still valid
    _expire_now(store, job.id)
    assert store.sweep_expired() == [job.id]
    got = store.get(job.id)
    assert got.state is JobState.QUEUED and got.retries == 1 and got.worker is None
    assert got.events[-1].kind == EventKind.LEASE_EXPIRED
    assert got.events[-1].message == (
        "lease of worker w1 expired at step 120/900; back in the queue")


def test_lost_workers_are_capped_by_max_retries(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0}, max_retries=2)
    wid = _worker(store)
    for _ in range(3):
        _claim(store, wid)
        _expire_now(store, job.id)
        store.sweep_expired()
    got = store.get(job.id)
    assert got.state is JobState.FAILED and got.retries == 3
    assert got.error is not None and "giving up after max_retries=2" in got.error


def test_preemption_hand_back_uses_no_retry(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0}, max_retries=0)
    wid = _worker(store)
    for _ in range(3):
        lease, _ = _claim(store, wid)
        store.hand_back(lease, Preempted("w1", 3, 10, resume=Resume(ResumeHow.SAVED, 3, 0.01)))
    got = store.get(job.id)
    assert got.state is JobState.QUEUED and got.preemptions == 3 and got.retries == 0
    assert got.attempt == 3


def test_heartbeat_renews_the_lease_by_the_database_clock(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    lease, _ = _claim(store, wid, lease=2.0)
    time.sleep(1.5)
    assert store.heartbeat(wid, [lease], 2.0) == {job.id: False}
    time.sleep(1.5)
    assert store.sweep_expired() == []  # renewed, so 3 s after the claim it still holds
    time.sleep(2.5)
    assert store.sweep_expired() == [job.id]


def test_cancel_queued_and_running(store: JobStore) -> None:
    queued = store.submit("sleep", {"seconds": 0})
    running = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    store.cancel(queued.id)
    lease, _ = _claim(store, wid)
    assert lease.job_id == running.id
    assert store.get(queued.id).state is JobState.CANCELLED
    after = store.cancel(running.id)
    assert after.state is JobState.RUNNING and after.cancel_requested
    assert store.save_progress(lease, 1, 10, {}) is True  # the worker learns of it
    store.finish_cancelled(lease)
    assert store.get(running.id).state is JobState.CANCELLED
    with pytest.raises(JobNotFound):
        store.cancel("nope")


def test_owner_scoping_and_idempotency(store: JobStore) -> None:
    a = store.submit("sleep", {"seconds": 0}, owner="alice", idempotency_key="k1")
    again = store.submit("sleep", {"seconds": 0}, owner="alice", idempotency_key="k1")
    other = store.submit("sleep", {"seconds": 0}, owner="bob", idempotency_key="k1")
    assert again.id == a.id and other.id != a.id
    assert [j.id for j in store.list_jobs(owner="alice")] == [a.id]
    with pytest.raises(JobNotFound):
        store.cancel(a.id, owner="bob")


def test_checkpoint_pointers_keep_the_last_two(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    lease, _ = _claim(store, wid)
    assert store.commit_checkpoint(lease, "c1", 1) is None
    assert store.commit_checkpoint(lease, "c2", 2) is None
    assert store.commit_checkpoint(lease, "c3", 3) == "c1"
    got = store.get(job.id)
    assert (got.checkpoint, got.checkpoint_prev) == ("c3", "c2")
    store.drop_checkpoint_pointer(lease, "c3")
    got = store.get(job.id)
    assert (got.checkpoint, got.checkpoint_prev) == ("c2", None)
    store.hand_back(lease, Preempted("w1", 3), keep_checkpoint=True)
    _lease2, claimed = _claim(store, wid)
    assert claimed.checkpoint == "c2"  # type: ignore[attr-defined]
    assert store.get(job.id).events[-1].message == "resumed on w1 from step 2"


def test_restart_policy_drops_the_checkpoint(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0}, on_preempt=OnPreempt.RESTART)
    wid = _worker(store)
    lease, _ = _claim(store, wid)
    store.commit_checkpoint(lease, "c1", 1)
    store.hand_back(lease, Preempted("w1", 1, policy=OnPreempt.RESTART),
                    keep_checkpoint=False)
    assert store.get(job.id).checkpoint is None


def test_concurrent_claims_never_hand_out_a_job_twice(store: JobStore) -> None:
    n = 120
    ids = {store.submit("sleep", {"seconds": 0}).id for _ in range(n)}
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all(i: int) -> None:
        s = JobStore(store.engine)
        wid = _worker(s, f"t{i}")
        while True:
            got = s.claim(worker_id=wid, worker_name=f"t{i}", lease_seconds=10)
            if got is None:
                return
            with lock:
                claimed.append(got[0].job_id)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_worker_marked_gone_when_its_heartbeat_stops(store: JobStore) -> None:
    wid = _worker(store, lease=0.2)
    assert store.list_workers()[0].state == "idle"
    time.sleep(0.4)
    store.mark_gone_workers()
    assert [(w.id, w.state) for w in store.list_workers()] == [(wid, "gone")]


def test_a_heartbeat_carries_the_progress_and_logs_of_the_jobs_that_moved(
        store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    lease, _ = _claim(store, wid)
    before = store.get(job.id).updated_at
    got = store.beat(wid, [Beat(lease, Progress(3, 9, {"loss": 0.5}),
                                [(time.time(), "INFO", "epoch 1 done")])], 10.0)
    assert got.held == {job.id: False}
    seen = store.get(job.id)
    assert (seen.progress.step, seen.progress.total) == (3, 9)
    assert seen.progress.metrics == {"loss": 0.5} and seen.updated_at >= before
    assert [line.message for line in store.logs(job.id)] == ["epoch 1 done"]
    # A beat with nothing new only renews the lease: the row's change time stays.
    store.beat(wid, [Beat(lease)], 10.0)
    assert store.get(job.id).updated_at == seen.updated_at
    assert store.get(job.id).progress.step == 3
    store.cancel(job.id)
    assert store.beat(wid, [Beat(lease)], 10.0).held == {job.id: True}


def test_a_heartbeat_renews_each_lease_it_holds_and_none_it_lost(store: JobStore) -> None:
    first, second = store.submit("sleep", {"seconds": 0}), store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    a, _ = _claim(store, wid)
    b, _ = _claim(store, wid)
    store.expire_lease_now(a.job_id)
    assert store.sweep_expired() == [a.job_id]  # a's job went back to the queue
    got = store.beat(wid, [Beat(a, Progress(5, 9, {"loss": 0.1}), [(time.time(), "INFO", "x")]),
                           Beat(b, Progress(7, 9, {"loss": 0.2}), [(time.time(), "INFO", "y")])],
                     10.0)
    assert got.held == {a.job_id: None, b.job_id: False}
    # The zombie's progress, logs and metric point were refused; the holder's written.
    assert store.get(a.job_id).progress.step != 5 and store.logs(a.job_id) == []
    assert [line.message for line in store.logs(b.job_id)] == ["y"]
    assert [p.step for p in store.analytics.metric_series(b.job_id)] == [7]
    assert [p.step for p in store.analytics.metric_series(a.job_id)] == []
    (me,) = store.list_workers()
    assert (me.state, me.current_job) == ("busy", b.job_id)
    assert {first.id, second.id} == {a.job_id, b.job_id}


def test_a_sweep_of_more_lapsed_leases_than_a_batch_moves_each_once(store: JobStore) -> None:
    # A zone's workers gone at once: the sweep moves them all, a batch a transaction.
    n = 2 * SWEEP_BATCH + 7
    for _ in range(n):
        store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    held = [_claim(store, wid)[0] for _ in range(n)]
    for lease in held:
        store.expire_lease_now(lease.job_id)
    moved = store.sweep_expired(within=30.0)
    assert sorted(moved) == sorted(lease.job_id for lease in held)
    assert {store.get(lease.job_id).state for lease in held} == {JobState.QUEUED}
    assert all([e.kind for e in store.events(lease.job_id)].count(EventKind.LEASE_EXPIRED) == 1
               for lease in held)
    assert store.sweep_expired() == []


def test_the_sweeper_learns_from_its_beat_whether_a_sweep_has_work(store: JobStore) -> None:
    store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    lease, _ = _claim(store, wid)
    got = store.beat(wid, [Beat(lease)], 10.0, sweeper=True)
    assert got.sweeper and not got.to_sweep
    other = _worker(store, "other")
    store.expire_lease_now(lease.job_id)
    got = store.beat(other, [], 10.0, alive_for=60.0, sweeper=True)
    assert not got.sweeper and not got.to_sweep  # not the sweeper: told nothing
    assert store.beat(wid, [], 10.0, alive_for=60.0, sweeper=True).to_sweep
    assert store.sweep_expired() == [lease.job_id]
    assert not store.beat(wid, [], 10.0, alive_for=60.0, sweeper=True).to_sweep


def test_one_worker_at_a_time_is_the_fleets_sweeper(store: JobStore) -> None:
    a, b, c = (_worker(store, name) for name in ("a", "b", "c"))
    assert store.beat(a, [], 0.5, sweeper=True).sweeper
    assert not store.beat(b, [], 0.5, sweeper=True).sweeper
    assert not store.beat(c, [], 0.5, sweeper=True).sweeper
    assert store.beat(a, [], 0.5, sweeper=True).sweeper  # renewed by its holder
    # The holder stops: the next worker to beat takes over at once.
    store.set_worker_state(a, "stopping")
    assert store.beat(b, [], 0.5, sweeper=True).sweeper
    assert not store.beat(c, [], 0.5, sweeper=True).sweeper
    # The holder falls silent: its lease lapses and another worker takes it.
    time.sleep(0.7)
    assert store.beat(c, [], 0.5, sweeper=True).sweeper
    assert not store.beat(b, [], 0.5, sweeper=True).sweeper


def test_an_idle_worker_is_gone_only_past_the_window_its_heartbeat_promised(
        store: JobStore) -> None:
    idle, busy = _worker(store, "idle", lease=0.3), _worker(store, "busy", lease=0.3)
    store.submit("sleep", {"seconds": 0})
    lease, _ = _claim(store, busy, "busy", lease=0.3)
    store.beat(idle, [], 0.3, alive_for=1.5)  # an idle beat: due again within 1.5 s
    store.beat(busy, [Beat(lease)], 0.3)
    time.sleep(0.6)
    store.mark_gone_workers()
    states = {w.name: w.state for w in store.list_workers()}
    assert states == {"idle": "idle", "busy": "gone"}
    time.sleep(1.2)
    store.mark_gone_workers()
    assert {w.name: w.state for w in store.list_workers()}["idle"] == "gone"


def test_tokens_are_stored_hashed(store: JobStore) -> None:
    token = store.tokens.create("alice")
    with store.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT token_hash FROM api_tokens")).scalar()
    assert token not in str(stored)
    who = store.tokens.verify(token)
    assert who is not None and who.name == "alice" and not who.is_admin
    store.tokens.revoke("alice")
    assert store.tokens.verify(token) is None
    assert store.tokens.verify("spr_wrong") is None


def test_every_state_change_the_store_makes_is_in_the_state_machine(store: JobStore) -> None:
    from spotrun.jobs import can_transition

    seen: list[tuple[JobState, JobState]] = []
    wid = _worker(store)

    def step(job_id: str, action: object) -> None:
        before = store.get(job_id, with_events=False).state
        action()  # type: ignore[operator]
        after = store.get(job_id, with_events=False).state
        if after is not before:
            seen.append((before, after))

    def claim() -> Lease:
        return _claim(store, wid)[0]

    a = store.submit("sleep", {"seconds": 0}).id
    leases: list[Lease] = []
    step(a, lambda: leases.append(claim()))
    step(a, lambda: store.hand_back(leases[-1], Preempted("w1", 0)))
    step(a, lambda: leases.append(claim()))
    step(a, lambda: store.complete(leases[-1], {}))
    b = store.submit("sleep", {"seconds": 0}).id
    step(b, lambda: store.cancel(b))
    c = store.submit("sleep", {"seconds": 0}, max_retries=0).id
    step(c, lambda: leases.append(claim()))
    _expire_now(store, c)
    step(c, store.sweep_expired)
    d = store.submit("sleep", {"seconds": 0}).id
    step(d, lambda: leases.append(claim()))
    step(d, lambda: store.fail(leases[-1], Failed("boom")))
    e = store.submit("sleep", {"seconds": 0}).id
    step(e, lambda: leases.append(claim()))
    store.cancel(e)
    step(e, lambda: store.finish_cancelled(leases[-1]))
    assert len(seen) == 11
    assert all(can_transition(old, new) for old, new in seen), seen
    # Nothing leaves a final state.
    assert not any(can_transition(s, JobState.RUNNING) for s in JobState if s.is_final)


def test_claim_respects_cuda_and_pool(store: JobStore) -> None:
    gpu = store.submit("sleep", {"seconds": 0}, requires_cuda=True)
    od = store.submit("sleep", {"seconds": 0}, pool="on-demand")
    anywhere = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    assert _claim(store, wid, pool="spot")[0].job_id == anywhere.id
    assert store.claim(worker_id=wid, worker_name="w1", lease_seconds=10, pool="spot") is None
    assert _claim(store, wid, pool="on-demand")[0].job_id == od.id
    assert store.claim(worker_id=wid, worker_name="w1", lease_seconds=10) is None
    assert _claim(store, wid, has_cuda=True)[0].job_id == gpu.id


def test_claim_events_say_started_restarted_or_resumed(store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    w1, w2 = _worker(store, "w1"), _worker(store, "w2")
    _claim(store, w1, "w1")
    _expire_now(store, job.id)
    assert store.sweep_expired() == [job.id]
    lease, _ = _claim(store, w2, "w2")
    store.save_progress(lease, 3, 10, {})
    store.commit_checkpoint(lease, "c3", 3)
    store.hand_back(lease, Preempted("w1", 3), keep_checkpoint=True)
    _claim(store, w1, "w1")
    started = [e.message for e in store.get(job.id).events
               if e.kind in (EventKind.STARTED, EventKind.RESUMED)]
    assert started == ["started on w1", "restarted on w2 from the beginning (attempt 2)",
                       "resumed on w1 from step 3/10"]


def test_result_keeps_the_last_progress_and_log_lines_in_order(store: JobStore) -> None:
    from spotrun.jobs import Progress

    job = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    lease, _ = _claim(store, wid)
    lines = [(time.time(), "INFO", f"line {i}") for i in range(30)]
    store.complete(lease, {"accuracy": 0.5}, run_seconds=1.5,
                   progress=Progress(7, 7, {"loss": 0.25}), logs=lines)
    got = store.get(job.id)
    assert got.state is JobState.SUCCEEDED and got.result == {"accuracy": 0.5}
    assert (got.progress.step, got.progress.total, got.progress.metrics) == (7, 7, {"loss": 0.25})
    assert got.run_seconds == pytest.approx(1.5)
    assert [ln.message for ln in store.logs(job.id)] == [f"line {i}" for i in range(30)]
    assert got.events[-1].kind == EventKind.SUCCEEDED
    with pytest.raises(LeaseLost, match="attempt 1 no longer holds the lease"):
        store.fail(lease, Failed("late"), "tb")
    assert store.get(job.id).error is None


def _drop_other_connections(store: JobStore) -> None:
    """End every other session of the store's database, as a restart would."""
    if "spotrun_pooler" in store.engine.url.query:
        # A pooler hides its server connections' loss: its own client ones are lost.
        pgbouncer.drop_clients(store.engine.url.port or 0, store.engine.url.database or "")
        return
    with store.engine.connect() as conn:
        conn.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"))


def test_a_dropped_connection_surfaces_as_a_database_error(store: JobStore) -> None:
    """The worker retries what the store calls DatabaseUnavailable; the hot path too."""
    if not store.is_postgres:
        pytest.skip("terminating a server connection is a PostgreSQL test")
    # As a worker opens it: no ping before each use, so the dead connection is used.
    worker_store = JobStore.open(store.engine.url.render_as_string(hide_password=False),
                                 pre_ping=False)
    try:
        # Queued by another store: the worker's own connections are then the ones a worker
        # holds (a submit takes a hot-path connection too, which would be a second one).
        job = store.submit("sleep", {"seconds": 0})
        lease, _ = _claim(worker_store, _worker(worker_store))
        _drop_other_connections(store)
        with pytest.raises(DatabaseUnavailable):
            worker_store.complete(lease, {"ok": True})
        worker_store.complete(lease, {"ok": True})  # the broken connection left the pool
    finally:
        worker_store.close()
    assert store.get(job.id).state is JobState.SUCCEEDED


def test_a_connection_that_died_while_idle_is_replaced_before_its_next_use(
        store: JobStore) -> None:
    """A producer's store (the default ``pre_ping``) pings a connection that sat in the
    pool past a second, and uses a fresh one when the ping fails: its caller never sees
    a restart that happened while it was idle."""
    if not store.is_postgres:
        pytest.skip("terminating a server connection is a PostgreSQL test")
    producer = JobStore.open(store.engine.url.render_as_string(hide_password=False))
    try:
        producer.submit("sleep", {"seconds": 0})
        _drop_other_connections(store)
        time.sleep(PING_AFTER_IDLE_SECONDS + 0.2)
        again = producer.submit("sleep", {"seconds": 1})
        assert producer.get(again.id).params == {"seconds": 1}
    finally:
        producer.close()


def test_a_result_can_claim_the_workers_next_job_in_the_same_write(store: JobStore) -> None:
    from spotrun.store import ClaimRequest

    first = store.submit("sleep", {"seconds": 0})
    second = store.submit("sleep", {"seconds": 0})
    wid = _worker(store)
    req = ClaimRequest(wid, "w1", 10.0)
    lease, _ = _claim(store, wid)
    got = store.complete(lease, {"n": 1}, then_claim=req)
    assert got is not None
    lease2, job2 = got
    assert (lease2.job_id, lease2.attempt, job2.state) == (second.id, 1, JobState.RUNNING)
    assert store.get(first.id).state is JobState.SUCCEEDED
    assert [e.message for e in store.get(second.id).events] == ["queued", "started on w1"]
    # Refused: the stale lease writes nothing and claims nothing.
    third = store.submit("sleep", {"seconds": 0})
    with pytest.raises(LeaseLost):
        store.complete(lease, {"n": 1}, then_claim=req)
    assert store.get(third.id).state is JobState.QUEUED
    # An empty queue: the result is written, and there is no next job.
    third_lease, _ = _claim(store, wid)
    assert store.fail(lease2, Failed("boom"), then_claim=req) is None
    assert store.complete(third_lease, {"n": 3}, then_claim=req) is None
    assert store.get(third.id).state is JobState.SUCCEEDED
    assert store.get(second.id).state is JobState.FAILED


def test_a_transaction_left_open_cannot_hold_a_job_forever(store: JobStore) -> None:
    """A worker frozen mid-transaction holds its job's row lock; PostgreSQL ends it."""
    if not store.is_postgres:
        pytest.skip("SQLite has no server to end another process's transaction")
    from spotrun.schema import jobs
    from spotrun.store import IDLE_IN_TRANSACTION_MS

    job = store.submit("sleep", {"seconds": 0})
    _claim(store, _worker(store))
    _expire_now(store, job.id)
    frozen = store.engine.connect()
    tx = frozen.begin()
    frozen.execute(jobs.update().where(jobs.c.id == job.id).values(progress_step=1))
    assert store.sweep_expired() == []  # the row is locked: skipped, not waited for
    time.sleep(IDLE_IN_TRANSACTION_MS / 1000 + 1)
    assert store.sweep_expired() == [job.id]
    with pytest.raises(sa.exc.DBAPIError):
        tx.commit()
    frozen.invalidate()
    frozen.close()
