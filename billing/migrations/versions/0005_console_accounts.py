"""console accounts: operators, their web sessions, and the sign-in failure counts

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-08 09:00:00.000000

The web console (``billing web``) signs people in against ``console_users`` (argon2id
hashes, never passwords), keeps each signed-in browser as a ``console_sessions`` row
(only a SHA-256 of its token) so that signing out ends it server-side, and counts failed
sign-ins in a row per account and per address in ``console_sign_in_failures``.

"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import billing.models

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('console_users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('disabled_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('password_changed_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_console_users')),
    sa.UniqueConstraint('name', name=op.f('uq_console_users_name'))
    )
    op.create_table('console_sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=True),
    sa.Column('created_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('ended_at', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('end_reason', sa.String(length=24), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['console_users.id'], name=op.f('fk_console_sessions_user_id_console_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_console_sessions')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_console_sessions_token_hash'))
    )
    op.create_index(op.f('ix_console_sessions_user_id'), 'console_sessions', ['user_id'], unique=False)
    op.create_table('console_sign_in_failures',
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_failed_at', billing.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('locked_until', billing.models.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_console_sign_in_failures'))
    )


def downgrade() -> None:
    op.drop_table('console_sign_in_failures')
    op.drop_index(op.f('ix_console_sessions_user_id'), table_name='console_sessions')
    op.drop_table('console_sessions')
    op.drop_table('console_users')
