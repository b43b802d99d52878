"""API tokens may expire; dashboard sessions; per-user quotas; fair share of the claim

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

# The pick this migration replaces, for its downgrade.
NEXT_JOB_0003 = importlib.import_module(
    "spotrun.migrations.versions.0003_pg_next_job").NEXT_JOB

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# The claim's pick, shared fairly by owner (see docs/architecture.md, "Fair share"):
# jobs with a priority above 0 (an operator's right) first; then, among the owners with a
# job this worker may run and under their running quota, the one with the fewest running
# jobs (ties: whose next job came first), and that owner's next job by priority and age.
# Every step is an index range; with one owner it costs a few index probes more than 0003.
FAIR_NEXT_JOB = """
CREATE OR REPLACE FUNCTION spotrun_next_job(p_has_cuda boolean, p_pool varchar)
RETURNS varchar
LANGUAGE plpgsql
SET enable_bitmapscan = off
SET enable_seqscan = off
AS $$
DECLARE
    v_id varchar;
    v_owner record;
BEGIN
    SELECT id INTO v_id FROM jobs
    WHERE state = 'queued' AND priority > 0
      AND (p_has_cuda OR NOT requires_cuda)
      AND (p_pool IS NULL OR pool IS NULL OR pool = p_pool)
    ORDER BY priority DESC, created_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED;
    IF v_id IS NOT NULL THEN
        RETURN v_id;
    END IF;
    FOR v_owner IN
        WITH RECURSIVE named(o) AS (
            (SELECT owner FROM jobs WHERE state = 'queued' AND owner IS NOT NULL
             ORDER BY owner LIMIT 1)
            UNION ALL
            SELECT (SELECT j.owner FROM jobs j
                    WHERE j.state = 'queued' AND j.owner > named.o
                    ORDER BY j.owner LIMIT 1)
            FROM named WHERE named.o IS NOT NULL
        ), owners(o) AS (
            SELECT o FROM named WHERE o IS NOT NULL
            UNION ALL
            SELECT NULL WHERE EXISTS (SELECT 1 FROM jobs
                                      WHERE state = 'queued' AND owner IS NULL)
        )
        SELECT owners.o AS o,
            (SELECT count(*) FROM jobs r WHERE r.state = 'running'
                AND (r.owner = owners.o OR (owners.o IS NULL AND r.owner IS NULL)))
                AS running,
            (SELECT w.created_at FROM jobs w WHERE w.state = 'queued'
                AND (w.owner = owners.o OR (owners.o IS NULL AND w.owner IS NULL))
                ORDER BY w.priority DESC, w.created_at, w.id LIMIT 1) AS head,
            (SELECT q.max_running FROM quotas q WHERE q.owner = owners.o) AS max_running
        FROM owners
        ORDER BY running, head
    LOOP
        CONTINUE WHEN coalesce(v_owner.max_running, 0) > 0
                      AND v_owner.running >= v_owner.max_running;
        IF v_owner.o IS NULL THEN
            SELECT id INTO v_id FROM jobs
            WHERE state = 'queued' AND owner IS NULL
              AND (p_has_cuda OR NOT requires_cuda)
              AND (p_pool IS NULL OR pool IS NULL OR pool = p_pool)
            ORDER BY priority DESC, created_at, id
            LIMIT 1
            FOR UPDATE SKIP LOCKED;
        ELSE
            SELECT id INTO v_id FROM jobs
            WHERE state = 'queued' AND owner = v_owner.o
              AND (p_has_cuda OR NOT requires_cuda)
              AND (p_pool IS NULL OR pool IS NULL OR pool = p_pool)
            ORDER BY priority DESC, created_at, id
            LIMIT 1
            FOR UPDATE SKIP LOCKED;
        END IF;
        IF v_id IS NOT NULL THEN
            RETURN v_id;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.Float(), nullable=True))
    op.create_table(
        'web_sessions',
        sa.Column('id_hash', sa.String(length=64), nullable=False),
        sa.Column('token_name', sa.String(length=100), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('expires_at', sa.Float(), nullable=False),
        sa.Column('revoked_at', sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(['token_name'], ['api_tokens.name'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id_hash'),
    )
    op.create_table(
        'quotas',
        sa.Column('owner', sa.String(length=100), nullable=False),
        sa.Column('max_queued', sa.Integer(), nullable=True),
        sa.Column('max_running', sa.Integer(), nullable=True),
        sa.Column('max_retries', sa.Integer(), nullable=True),
        sa.Column('max_priority', sa.Integer(), nullable=True),
        sa.Column('max_params_bytes', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('owner'),
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_state_owner', ['state', 'owner', sa.text('priority DESC'),
                                                      'created_at', 'id'], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FAIR_NEXT_JOB)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NEXT_JOB_0003)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_owner')
    op.drop_table('quotas')
    op.drop_table('web_sessions')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_column('expires_at')
