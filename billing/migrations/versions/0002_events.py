"""events: the transactional outbox of webhooks to the shop

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 13:22:54.263498
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import billing.models

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('event_id', sa.String(length=36), nullable=False),
    sa.Column('type', sa.String(length=40), nullable=False),
    sa.Column('subscription_id', sa.Integer(), nullable=True),
    sa.Column('external_ref', sa.String(length=128), nullable=True),
    sa.Column('charge_id', sa.Integer(), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('created_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('next_attempt_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('claimed_until', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('last_attempt_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('endpoint', sa.String(length=255), nullable=True),
    sa.Column('delivered_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('dead_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('redelivered_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('redelivered_by', sa.String(length=128), nullable=True),
    sa.ForeignKeyConstraint(['charge_id'], ['charges.id'], name=op.f('fk_events_charge_id_charges')),
    sa.ForeignKeyConstraint(['subscription_id'], ['subscriptions.id'], name=op.f('fk_events_subscription_id_subscriptions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events')),
    sa.UniqueConstraint('event_id', name=op.f('uq_events_event_id'))
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_due', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_external_ref'), ['external_ref'], unique=False)
        batch_op.create_index('ix_events_subscription_order', ['subscription_id', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_type'), ['type'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_type'))
        batch_op.drop_index('ix_events_subscription_order')
        batch_op.drop_index(batch_op.f('ix_events_external_ref'))
        batch_op.drop_index('ix_events_due')

    op.drop_table('events')
