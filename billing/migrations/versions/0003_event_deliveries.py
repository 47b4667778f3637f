"""event deliveries: one delivery state per (event, endpoint), and the endpoints seen

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:41:07.512230

Upgrade copies each event's delivery state (the single endpoint's, kept on ``events``
until now) into an ``event_deliveries`` row for the ``default`` endpoint, so nothing
already delivered is posted again and nothing pending is lost. Downgrade copies the
``default`` rows back onto ``events``; other endpoints' states go with their table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import billing.models

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

#: The delivery columns both tables share (``events.endpoint`` is ``event_deliveries.url``).
_SHARED = (
    'status', 'next_attempt_at', 'attempts', 'claimed_until', 'claimed_by', 'last_attempt_at',
    'last_status', 'last_error', 'delivered_at', 'dead_at', 'redelivered_at', 'redelivered_by',
)


def upgrade() -> None:
    op.create_table('webhook_endpoints',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('url', sa.String(length=255), nullable=False),
    sa.Column('events', sa.JSON(), nullable=False),
    sa.Column('first_seen_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('removed_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_webhook_endpoints'))
    )
    op.create_table('event_deliveries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('event_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('endpoint', sa.String(length=64), nullable=False),
    sa.Column('subscription_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('next_attempt_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('claimed_until', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('last_attempt_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('url', sa.String(length=255), nullable=True),
    sa.Column('delivered_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('dead_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('redelivered_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('redelivered_by', sa.String(length=128), nullable=True),
    sa.ForeignKeyConstraint(['event_id'], ['events.id'], name=op.f('fk_event_deliveries_event_id_events')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_event_deliveries')),
    sa.UniqueConstraint('event_id', 'endpoint', name=op.f('uq_event_deliveries_event_id_endpoint'))
    )
    with op.batch_alter_table('event_deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_event_deliveries_due', ['endpoint', 'status', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_event_deliveries_order', ['endpoint', 'subscription_id', 'event_id'], unique=False)

    shared = ', '.join(_SHARED)
    op.execute(
        f"INSERT INTO event_deliveries (event_id, endpoint, subscription_id, url, {shared}) "
        f"SELECT id, 'default', subscription_id, endpoint, {shared} FROM events ORDER BY id"
    )


def downgrade() -> None:
    # One correlated subquery per column: the same SQL on PostgreSQL and SQLite.
    pairs = [*((column, column) for column in _SHARED), ('endpoint', 'url')]
    sets = ', '.join(
        f"{target} = (SELECT d.{source} FROM event_deliveries d "
        f"WHERE d.event_id = events.id AND d.endpoint = 'default')"
        for target, source in pairs
    )
    op.execute(
        f"UPDATE events SET {sets} WHERE EXISTS (SELECT 1 FROM event_deliveries d "
        "WHERE d.event_id = events.id AND d.endpoint = 'default')"
    )
    with op.batch_alter_table('event_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_event_deliveries_order')
        batch_op.drop_index('ix_event_deliveries_due')

    op.drop_table('event_deliveries')
    op.drop_table('webhook_endpoints')
