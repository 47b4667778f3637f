"""dead letters say who gave up on them: a task that raised, or a broker's delivery limit

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 12:00:00.000000

- ``dead_letters.source``: ``task`` for every existing letter (a task that raised);
  ``redis`` or ``rabbitmq`` for a poison message given up on after the delivery limit.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('dead_letters') as batch:
        batch.add_column(
            sa.Column('source', sa.String(length=32), server_default='task', nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table('dead_letters') as batch:
        batch.drop_column('source')
