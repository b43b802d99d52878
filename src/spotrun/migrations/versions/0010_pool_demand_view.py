"""the view KEDA counts the queue through (counts only: no params, results or owners)

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

# KEDA's database user gets SELECT on this view and on nothing else: it needs how many
# jobs wait for (or run on) each pool, not what the jobs are.
POOL_DEMAND = """
CREATE VIEW spotrun_pool_demand AS
SELECT 'queued' AS state, pool, requires_cuda, count(*) AS jobs
FROM jobs WHERE state = 'queued'
GROUP BY pool, requires_cuda
UNION ALL
SELECT 'running' AS state, w.pool AS pool, j.requires_cuda AS requires_cuda, count(*) AS jobs
FROM jobs j JOIN workers w ON w.id = j.worker_id
WHERE j.state = 'running'
GROUP BY w.pool, j.requires_cuda
"""


def upgrade() -> None:
    op.execute(POOL_DEMAND)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS spotrun_pool_demand")
