"""The store on PostgreSQL: its claim, its result, its locks and its LISTEN wake-up.

The queue's hot path is hand-written SQL, one statement per call (data-modifying CTEs),
sent with psycopg on the pool's connections in autocommit (:meth:`PostgresStore._pg_one`):
the claim (:data:`CLAIM_SQL`, its pick is migration 0008's ``spotrun_next_job``) and the
fenced result, which can claim the worker's next job in the same statement
(:func:`finish_sql`): one round trip a job; and the heartbeat (:func:`beat_sql`), one
round trip a beat. Everything else is the shared SQLAlchemy Core code of
:mod:`spotrun.store.base` and :mod:`spotrun.store.leases`, with row locks.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from spotrun import migrations
from spotrun.events import Submitted, render
from spotrun.jobs import Event, Job, JobState, WorkerState, from_epoch
from spotrun.quotas import Quota, QuotaExceeded
from spotrun.schema import jobs
from spotrun.store.base import JobStore, Waker, event_of, register_dialect
from spotrun.store.claim_event import claim_event_sql
from spotrun.store.connect import (
    create_engine,
    listen_url,
    normalize_url,
    pg_bounds,
    pg_checkout,
    pg_connection,
)
from spotrun.store.errors import JobNotFound, KeyReused, StoreError
from spotrun.store.leases import SWEEPER, series_point
from spotrun.store.records import (
    MAX_METRIC_POINTS,
    Beat,
    BeatResult,
    ClaimRequest,
    JobRecord,
    Lease,
    dumps,
    job_from_row,
)

if TYPE_CHECKING:
    import psycopg

# A job with its history in one statement (one round trip, one snapshot): the API's
# most frequent read. The events come as one JSON array of [at, kind, ...] rows.
_EVENT_FIELDS = ("at", "kind", "worker", "attempt", "message", "data")
_GET_JOB_SQL = "SELECT * FROM jobs WHERE id = %(id)s"
_GET_JOB_WITH_EVENTS_SQL = (
    "SELECT jobs.*, (SELECT json_agg(json_build_array("
    + ", ".join(f"e.{f}" for f in _EVENT_FIELDS)
    + ") ORDER BY e.id) FROM events e WHERE e.job_id = jobs.id) AS spotrun_history "
    "FROM jobs WHERE jobs.id = %(id)s")


def worker_channel(worker_id: str) -> str:
    """The channel an idle worker listens on: a job queued wakes only as many idle
    workers as it needs (see :func:`wake_idle_sql`), not the whole fleet."""
    return f"spotrun_w_{worker_id}"


def wake_idle_sql(jobs_from: str, how_many: str, where: str = "true") -> str:
    """A query that wakes ``how_many`` idle workers able to run a job ``q`` of
    ``jobs_from`` (rows with ``pool`` and ``requires_cuda``) where ``where``: the ones
    that beat last. Callers ask one more than the jobs: a worker woken by an earlier
    wake-up says idle until its claim commits."""
    return f"""SELECT pg_notify('spotrun_w_' || w.id, '') FROM (
        SELECT w.id FROM workers w
        WHERE w.state = 'idle' AND EXISTS (
            SELECT 1 FROM {jobs_from} WHERE {where} AND (q.pool IS NULL OR q.pool = w.pool)
                AND (w.has_cuda OR NOT q.requires_cuda))
        ORDER BY w.alive_until DESC
        LIMIT {how_many}
    ) w"""
_MIGRATION_LOCK_KEY = 0x5370_6F74  # "Spot": the advisory lock that serialises migrations
_PG_NOW = "extract(epoch FROM clock_timestamp())::float8"

_CLAIM_KIND, _CLAIM_MESSAGE, _CLAIM_DATA = claim_event_sql("upd")

# The claim's common table expressions: pick (migration 0008's function), lease, and the
# event, worded by spotrun.store.claim_event. {pick_from} chains it to a result.
_CLAIM_CTES = f"""
pick AS (
    SELECT spotrun_next_job(%(has_cuda)s::boolean, %(pool)s::varchar) AS id {{pick_from}}
), upd AS (
    UPDATE jobs SET state = '{JobState.RUNNING.value}', attempt = jobs.attempt + 1,
        worker_id = %(worker_id)s, worker_name = %(worker_name)s,
        request_id = %(request_id)s, lease_expires_at = {_PG_NOW} + %(lease_seconds)s,
        started_at = coalesce(jobs.started_at, {_PG_NOW}), updated_at = {_PG_NOW}
    -- The function locked a queued row; matching on the id alone keeps the primary key
    -- as the plan whatever the statistics say.
    WHERE jobs.id = (SELECT id FROM pick)
    RETURNING jobs.*
), ev AS (
    INSERT INTO events (job_id, at, kind, worker, attempt, message, data)
    SELECT upd.id, {_PG_NOW},
        {_CLAIM_KIND},
        upd.worker_name, upd.attempt,
        {_CLAIM_MESSAGE},
        {_CLAIM_DATA}
    FROM upd
), me_now AS (
    -- The worker's row follows the claim at once, not at its next beat: wake-ups pick
    -- idle workers by their rows. Busy once it took a job (a burst of submits would
    -- otherwise keep waking the few that claimed first while the rest slept until their
    -- fallback poll); idle again once a claim of a worker holding nothing else finds
    -- nothing (a job shorter than the reporter's tick is never seen by a beat).
    UPDATE workers SET
        state = CASE WHEN EXISTS (SELECT 1 FROM upd) THEN '{WorkerState.BUSY.value}'
                     ELSE '{WorkerState.IDLE.value}' END,
        current_job = (SELECT upd.id FROM upd)
    WHERE workers.id = %(worker_id)s AND CASE WHEN EXISTS (SELECT 1 FROM upd)
        THEN workers.state = '{WorkerState.IDLE.value}'
        ELSE %(idle_if_empty)s::boolean AND workers.state = '{WorkerState.BUSY.value}' END
)"""

# The claim, on its own: the parameters of ClaimRequest.params(); answers the job's row.
CLAIM_SQL = "WITH " + _CLAIM_CTES.format(pick_from="") + "\nSELECT * FROM upd"


@functools.cache
def finish_sql(columns: tuple[str, ...], with_logs: bool, then_claim: bool) -> str:
    """The fenced result in one statement: the row, its event, its last log lines, NOTIFY.

    With ``then_claim``, the same statement claims the worker's next job, only if the
    result was written; it answers one row: ``finished`` (0 when refused) and the job.
    """
    sets = "".join(f", {c} = %({c})s" for c in columns)
    finish = f"""
WITH fin AS (
    UPDATE jobs SET state = %(state)s, lease_expires_at = NULL, finished_at = {_PG_NOW},
        updated_at = {_PG_NOW}, run_seconds = run_seconds + %(run_seconds)s{sets}
    WHERE id = %(job_id)s AND attempt = %(attempt)s
      AND state = '{JobState.RUNNING.value}'
    RETURNING id
), fin_event AS (
    INSERT INTO events (job_id, at, kind, worker, attempt, message, data)
    SELECT fin.id, {_PG_NOW}, %(kind)s, %(worker)s, %(attempt)s, %(message)s, %(data)s
    FROM fin
)"""
    if with_logs:
        finish += """, fin_logs AS (
    INSERT INTO job_logs (job_id, attempt, at, level, message)
    SELECT fin.id, %(attempt)s, l.at, l.level, l.message
    FROM fin, unnest(%(log_at)s::float8[], %(log_level)s::varchar[],
                     %(log_message)s::text[]) WITH ORDINALITY AS l(at, level, message, n)
    ORDER BY l.n
)"""
    if not then_claim:
        # No next job claimed in this statement: a queued job this result lets run (its
        # owner's running quota) must not wait for an idle worker's poll.
        waiting = (f"(SELECT * FROM jobs WHERE state = '{JobState.QUEUED.value}' "
                   "LIMIT 1) q")
        wake = wake_idle_sql(waiting, "2", "EXISTS (SELECT 1 FROM fin)")
        return (finish + f", wake_idle AS (\n{wake}\n)\n"
                + "SELECT 1 AS finished, (SELECT count(*) FROM wake_idle) AS woke_idle "
                "FROM fin")
    return (finish + ",\n" + _CLAIM_CTES.format(pick_from="FROM fin")
            + "\nSELECT n.finished, upd.* FROM (SELECT count(*) AS finished FROM fin) n"
            + " LEFT JOIN upd ON true")


# The heartbeat in one statement (PostgresStore.beat): every lease the worker holds renewed
# (fenced) with its progress, its log lines and its metric point; the worker's row; the
# fleet's sweeper lease. Answers the leases held (with their cancel flags and how long
# each job's metric series is now), whether this worker leads the sweep, and whether a
# sweep would find work.
_BEAT_ONE = """b AS (
    SELECT %(job_id)s::varchar AS job_id, %(attempt)s::int AS attempt,
        %(moved)s::boolean AS moved, %(step)s::int AS step, %(total)s::int AS total,
        %(metrics)s::text AS metrics, %(point)s::text AS point, 1 AS n
)"""
_BEAT_MANY = """b AS (
    SELECT * FROM unnest(%(job_id)s::varchar[], %(attempt)s::int[], %(moved)s::boolean[],
                         %(step)s::int[], %(total)s::int[], %(metrics)s::text[],
                         %(point)s::text[])
        WITH ORDINALITY AS b(job_id, attempt, moved, step, total, metrics, point, n)
)"""


@functools.cache
def beat_sql(leases: int, with_logs: bool, with_points: bool) -> str:
    """The beat of a worker holding ``leases`` leases (0, 1, or 2 for any more): one
    statement, its parameters those of :func:`beat_params`. The shape of each case is its own:
    the array form of many leases costs the server twice the CPU of one lease's scalars
    (measured 1.5 against 0.67 ms a beat), and an idle beat touches no job."""
    ctes = [f"clock AS (\n    SELECT {_PG_NOW} AS now\n)"]
    if leases:
        # The ids' array as well as the join: the primary key's lookup is the plan
        # whatever the statistics of a freshly filled table say (else a scan of every
        # running job).
        match = ("jobs.id = %(job_id)s" if leases == 1 else
                 "jobs.id = ANY(%(job_id)s::varchar[]) AND jobs.id = b.job_id")
        ctes += [_BEAT_ONE if leases == 1 else _BEAT_MANY, f"""upd AS (
    UPDATE jobs SET lease_expires_at = clock.now + %(lease_seconds)s,
        progress_step = CASE WHEN b.moved THEN b.step ELSE jobs.progress_step END,
        progress_total = CASE WHEN b.moved THEN b.total ELSE jobs.progress_total END,
        progress_metrics = CASE WHEN b.moved THEN b.metrics ELSE jobs.progress_metrics END,
        updated_at = CASE WHEN b.moved THEN clock.now ELSE jobs.updated_at END
    FROM b, clock
    WHERE {match} AND jobs.attempt = b.attempt AND jobs.state = '{JobState.RUNNING.value}'
    RETURNING jobs.id, jobs.attempt, jobs.cancel_requested, b.n, b.step, b.point, clock.now
)"""]
        if with_logs:
            ctes.append("""logs AS (
    INSERT INTO job_logs (job_id, attempt, at, level, message)
    SELECT upd.id, upd.attempt, l.at, l.level, l.message
    FROM unnest(%(log_job)s::varchar[], %(log_at)s::float8[], %(log_level)s::varchar[],
                %(log_message)s::text[]) WITH ORDINALITY AS l(job_id, at, level, message, n)
    JOIN upd ON upd.id = l.job_id
    ORDER BY l.n
)""")
        if with_points:
            ctes.append("""points AS (
    INSERT INTO job_metrics (job_id, attempt, step, at, metrics)
    SELECT upd.id, upd.attempt, upd.step, upd.now, upd.point FROM upd
    WHERE upd.point IS NOT NULL
)""")
    held = "EXISTS (SELECT 1 FROM upd)" if leases else "false"
    ctes.append(f"""me AS (
    UPDATE workers SET last_heartbeat = clock.now, alive_until = clock.now + %(alive_for)s,
        current_job = {"(SELECT upd.id FROM upd ORDER BY upd.n LIMIT 1)" if leases else "NULL"},
        state = CASE WHEN workers.state IN ('{WorkerState.IDLE.value}',
                                            '{WorkerState.BUSY.value}')
            THEN CASE WHEN {held} THEN '{WorkerState.BUSY.value}'
                      ELSE '{WorkerState.IDLE.value}' END
            ELSE workers.state END
    FROM clock WHERE workers.id = %(worker_id)s
)""")
    ctes.append("""lead AS (
    UPDATE intake_leases SET holder = %(worker_id)s,
        expires_at = clock.now + %(lease_seconds)s
    FROM clock
    WHERE %(sweeper)s AND intake_leases.name = %(sweeper_name)s
      AND (intake_leases.holder = %(worker_id)s OR intake_leases.expires_at < clock.now)
    RETURNING 1
)""")
    points = ("CASE WHEN upd.point IS NULL THEN 0 ELSE 1 + (SELECT count(*) FROM job_metrics m"
              " WHERE m.job_id = upd.id) END" if with_points else "0")
    answer = (f"""(SELECT json_agg(json_build_object(
            'id', upd.id, 'cancel', upd.cancel_requested, 'points', {points}))
        FROM upd)""" if leases else "NULL::json")
    return "WITH " + ", ".join(ctes) + f"""
SELECT {answer} AS held,
    EXISTS (SELECT 1 FROM lead) AS leads,
    EXISTS (SELECT 1 FROM lead) AND (
        -- the partial indexes' probes; the clock as an init plan, so an index bound
        EXISTS (SELECT 1 FROM jobs WHERE jobs.state = '{JobState.RUNNING.value}'
                AND jobs.lease_expires_at < (SELECT now FROM clock))
        OR EXISTS (SELECT 1 FROM workers
                   WHERE workers.state IN ('idle', 'busy', 'stopping')
                   AND workers.alive_until < (SELECT now FROM clock))) AS to_sweep"""


# The columns a submit writes from each item, with their SQL types (the fields of the
# statement's one JSON parameter, an object per job: see submit_sql).
SUBMIT_COLUMNS: dict[str, str] = {
    "id": "varchar", "pipeline": "varchar", "params": "text", "priority": "int",
    "max_retries": "int", "on_preempt": "varchar", "timeout_seconds": "float8",
    "requires_cuda": "boolean", "pool": "varchar", "idempotency_key": "varchar",
    "callback_url": "text", "checkpoint_every_steps": "int",
    "checkpoint_every_seconds": "float8", "max_preemptions": "int", "deadline": "float8",
}


@functools.cache
def submit_sql(by_owner: bool, with_keys: bool, with_quota: bool) -> str:
    """The submit of any number of jobs in one statement: their rows, their 'submitted'
    events, one NOTIFY. Answers one row, whose ``answer`` is a JSON list with an object
    per item, in order: ``item_n``; ``old_id`` and ``old_same`` when its idempotency key
    names a job already (the same pipeline and params, or not); ``queued_now`` (the
    owner's queued jobs before, ``with_quota``); ``job``, the new job's row (null when
    nothing was written). One row, so that any batch takes the hot path's one round trip.

    Nothing is written when a key names a different job, or (``with_quota``) when the
    new jobs would take the owner past ``max_queued``: the caller raises. The quota's
    count is only safe after the owner's advisory lock, taken by an earlier statement of
    the transaction (a statement sees the commits from before it began).
    """
    cols = ", ".join(SUBMIT_COLUMNS)
    typed = ", ".join(f"{c} {t}" for c, t in SUBMIT_COLUMNS.items())
    # One JSON parameter, not an array per column: psycopg dumps arrays element by
    # element in Python (6 ms for a batch of 100), json.dumps the list at once.
    sql = f"""WITH item AS (
    SELECT * FROM ROWS FROM (json_to_recordset(%(items)s::json) AS ({typed}))
        WITH ORDINALITY AS i({cols}, n)
)"""
    guards = []
    if with_keys:
        # owner IS NULL, not IS NOT DISTINCT FROM: the unique index serves only the first.
        owner_is = "j.owner = %(owner)s" if by_owner else "j.owner IS NULL"
        sql += f""", old AS (
    SELECT i.n, j.id,
        (j.pipeline = i.pipeline AND j.params::jsonb = i.params::jsonb) AS same
    FROM item i JOIN jobs j ON j.idempotency_key = i.idempotency_key AND {owner_is}
), fresh AS (
    SELECT * FROM item WHERE n NOT IN (SELECT n FROM old)
)"""
        guards.append("NOT EXISTS (SELECT 1 FROM old WHERE NOT old.same)")
    else:
        sql += ", fresh AS (SELECT * FROM item)"
    if with_quota:
        sql += f""", queued AS (
    SELECT count(*) AS queued FROM jobs
    WHERE owner = %(owner)s AND state = '{JobState.QUEUED.value}'
)"""
        guards.append("(SELECT queued FROM queued) + (SELECT count(*) FROM fresh)"
                      " <= %(max_queued)s")
    where = ("WHERE " + " AND ".join(guards)) if guards else ""
    sql += f""", clock AS (
    SELECT {_PG_NOW} AS now
), ins AS (
    INSERT INTO jobs ({cols}, owner, state, created_at, updated_at)
    SELECT {", ".join(f"fresh.{c}" for c in SUBMIT_COLUMNS)}, %(owner)s,
        '{JobState.QUEUED.value}', clock.now, clock.now
    FROM fresh, clock {where}
    ORDER BY fresh.n
    RETURNING jobs.*
), ev AS (
    INSERT INTO events (job_id, at, kind, worker, attempt, message, data)
    SELECT ins.id, ins.created_at, %(kind)s, NULL, 0, %(message)s, %(data)s
    FROM ins JOIN item ON item.id = ins.id ORDER BY item.n
), wake_idle AS (
    {wake_idle_sql("ins q", "(SELECT count(*) + 1 FROM ins)")}
)
SELECT json_agg(json_build_object(
        'item_n', item.n,
        'old_id', {"old.id" if with_keys else "NULL"},
        'old_same', {"old.same" if with_keys else "NULL"},
        'queued_now', {"(SELECT queued FROM queued)" if with_quota else "NULL"},
        'job', to_json(ins)) ORDER BY item.n) AS answer,
    (SELECT count(*) FROM wake_idle) AS woke_idle
FROM item {"LEFT JOIN old ON old.n = item.n" if with_keys else ""}
LEFT JOIN ins ON ins.id = item.id"""
    return sql


def beat_params(worker_id: str, beats: Sequence[Beat], lease_seconds: float, *,
                alive_for: float, sweeper: bool) -> tuple[str, dict[str, Any]]:
    """One worker's beat: its statement (:func:`beat_sql`) and that statement's
    parameters."""
    points = [series_point(b.progress.metrics) if b.progress else None for b in beats]
    logs = [(b.lease.job_id, line) for b in beats for line in b.logs]
    params: dict[str, Any] = {
        "worker_id": worker_id, "lease_seconds": float(lease_seconds),
        "alive_for": float(alive_for), "sweeper": sweeper, "sweeper_name": SWEEPER}
    cols: dict[str, list[Any]] = {
        "job_id": [b.lease.job_id for b in beats],
        "attempt": [b.lease.attempt for b in beats],
        "moved": [b.progress is not None for b in beats],
        "step": [None if b.progress is None else b.progress.step for b in beats],
        "total": [None if b.progress is None else b.progress.total for b in beats],
        "metrics": [dumps(b.progress.metrics) if b.progress and b.progress.metrics
                    else None for b in beats],
        "point": points}
    n = min(len(beats), 2)
    params.update({k: v[0] for k, v in cols.items()} if n == 1 else cols)
    if logs:
        params.update(log_job=[job for job, _ in logs], log_at=[at for _, (at, _, _) in logs],
                      log_level=[level for _, (_, level, _) in logs],
                      log_message=[msg for _, (_, _, msg) in logs])
    sql = beat_sql(n, bool(logs) and n > 0, any(p is not None for p in points))
    return sql, params

class PostgresStore(JobStore):
    """The queue on PostgreSQL."""

    is_postgres = True

    def __init__(self, engine: Engine) -> None:
        self._hot_columns: dict[str, list[str]] = {}  # see _pg_one
        super().__init__(engine)

    # ------------------------------------------------------------ the hooks

    def _clock(self) -> sa.ColumnElement[float]:
        return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float)

    def get(self, job_id: str, *, with_events: bool = True) -> Job:
        sql = _GET_JOB_WITH_EVENTS_SQL if with_events else _GET_JOB_SQL
        try:
            row = self._pg_one(sql, {"id": job_id})
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # A connection that died while idle in the pool (a restart): a read can be
            # sent again, on a new one.
            row = self._pg_one(sql, {"id": job_id})
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        history = row.get("spotrun_history") or ()
        return job_from_row(row, tuple(event_of(dict(zip(_EVENT_FIELDS, e, strict=True)))
                                       for e in history))

    def _wake_idle(self, conn: Connection, job_id: str | None = None, *, jobs: int = 1
                   ) -> None:
        if job_id is None:  # any idle worker will do
            sql = wake_idle_sql("(SELECT NULL::varchar AS pool, false AS requires_cuda) q",
                                str(jobs + 1))
        else:
            sql = wake_idle_sql("jobs q", "2", "q.id = :job_id")
        conn.execute(sa.text(f"SELECT count(*) FROM ({sql}) x"),
                     {} if job_id is None else {"job_id": job_id})

    def _lock_owner(self, conn: Connection, owner: str) -> None:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                     {"key": f"spotrun-quota:{owner}"})

    def _lock_job(self, conn: Connection, job_id: str) -> None:
        conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())

    def _bound_on_checkout(self, dbapi_conn: Any, ms: int) -> None:
        bounds = pg_bounds(self.engine)
        if bounds.pooled:  # each transaction sets it (the hot path's too)
            bounds.lock_ms = ms
            return
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        dbapi_conn.execute(f"SET lock_timeout = {ms}")
        dbapi_conn.autocommit = autocommit

    @property
    def server_port(self) -> int | None:
        return self.engine.url.port or 5432

    def migrate(self) -> None:
        if self.current_revision() == migrations.head_revision():
            return
        with self.engine.connect() as conn, conn.begin():
            # A migration may rewrite a large table: no worker's statement bound.
            conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
            conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            migrations.upgrade(conn)

    def waker(self, worker_id: str, *, shared: bool = False) -> Waker:
        channel = worker_channel(worker_id)
        direct = listen_url()
        if direct is not None:
            return ListenWaker(self, direct, channel=channel)
        if pg_bounds(self.engine).pooled:
            # LISTEN is a session's: a transaction pooler would lose it.
            return PollWaker()
        if shared:
            return PooledListenWaker(self, channel=channel)
        return ListenWaker(self, channel=channel)

    def stall_writes(self, seconds: float) -> None:
        with self.engine.connect() as conn:
            # Held on purpose past the server's bound on an idle transaction.
            conn.execute(sa.text("SET LOCAL idle_in_transaction_session_timeout = 0"))
            # What CREATE INDEX without CONCURRENTLY takes: writes wait, reads go on.
            conn.execute(sa.text("LOCK TABLE jobs IN SHARE MODE"))
            time.sleep(seconds)
            conn.rollback()

    # --------------------------------------------------------------- heartbeat

    def beat(self, worker_id: str, beats: Sequence[Beat], lease_seconds: float, *,
             alive_for: float | None = None, sweeper: bool = False) -> BeatResult:
        """The heartbeat as one statement (:func:`beat_sql`), on the hot path's connection.

        The same writes as the shared code's transaction of a statement per lease, log
        batch, metric point, worker row and sweeper lease: a fleet's database pays one
        round trip and one commit a beat, and the worker a fraction of the CPU.
        """
        held: dict[str, bool | None] = {b.lease.job_id: None for b in beats}
        row = self._pg_one(*beat_params(
            worker_id, beats, lease_seconds,
            alive_for=lease_seconds if alive_for is None else alive_for, sweeper=sweeper))
        leads = bool(row and row["leads"])
        to_sweep = bool(row and row["to_sweep"])
        long_series = []
        for got in (row or {}).get("held") or []:
            held[got["id"]] = bool(got["cancel"])
            if got["points"] > MAX_METRIC_POINTS:
                long_series.append(got["id"])
        for job_id in long_series:  # once in MAX_METRIC_POINTS / 2 beats of a job
            with self._tx() as conn:
                self._thin_metrics(conn, job_id)
        if leads:
            self._sweeper_row_seen = True
        elif sweeper and not self._sweeper_row_seen:
            leads, to_sweep = self._first_sweeper_beat(worker_id, lease_seconds)
        return BeatResult(held, leads, to_sweep)

    # ------------------------------------------------------------------ submit

    def _insert_jobs(self, rows: list[dict[str, Any]], indexes: list[int], *,
                     owner: str | None, quota: Quota | None) -> list[Job]:
        # One statement (submit_sql). With no quota to check it is the hot path's kind
        # of call, one round trip on a connection in autocommit: the SQLAlchemy
        # transaction it replaces cost 3.0 ms of CPU a submit (4.7 ms wall), this one
        # 0.4 ms (1.7 ms). A quota needs the owner's lock first, so a transaction.
        from psycopg.types.json import Json

        kind, message, data = render(Submitted())
        params: dict[str, Any] = {
            "items": Json([{c: r[c] for c in SUBMIT_COLUMNS} for r in rows]),
            "owner": owner, "kind": kind, "message": message, "data": dumps(data),
            "max_queued": None if quota is None else quota.max_queued}
        sql = submit_sql(owner is not None,
                         any(r["idempotency_key"] is not None for r in rows),
                         quota is not None and owner is not None)
        if quota is None or owner is None:
            one = self._pg_one(sql, params)
        else:
            with self._tx() as conn:
                self._lock_owner(conn, owner)
                got = conn.exec_driver_sql(sql, params).mappings().first()
                one = None if got is None else dict(got)
        answer: list[dict[str, Any]] = [] if one is None else list(one["answer"] or [])
        for row in answer:
            if row["old_id"] is not None and not row["old_same"]:
                raise KeyReused(indexes[row["item_n"] - 1], row["old_id"])
        out: list[Job | None] = []
        old: list[str] = []
        for row in answer:
            if row["old_id"] is not None:
                old.append(row["old_id"])
                out.append(None)
            elif row["job"] is None:
                assert quota is not None and owner is not None
                adding = sum(1 for r in answer if r["old_id"] is None)
                raise QuotaExceeded(owner, "max_queued", quota.max_queued,
                                    int(row["queued_now"]) + adding)
            else:
                job = row["job"]
                out.append(job_from_row(job, (Event(
                    at=from_epoch(job["created_at"]), kind=kind, worker=None, attempt=0,
                    message=message, detail=None, data=data),)))
        if len(out) != len(rows):
            raise StoreError("the submit answered for fewer jobs than it was given")
        if old:
            with self._tx(write=False) as conn:
                found = self._get_many(conn, old)
            it = iter(old)
            out = [found[next(it)] if j is None else j for j in out]
        return [j for j in out if j is not None]

    # ------------------------------------------------------------------ sweep

    def _lock_expired(self, pick: sa.Select[Any]) -> sa.Select[Any]:
        return pick.with_for_update(skip_locked=True)

    def _probe_locks(self, conn: Connection) -> None:
        conn.execute(sa.text("LOCK TABLE jobs IN ROW EXCLUSIVE MODE"))

    @contextlib.contextmanager
    def _sweep_tx(self, within: float | None) -> Iterator[Connection]:
        if within is None:
            with self._tx() as conn:
                yield conn
            return
        wait_ms = max(1, min(200, int(within * 1000)))
        with self.engine.connect() as conn, conn.begin():
            conn.execute(sa.text(f"SET LOCAL lock_timeout = {wait_ms}"))
            yield conn

    # ------------------------------------------------------- claim and result

    def _claim(self, *, worker_id: str, worker_name: str, lease_seconds: float,
               has_cuda: bool, pool: str | None, request_id: str | None,
               idle_if_empty: bool) -> tuple[Lease, JobRecord] | None:
        picked = self._pg_one(CLAIM_SQL, ClaimRequest(
            worker_id, worker_name, lease_seconds, has_cuda, pool, request_id,
            idle_if_empty).params())
        if picked is None:
            return None
        job = job_from_row(picked, ())
        return Lease(job.id, job.attempt, worker_id, worker_name), job

    def _write_result(self, lease: Lease, state: JobState, kind: str, message: str, *,
                      run_seconds: float, logs: Sequence[tuple[float, str, str]],
                      then_claim: ClaimRequest | None, values: dict[str, Any],
                      data: dict[str, Any] | None
                      ) -> tuple[Lease, JobRecord] | None:
        params = dict(values, job_id=lease.job_id, attempt=lease.attempt, state=state.value,
                      run_seconds=float(run_seconds), kind=str(kind),
                      worker=lease.worker_name, message=message,
                      data=None if data is None else dumps(data))
        if logs:
            params.update(log_at=[at for at, _, _ in logs],
                          log_level=[level for _, level, _ in logs],
                          log_message=[msg for _, _, msg in logs])
        if then_claim is not None:
            params.update(then_claim.params())
        row = self._pg_one(finish_sql(tuple(sorted(values)), bool(logs),
                                      then_claim is not None), params)
        if row is None or row.get("finished") == 0:
            with self.engine.connect() as conn:
                raise self._refused(conn, lease, f"{state.value} result")
        if then_claim is None or row["id"] is None:
            return None
        job = job_from_row(row, ())
        return Lease(job.id, job.attempt, then_claim.worker_id, then_claim.worker_name), job

    def _pg_one(self, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run one statement of the hot path as its own transaction.

        Sent with psycopg on a connection of the engine's pool, in autocommit:
        SQLAlchemy's per-call work (compiling, the Connection's begin and reset) cost the
        worker more CPU than the database spent on the job (measured 4.6 ms against 0.4 ms
        a job); the pool's connection, not one of its own, keeps a worker at two
        connections. Driver errors are raised as SQLAlchemy's, as the rest of the store's
        code raises them (the store's edge maps them to its own errors).

        Directly connected, the statement is prepared on the connection at its first use
        (see ``PREPARE_ONLY_WHEN_ASKED``); one whose answer's columns changed under it (a
        newer release's migration added a column to ``jobs.*``) is prepared again, once.
        """
        import psycopg

        bounds = pg_bounds(self.engine)
        with pg_checkout(self.engine) as pg:
            try:
                if bounds.pooled:
                    # Behind a transaction pooler the bounds hold for one transaction
                    # only: the statement gets one of its own that sets them first.
                    pg.execute("BEGIN; " + bounds.set_local_sql())
                with pg.cursor() as cur:
                    try:
                        cur.execute(sql, params, prepare=True)
                    except psycopg.errors.FeatureNotSupported as exc:
                        if "cached plan" not in str(exc):  # (never prepared if pooled)
                            raise
                        # The failed statement did nothing; DEALLOCATE ALL also empties
                        # psycopg's own cache of the connection's prepared statements.
                        pg.execute("DEALLOCATE ALL")
                        self._hot_columns.pop(sql, None)
                        cur.execute(sql, params, prepare=True)
                    row = cur.fetchone()
                    # Column names decoded once per statement, not once per row.
                    names = self._hot_columns.get(sql)
                    if names is None and cur.description is not None:
                        names = self._hot_columns[sql] = [c.name for c in cur.description]
                if bounds.pooled:
                    pg.execute("COMMIT")
            except psycopg.Error as exc:
                if bounds.pooled and not (pg.closed or pg.broken):
                    with contextlib.suppress(psycopg.Error):
                        pg.rollback()
                raise sa.exc.DBAPIError.instance(
                    sql, None, exc, psycopg.Error, hide_parameters=True,
                    connection_invalidated=pg.closed or pg.broken) from exc
        return None if row is None or names is None else dict(zip(names, row, strict=True))


class PollWaker(Waker):
    """Behind a transaction pooler with no direct URL to LISTEN on: no wake-up ever comes,
    so the idle worker finds work by its fallback poll alone."""

    def wait(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False

    def close(self) -> None:
        pass


class ListenWaker(Waker):
    """LISTEN on a connection of its own (opened from the store's engine, so with the
    URL's every setting, or from ``direct_url``'s, past a pooler); NOTIFY comes with each
    commit that queues work for the worker whose channel it hears."""

    def __init__(self, store: PostgresStore, direct_url: str | None = None, *,
                 channel: str) -> None:
        self.store = store
        self.channel = channel
        self._direct_url = direct_url
        self._direct: Engine | None = None
        self._pg: Any = None
        self._listening = False

    def _connect(self) -> psycopg.Connection[Any]:
        if self._direct_url is None:
            return pg_connection(self.store.engine)
        if self._direct is None:
            self._direct = create_engine(normalize_url(self._direct_url), pool_size=1,
                                         pre_ping=False)
        return pg_connection(self._direct)

    def wait(self, timeout: float) -> bool:
        try:
            if self._pg is None:
                self._pg = self._connect()
            if not self._listening:
                self._pg.execute(f"LISTEN {self.channel}")
                self._listening = True
                # A job queued before the LISTEN sent a notice nobody heard: look once more.
                return True
            got = False
            for _ in self._pg.notifies(timeout=timeout, stop_after=1):
                got = True
            return got
        except Exception:
            self.close()
            time.sleep(min(timeout, 0.5))
            return True

    def busy(self) -> None:
        """Stop listening, and close the connection, until the worker waits again.

        PostgreSQL signals every listening session of the database on every NOTIFY, and
        each job's result sends one: busy workers would cost the server a wake-up per job.
        Closed, not only UNLISTENed: a busy worker holds one connection fewer (its
        pipeline's needs one then), at the cost of a connect when it next goes idle.
        """
        if self._pg is not None:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._pg is not None:
                self._pg.close()
        self._pg = None
        self._listening = False
        if self._direct is not None:
            self._direct.dispose()
            self._direct = None


class PooledListenWaker(Waker):
    """LISTEN on the connection the worker's claims use, checked out of its pool for each
    wait: an idle worker holds no connection for its wake-ups alone.

    Notifications that come while a claim uses the connection wait in psycopg's backlog
    for the next wait. A busy worker stops listening (UNLISTEN), or every job ended in the
    fleet would reach its session.
    """

    def __init__(self, store: PostgresStore, *, channel: str) -> None:
        self.store = store
        self.channel = channel
        self._on: Any = None  # the psycopg connection that LISTENs

    def wait(self, timeout: float) -> bool:
        try:
            with pg_checkout(self.store.engine) as pg:
                if pg is not self._on:
                    pg.execute(f"LISTEN {self.channel}")
                    self._on = pg
                    # A job queued before the LISTEN sent a notice nobody heard.
                    return True
                got = False
                for _ in pg.notifies(timeout=timeout, stop_after=1):
                    got = True
                return got
        except Exception:
            self._on = None
            time.sleep(min(timeout, 0.5))
            return True

    def busy(self) -> None:
        """Stop listening on the connection that listens, if it is the one the pool gives."""
        if self._on is None:
            return
        with contextlib.suppress(Exception), pg_checkout(self.store.engine) as pg:
            if pg is self._on:
                pg.execute("UNLISTEN *")
                for _ in pg.notifies(timeout=0):  # what came before: nobody waits now
                    pass
        self._on = None

    def close(self) -> None:
        self.busy()


register_dialect("postgresql", PostgresStore)
