"""subscription changes: plans and prices from a coming period, re-anchoring

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00.000000

- ``subscription_changes``: a plan or price a subscription moves to from a coming period,
  applied by the sweep when it creates the first charge due at or after ``effective_at``.
- ``subscriptions.anchor_period``: the period ``anchor_at`` is the due date of (0 for every
  existing subscription). A change of the plan's interval re-anchors a subscription on the
  first period of its new plan, without renumbering the periods charged before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import billing.models

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('subscriptions') as batch:
        batch.add_column(
            sa.Column('anchor_period', sa.Integer(), server_default='0', nullable=False)
        )
    op.create_table('subscription_changes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subscription_id', sa.Integer(), nullable=False),
    sa.Column('plan', sa.String(length=64), nullable=False),
    sa.Column('amount_override', sa.Numeric(precision=12, scale=2), nullable=True),
    sa.Column('effective_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('applied_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('applied_period', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(
        ['subscription_id'], ['subscriptions.id'],
        name=op.f('fk_subscription_changes_subscription_id_subscriptions'),
    ),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscription_changes')),
    )
    op.create_index(
        'ix_subscription_changes_pending', 'subscription_changes',
        ['subscription_id', 'applied_at'],
    )


def downgrade() -> None:
    op.drop_index('ix_subscription_changes_pending', table_name='subscription_changes')
    op.drop_table('subscription_changes')
    with op.batch_alter_table('subscriptions') as batch:
        batch.drop_column('anchor_period')
