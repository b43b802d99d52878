"""Database faults a spot fleet meets, reproduced for real: a restart of the server, a
stalled table, a link that blackholes, a reply lost after its commit, a cancel racing a
claim, a slow checkpoint store under a chained job, several API replicas delivering
callbacks.

A restart runs against a private PostgreSQL (as ``spotrun chaos --db-restart`` does), never
the shared one; the other faults go through loopback proxies (``spotrun.faultproxy``, and
``fault_proxy`` for an object store) or real PostgreSQL sessions.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from conftest import Env, wait_until
from fault_proxy import SlowDeletes, pg_proxy
from spotrun.chaos import ChaosError, PrivatePostgres
from spotrun.chaos.processes import free_port
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


def _waiting_on_a_lock(admin: Any, dbname: str) -> bool:
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                        "AND wait_event_type = 'Lock'", (dbname,)).fetchone()
    return bool(row and row[0] > 0)


def test_a_cancel_racing_a_claim_is_a_running_cancel_never_a_false_history(
        pg_url: str) -> None:
    import psycopg

    from spotrun.store import CLAIM_SQL, ClaimRequest

    st = JobStore.open(pg_url)
    job = st.submit("sleep", {"seconds": 1})
    dbname = pg_url.rsplit("/", 1)[1]
    claimer = psycopg.connect(pg_url, autocommit=False)
    admin = psycopg.connect(pg_url, autocommit=True)
    try:
        # A worker's claim, in flight: its row is locked, its commit not yet sent.
        claimed = claimer.execute(CLAIM_SQL, ClaimRequest("w-id", "w1", 30.0).params()
                                  ).fetchone()
        assert claimed is not None
        outcome: dict[str, Any] = {}
        t = threading.Thread(target=lambda: outcome.update(job=st.cancel(job.id)))
        t.start()
        wait_until(lambda: _waiting_on_a_lock(admin, dbname), 30,
                   "the cancel to wait on the claim's row")
        claimer.commit()
        t.join(30)
        assert not t.is_alive()
    finally:
        claimer.close()
        admin.close()
    after = st.get(job.id)
    kinds = [e.kind for e in after.events]
    assert after.state is JobState.RUNNING and after.cancel_requested, kinds
    assert EventKind.CANCELLED not in kinds, [e.message for e in after.events]
    assert EventKind.CANCEL_REQUESTED in kinds
    # The worker holding it hears the cancel at its next heartbeat.
    from spotrun.store import Lease

    beat = st.heartbeat("w-id", [Lease(job.id, after.attempt, "w-id", "w1")], 30.0)
    assert beat == {job.id: True}
    st.close()


# ------------------------------------------------- a dead link in the stop path


def test_a_blackholed_database_link_at_the_notice_exits_in_the_budget_non_zero(
        env_factory: Callable[..., Env], pg_url: str) -> None:
    with pg_proxy(pg_url) as proxy:
        env = env_factory(proxy.url_for(pg_url))
        st = JobStore.open(pg_url)
        w1 = env.worker("w1", "--grace-seconds", "3", *FAST)
        job_id = submit(env, "sleep", "seconds=8", "steps=80")
        wait_until(lambda: st.get(job_id, with_events=False).progress.step >= 3, 60,
                   "the job to run", on_fail=w1.log)
        proxy.blackhole()
        w1.signal(signal.SIGTERM)
        # The budget is 3 s; a call waiting on the dead link would hold it for minutes, and
        # each new connection for its connect timeout (5 s). The slack is for a slow host.
        code = w1.wait(3 + 7)
        assert code != 0, w1.log()
        assert "did not answer before the deadline" in w1.log() or \
            "lease will expire" in w1.log(), w1.log()
    env2 = env_factory(pg_url)
    env2.worker("w2", *FAST)
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 90, "the job to end")
    job = st.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.worker == "w2"
    assert any(e.kind == EventKind.LEASE_EXPIRED and "w1" in e.message for e in job.events)
    st.close()


def test_a_locked_sqlite_database_at_the_notice_exits_in_the_budget_non_zero(
        env_factory: Callable[..., Env], sqlite_url: str) -> None:
    import sqlite3

    env = env_factory(sqlite_url)
    st = JobStore.open(sqlite_url)
    w1 = env.worker("w1", "--grace-seconds", "3", *FAST)
    job_id = submit(env, "sleep", "seconds=8", "steps=80")
    wait_until(lambda: st.get(job_id, with_events=False).progress.step >= 3, 60,
               "the job to run", on_fail=w1.log)
    # Another process's writer holds the database's write lock (a long migration, a
    # wedged tool): every write waits on SQLite's busy timeout.
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        w1.signal(signal.SIGTERM)
        code = w1.wait(3 + 7)
        assert code != 0, w1.log()
        assert "lease will expire" in w1.log() or "before the deadline" in w1.log(), w1.log()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    env.worker("w2", *FAST)
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 90, "the job to end")
    job = st.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.worker == "w2"
    assert any(e.kind == EventKind.LEASE_EXPIRED and "w1" in e.message for e in job.events)
    st.close()


# --------------------------------------------- a chained job and a slow clean-up


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import importlib.util

    from conftest import IN_CI

    missing = [m for m in ("moto", "s3fs", "boto3") if importlib.util.find_spec(m) is None]
    if missing:
        if IN_CI:
            pytest.fail(f"{', '.join(missing)} not installed (pip install -e '.[test]')")
        pytest.skip(f"{', '.join(missing)} not installed")
    from s3_server import moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


def test_a_chained_jobs_lease_is_renewed_while_a_slow_store_deletes_the_last_ones_files(
        env_factory: Callable[..., Env], db_url: str, s3: Any) -> None:
    from s3_server import S3Server

    slow = SlowDeletes(s3.endpoint, delay=15.0)
    try:
        bucket = s3.new_bucket()
        endpoint = {"AWS_ENDPOINT_URL_S3": slow.endpoint, "AWS_ENDPOINT_URL": slow.endpoint}
        env = env_factory(db_url, **{**s3.env(), **endpoint},
                          SPOTRUN_CHECKPOINT_URL=f"s3://{bucket}/ckpts")
        for name in S3Server.cleared():
            env.vars.pop(name, None)
        st = JobStore.open(db_url)
        first = env.cli("submit", "sleep", "-p", "seconds=1", "-p", "steps=8",
                        "--checkpoint-every-steps", "5").stdout.strip()
        second = submit(env, "sleep", "seconds=2", "steps=20")
        w = env.worker("w1", *FAST)
        wait_until(lambda: st.get(second, with_events=False).state.is_final, 120,
                   "the chained job to end", on_fail=w.log)
        assert slow.deletes >= 1, "the first job's files were never deleted"
        for job_id in (first, second):
            job = st.get(job_id)
            kinds = [e.kind for e in job.events]
            assert job.state is JobState.SUCCEEDED, [e.message for e in job.events]
            assert job.attempt == 1 and job.retries == 0, [e.message for e in job.events]
            assert EventKind.LEASE_EXPIRED not in kinds
        st.close()
    finally:
        slow.close()


# ------------------------------------------------------------ a database stall


def test_a_database_stall_requeues_no_live_job(
        env_factory: Callable[..., Env], db_url: str) -> None:
    import time

    env = env_factory(db_url)
    st = JobStore.open(db_url)
    lease = ("--lease-seconds", "4", "--heartbeat-seconds", "0.5")
    workers = [env.worker(f"w{i}", *lease) for i in range(4)]
    job_ids = [submit(env, "sleep", "seconds=30", "steps=300") for _ in range(3)]

    def all_running() -> bool:
        return all(st.get(j, with_events=False).progress.step >= 2 for j in job_ids)

    wait_until(all_running, 90, "three jobs running",
               on_fail=lambda: "\n".join(w.log() for w in workers))
    # A long lock on jobs (CREATE INDEX without CONCURRENTLY takes this one): every write
    # to the table waits, every read goes on. On SQLite: a writer holding the lock.
    if st.is_postgres:
        import psycopg

        holder: Any = psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"))
        holder.execute("LOCK TABLE jobs IN SHARE MODE")
    else:
        import sqlite3

        holder = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    try:
        time.sleep(15)  # the fault's length, not a wait for a result
    finally:
        holder.rollback() if st.is_postgres else holder.execute("ROLLBACK")
        holder.close()
    for j in job_ids:
        wait_until(lambda j=j: st.get(j, with_events=False).state.is_final, 120,
                   f"job {j} to end", on_fail=lambda: "\n".join(w.log() for w in workers))
    for j in job_ids:
        job = st.get(j)
        history = [e.message for e in job.events]
        assert job.state is JobState.SUCCEEDED, history
        assert job.attempt == 1 and job.retries == 0, history
        assert EventKind.LEASE_EXPIRED not in [e.kind for e in job.events], history
    logs = "\n".join(w.log() for w in workers)
    assert "the database took" in logs or "database unreachable" in logs \
        or "the database was slow" in logs, logs
    st.close()


# ---------------------------------------------------- a reply lost after its commit


def test_a_claim_and_a_chained_result_whose_replies_are_lost_are_not_redone(
        env_factory: Callable[..., Env], pg_url: str) -> None:
    with pg_proxy(pg_url) as proxy:
        env = env_factory(proxy.url_for(pg_url))
        st = JobStore.open(pg_url)
        job_ids = [submit(env, "sleep", "seconds=0.5", "steps=5") for _ in range(3)]
        # The first claim, then the first result with its chained claim, commit; the
        # connection is cut before the worker hears either.
        proxy.cut_after_reply(b"spotrun_next_job")
        proxy.cut_after_reply(b"fin_event")
        w = env.worker("w1", *FAST)
        for j in job_ids:
            wait_until(lambda j=j: st.get(j, with_events=False).state.is_final, 90,
                       f"job {j} to end", on_fail=w.log)
        assert proxy.cut == [b"spotrun_next_job", b"fin_event"], w.log()
        for j in job_ids:
            job = st.get(j)
            history = [e.message for e in job.events]
            assert job.state is JobState.SUCCEEDED, history
            assert job.attempt == 1 and job.retries == 0, history
            kinds = [e.kind for e in job.events]
            assert EventKind.LEASE_EXPIRED not in kinds, history
            assert kinds.count(EventKind.STARTED) == 1, history
            assert kinds.count(EventKind.SUCCEEDED) == 1, history
        assert "LeaseLost" not in w.log() and "refused" not in w.log(), w.log()
        st.close()


def test_a_plain_result_whose_reply_is_lost_is_not_refused_on_retry(
        env_factory: Callable[..., Env], pg_url: str) -> None:
    # The worker's last job (--max-jobs 1) is written without a chained claim: the result
    # commits, the connection is cut before the worker hears it, and the retry finds the
    # result it wrote instead of being refused.
    with pg_proxy(pg_url) as proxy:
        env = env_factory(proxy.url_for(pg_url))
        st = JobStore.open(pg_url)
        job_id = submit(env, "sleep", "seconds=0.2", "steps=3")
        proxy.cut_after_reply(b"fin_event")
        w = env.worker("w1", *FAST, "--max-jobs", "1")
        assert w.wait(90) == 0, w.log()
        assert proxy.cut == [b"fin_event"], w.log()
        job = st.get(job_id)
        history = [e.message for e in job.events]
        assert job.state is JobState.SUCCEEDED and job.attempt == 1, history
        kinds = [e.kind for e in job.events]
        assert kinds.count(EventKind.SUCCEEDED) == 1, history
        assert EventKind.LEASE_EXPIRED not in kinds, history
        assert "LeaseLost" not in w.log() and "refused" not in w.log(), w.log()
        st.close()


# ------------------------------------------- callbacks from several server processes


class _Receiver:
    """A loopback HTTP server recording every callback: (delivery id, event, job id)."""

    def __init__(self) -> None:
        import http.server
        import json

        self.got: list[tuple[int, str, str]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.got.append((int(self.headers["X-Spotrun-Delivery"]),
                                      self.headers["X-Spotrun-Event"], body["id"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[tuple[int, str, str]]:
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_callbacks_from_two_servers_arrive_once_each_in_order_late_commits_too(
        env_factory: Callable[..., Env], db_url: str) -> None:
    import subprocess
    import sys
    import time

    from spotrun.http.callbacks import STATE_CHANGES
    from spotrun.schema import events, jobs

    receiver = _Receiver()
    env = env_factory(db_url, SPOTRUN_CALLBACK_ALLOW_PRIVATE="1")
    st = JobStore.open(db_url)
    servers: list[subprocess.Popen[bytes]] = []
    held: list[Any] = []
    try:
        late = [st.submit("sleep", {}, callback_url=receiver.url) for _ in range(5)]
        for _ in range(2):
            log = open(env.home / f"server-{len(servers)}.log", "wb")  # noqa: SIM115
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "spotrun", "server", "--port", str(free_port())],
                env=env.vars, stdout=log, stderr=subprocess.STDOUT))
        if st.is_postgres:
            # Cancels whose transactions take their event ids now and commit last: the
            # events of the 100 jobs below get later ids and commit first. (Sessions of
            # their own: spotrun's end a transaction left idle for 10 s.)
            import psycopg

            for job in late:
                conn = psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"))
                conn.execute("UPDATE jobs SET state = 'cancelled', error = 'cancelled', "
                             "finished_at = extract(epoch FROM now()), "
                             "updated_at = extract(epoch FROM now()) WHERE id = %s", (job.id,))
                conn.execute("INSERT INTO events (job_id, at, kind, worker, attempt, message) "
                             "VALUES (%s, extract(epoch FROM clock_timestamp()), 'cancelled', "
                             "NULL, 0, 'cancelled at the user''s request before it started')",
                             (job.id,))
                held.append(conn)
        ids = [st.submit("sleep", {}, callback_url=receiver.url).id for _ in range(100)]
        for _ in ids:
            got = st.claim(worker_id="w-id", worker_name="w1", lease_seconds=30)
            assert got is not None
            st.complete(got[0], {"slept": 0})
        wait_until(lambda: len(receiver.delivered()) >= 300, 120,
                   "the 100 jobs' callbacks")
        for conn in held:
            conn.commit()
            conn.close()
        held.clear()

        def expected() -> set[int]:
            with st.engine.connect() as conn:
                rows = conn.execute(sa_select_events(events, jobs, STATE_CHANGES)).all()
            return {int(r[0]) for r in rows}

        want = expected()

        def arrived() -> set[int]:
            return {d for d, _, _ in receiver.delivered()}

        wait_until(lambda: arrived() >= want, 120, "every event delivered",
                   on_fail=lambda: f"missing {sorted(want - arrived())}")
        time.sleep(3 * 2.0)  # more polls of both servers: a duplicate would arrive by now
    finally:
        for conn in held:
            conn.rollback()
            conn.close()
        for p in servers:
            p.send_signal(signal.SIGTERM)
        for p in servers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        receiver.close()
    got = receiver.delivered()
    counts: dict[int, int] = {}
    for d, _, _ in got:
        counts[d] = counts.get(d, 0) + 1
    assert {d for d, n in counts.items() if n > 1} == set(), "delivered more than once"
    assert set(counts) == want
    per_job: dict[str, list[int]] = {}
    for d, _, job_id in got:
        per_job.setdefault(job_id, []).append(d)
    assert all(seq == sorted(seq) for seq in per_job.values()), per_job
    if st.is_postgres:
        assert {job_id for _, kind, job_id in got if kind == "cancelled"} == \
            {j.id for j in late}
    st.close()


def sa_select_events(events: Any, jobs: Any, kinds: frozenset[str]) -> Any:
    import sqlalchemy as sa

    return (sa.select(events.c.id).join(jobs, jobs.c.id == events.c.job_id)
            .where(jobs.c.callback_url.is_not(None), events.c.kind.in_(sorted(kinds))))


def test_the_servers_store_reads_a_job_at_once_after_a_database_restart(
        private_pg: PrivatePostgres) -> None:
    """The server's pool pings no connection on checkout (one round trip a request
    less): after a restart, a job read that meets a dead connection is sent again on a
    new one, and the pool's other dead connections are dropped with it."""
    from spotrun.http.app import API_THREADS

    store = JobStore.open(private_pg.url, pool_size=API_THREADS, pre_ping=False)
    try:
        job_id = store.submit("sleep", {}).id

        def read_many() -> None:
            # Concurrent reads, so that several of the pool's connections are in it.
            with ThreadPoolExecutor(8) as pool:
                for job in pool.map(lambda _: store.get(job_id), range(32)):
                    assert job.id == job_id and job.events[0].kind == EventKind.SUBMITTED.value

        read_many()
        assert store.engine.pool.checkedin() > 1  # type: ignore[attr-defined]
        restart(private_pg, 1.0)
        read_many()  # no DatabaseUnavailable
        store.tokens.list()  # the others went with the first: not one fails now
    finally:
        store.close()
