"""per-job preemption limit and deadline (escalation to on-demand); index for live views

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_preemptions', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('deadline', sa.Float(), nullable=True))
        batch_op.create_index('ix_jobs_updated', ['updated_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_updated')
        batch_op.drop_column('deadline')
        batch_op.drop_column('max_preemptions')
