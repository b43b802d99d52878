"""request ids (a retried claim or result finds its own committed write); callbacks
delivered once across server processes (a leader by lease, a record of deliveries)

Revision ID: 0004
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_id', sa.String(32), nullable=True))
    op.create_table(
        'callback_leader',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('holder', sa.String(100), nullable=True),
        sa.Column('expires_at', sa.Float(), nullable=True),
        sa.Column('horizon', sa.Integer(), server_default='0', nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_table(
        'callback_deliveries',
        sa.Column('event_id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('event_id'),
    )
    # Deliveries start from here: the events before the upgrade were the old deliverer's.
    op.execute("INSERT INTO callback_leader (id, horizon) "
               "SELECT 1, coalesce(max(id), 0) FROM events")


def downgrade() -> None:
    op.drop_table('callback_deliveries')
    op.drop_table('callback_leader')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('request_id')
