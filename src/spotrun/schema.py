"""The tables. Alembic migrations under spotrun/migrations must produce exactly this."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# Times are seconds since the epoch by the database's clock, so that leases are judged by
# one clock however skewed the workers' hosts are.
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("pipeline", sa.String(100), nullable=False),
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_retries", sa.Integer, nullable=False, server_default="4"),
    sa.Column("on_preempt", sa.String(16), nullable=False, server_default="resume"),
    sa.Column("timeout_seconds", sa.Float, nullable=True),
    sa.Column("requires_cuda", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("pool", sa.String(32), nullable=True),
    sa.Column("worker_id", sa.String(32), nullable=True),
    sa.Column("worker_name", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("progress_step", sa.Integer, nullable=False, server_default="0"),
    sa.Column("progress_total", sa.Integer, nullable=True),
    sa.Column("progress_metrics", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("error_traceback", sa.Text, nullable=True),
    sa.Column("checkpoint", sa.Text, nullable=True),
    sa.Column("checkpoint_step", sa.Integer, nullable=True),
    sa.Column("checkpoint_prev", sa.Text, nullable=True),
    sa.Column("checkpoint_prev_step", sa.Integer, nullable=True),
    sa.Column("checkpoint_every_steps", sa.Integer, nullable=True),
    sa.Column("checkpoint_every_seconds", sa.Float, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("run_seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("owner", sa.String(100), nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("callback_url", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    # Escalation to on-demand: past this many preemptions, or when the deadline (epoch
    # seconds) can no longer be met at the progress rate seen so far.
    sa.Column("max_preemptions", sa.Integer, nullable=True),
    sa.Column("deadline", sa.Float, nullable=True),
    # The request of the write that last claimed or ended the job: a worker retrying a
    # write whose reply was lost finds its own committed write by it (see JobStore.claim).
    sa.Column("request_id", sa.String(32), nullable=True),
    sa.UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
)

# The claim query walks this index: only queued jobs, in claim order.
sa.Index(
    "ix_jobs_queued",
    jobs.c.priority.desc(),
    jobs.c.created_at,
    jobs.c.id,
    postgresql_where=sa.text("state = 'queued'"),
    sqlite_where=sa.text("state = 'queued'"),
)
# The sweep looks at running jobs only.
sa.Index(
    "ix_jobs_running_lease",
    jobs.c.lease_expires_at,
    postgresql_where=sa.text("state = 'running'"),
    sqlite_where=sa.text("state = 'running'"),
)
sa.Index("ix_jobs_state_created", jobs.c.state, jobs.c.created_at)
# Fair share and quotas: the owners with queued jobs (a loose scan), each owner's running
# and queued jobs, and each owner's next job in claim order, all as index ranges.
sa.Index("ix_jobs_state_owner", jobs.c.state, jobs.c.owner, jobs.c.priority.desc(),
         jobs.c.created_at, jobs.c.id)
# Live views follow the most recently changed jobs.
sa.Index("ix_jobs_updated", jobs.c.updated_at)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("worker", sa.String(200), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=True),
)
sa.Index("ix_events_job", events.c.job_id, events.c.id)

job_logs = sa.Table(
    "job_logs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("level", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
)
sa.Index("ix_job_logs_job", job_logs.c.job_id, job_logs.c.id)

# The metrics a job reported (loss, accuracy, ...), as a series for its training curve:
# numeric values only, at most MAX_METRIC_POINTS per job (store.py thins it by half when
# it grows past that, so it always spans the whole run).
job_metrics = sa.Table(
    "job_metrics",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
)
sa.Index("ix_job_metrics_job", job_metrics.c.job_id, job_metrics.c.step)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("pool", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("has_cuda", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("current_job", sa.String(32), nullable=True),
    sa.Column("lease_seconds", sa.Float, nullable=False),
    sa.Column("price_per_hour", sa.Float, nullable=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_heartbeat", sa.Float, nullable=False),
    # When the worker is overdue: its last heartbeat plus the window it promised with it
    # (a busy worker's lease, an idle one's three slow beats). A lapsed one is gone.
    sa.Column("alive_until", sa.Float, nullable=False, server_default="0"),
    sa.Column("stopped_at", sa.Float, nullable=True),
)
sa.Index("ix_workers_name", workers.c.name)
# The sweeper's look for overdue workers: live ones only, by when they are due, so the
# table may keep every worker ever started without a scan.
sa.Index(
    "ix_workers_live_due",
    workers.c.alive_until,
    postgresql_where=sa.text("state IN ('idle', 'busy', 'stopping')"),
    sqlite_where=sa.text("state IN ('idle', 'busy', 'stopping')"),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    # None: until revoked. Judged by the database clock, like leases.
    sa.Column("expires_at", sa.Float, nullable=True),
)

# A dashboard sign-in: the browser holds a random session id (stored hashed here), never
# the API token it signed in with; it ends at expiry, at sign-out, or with its token.
web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("token_name", sa.String(100),
              sa.ForeignKey("api_tokens.name", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

# A user's own limits; a NULL limit is the default (spotrun.quotas).
quotas = sa.Table(
    "quotas",
    metadata,
    sa.Column("owner", sa.String(100), primary_key=True),
    sa.Column("max_queued", sa.Integer, nullable=True),
    sa.Column("max_running", sa.Integer, nullable=True),
    sa.Column("max_retries", sa.Integer, nullable=True),
    sa.Column("max_priority", sa.Integer, nullable=True),
    sa.Column("max_params_bytes", sa.Integer, nullable=True),
)

# Jobs that came from a message bus (``spotrun intake``): the message that asked for each,
# and how far its events have been published back to the bus (a cursor per job, so that
# events committed out of id order are never skipped).
intake_requests = sa.Table(
    "intake_requests",
    metadata,
    sa.Column(
        "job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("source", sa.String(300), nullable=False),
    sa.Column("message_id", sa.String(200), nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("published_event_id", sa.Integer, nullable=False, server_default="0"),
    sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
)
# The publisher follows only the jobs whose final event it has not published yet.
sa.Index(
    "ix_intake_requests_pending",
    intake_requests.c.source,
    intake_requests.c.job_id,
    postgresql_where=sa.text("NOT done"),
    sqlite_where=sa.text("NOT done"),
)

# Leases that let one process at a time do a singleton's work, whichever replica or worker
# it runs in: the events publisher of a bus source, the fleet's one sweeper.
intake_leases = sa.Table(
    "intake_leases",
    metadata,
    sa.Column("name", sa.String(300), primary_key=True),
    sa.Column("holder", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# Callbacks: one deliverer at a time across every server process (a leader by lease, judged
# by the database clock), and a record of each event delivered (or given up on). Events at
# or below ``horizon`` are settled: all delivered, and too old to be a late commit.
callback_leader = sa.Table(
    "callback_leader",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("holder", sa.String(100), nullable=True),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("horizon", sa.Integer, nullable=False, server_default="0"),
)

callback_deliveries = sa.Table(
    "callback_deliveries",
    metadata,
    sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", sa.Float, nullable=False),
)

# The key each owner's callbacks are signed with (HMAC-SHA256), so that a receiver can
# tell a real "succeeded" from a forged one. Kept readable: the server signs with it, and
# its owner fetches it (GET /v1/callback-secret). owner '' is the operators' jobs.
callback_secrets = sa.Table(
    "callback_secrets",
    metadata,
    sa.Column("owner", sa.String(100), primary_key=True),
    sa.Column("secret", sa.String(100), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
