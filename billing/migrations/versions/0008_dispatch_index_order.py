"""the dispatch index holds the dispatch's whole order: state, next_attempt_at, id

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 15:45:00.000000

A dispatch takes the first due pending charges by ``next_attempt_at`` then ``id``. Every
charge a sweep creates shares one ``next_attempt_at``, so with only (state,
next_attempt_at) indexed PostgreSQL sorted all the waiting charges on each dispatch
(43 ms at 100,000, a refill every few charges: the whole machine). With ``id`` in the
index the first rows in index order are the answer.
"""

from __future__ import annotations

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_charges_dispatch', table_name='charges')
    op.create_index('ix_charges_dispatch', 'charges', ['state', 'next_attempt_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_charges_dispatch', table_name='charges')
    op.create_index('ix_charges_dispatch', 'charges', ['state', 'next_attempt_at'])
