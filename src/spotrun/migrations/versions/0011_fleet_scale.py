"""workers promise when they are due (alive_until), found overdue through an index

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('alive_until', sa.Float(), nullable=False,
                                      server_default='0'))
    # Rows from before: due one lease after their last heartbeat, as they were judged.
    op.execute("UPDATE workers SET alive_until = last_heartbeat + lease_seconds")
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index('ix_workers_live_due', ['alive_until'], unique=False,
                              postgresql_where=sa.text("state IN ('idle', 'busy', 'stopping')"),
                              sqlite_where=sa.text("state IN ('idle', 'busy', 'stopping')"))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index('ix_workers_live_due')
        batch_op.drop_column('alive_until')
