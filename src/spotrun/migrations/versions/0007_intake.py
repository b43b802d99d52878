"""requests from a message bus (intake): the message of each job, the events cursor

Revision ID: 0007
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'intake_requests',
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('source', sa.String(length=300), nullable=False),
        sa.Column('message_id', sa.String(length=200), nullable=False),
        sa.Column('idempotency_key', sa.String(length=200), nullable=True),
        sa.Column('published_event_id', sa.Integer(), server_default='0', nullable=False),
        sa.Column('done', sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id'),
    )
    with op.batch_alter_table('intake_requests', schema=None) as batch_op:
        batch_op.create_index('ix_intake_requests_pending', ['source', 'job_id'], unique=False,
                              postgresql_where=sa.text('NOT done'),
                              sqlite_where=sa.text('NOT done'))
    op.create_table(
        'intake_leases',
        sa.Column('name', sa.String(length=300), nullable=False),
        sa.Column('holder', sa.String(length=64), nullable=False),
        sa.Column('expires_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('intake_leases')
    with op.batch_alter_table('intake_requests', schema=None) as batch_op:
        batch_op.drop_index('ix_intake_requests_pending')
    op.drop_table('intake_requests')
