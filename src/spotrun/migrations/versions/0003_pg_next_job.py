"""PostgreSQL: the claim's pick as a function that always walks the queue's index

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# The planner picks the claim's plan from the table's statistics. Right after a burst of
# submissions those say "few queued jobs" until autovacuum analyzes the table, and the
# planner then reads and sorts the whole queue on every claim (measured: 8 ms a claim with
# 3,000 queued, growing with the queue). The settings below apply inside the function
# only and leave the ordered index walk as the one plan: it stops at the first free job.
NEXT_JOB = """
CREATE OR REPLACE FUNCTION spotrun_next_job(p_has_cuda boolean, p_pool varchar)
RETURNS varchar
LANGUAGE plpgsql
SET enable_bitmapscan = off
SET enable_seqscan = off
SET enable_sort = off
AS $$
BEGIN
    RETURN (
        SELECT id FROM jobs
        WHERE state = 'queued'
          AND (p_has_cuda OR NOT requires_cuda)
          AND (p_pool IS NULL OR pool IS NULL OR pool = p_pool)
        ORDER BY priority DESC, created_at, id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    );
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NEXT_JOB)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS spotrun_next_job(boolean, varchar)")
