"""charge lifecycle: a review flag, one attempt counter for every call, wider outcomes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 09:30:00.000000

- ``charges.review``: why a person must look at a charge whatever its state (a late
  approval, a possible double charge, an amount that differs from what was asked, a TX
  another charge holds), comma-separated; and an index on ``charges.tx`` to find the last.
- ``charges.attempts`` now counts every gateway call of the charge, settlement calls
  included, so that the current attempt is the one numbered ``attempts``: an answer
  carrying another number is late. Upgrade renumbers each charge's attempts in the order
  they were made and sets the counter to the last one.
- ``ledger.outcome`` widens from 24 to 40 characters (``resolved_validate_declined``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('charges') as batch:
        batch.add_column(sa.Column('review', sa.String(length=128), nullable=True))
        batch.create_index('ix_charges_review', ['review'])
        batch.create_index('ix_charges_tx', ['tx'])
    with op.batch_alter_table('ledger') as batch:
        batch.alter_column(
            'outcome', existing_type=sa.String(length=24), type_=sa.String(length=40),
            existing_nullable=False,
        )
    # Number every charge's attempts 1, 2, 3... in the order they were made (settlement
    # calls used to be numbered apart, and could share a number with a duplicate.pl call),
    # then make the charge's counter its last attempt's number.
    op.execute(
        "UPDATE attempts SET number = (SELECT count(*) FROM attempts AS earlier"
        " WHERE earlier.charge_id = attempts.charge_id AND earlier.id <= attempts.id)"
    )
    op.execute(
        "UPDATE charges SET attempts = (SELECT max(number) FROM attempts"
        " WHERE attempts.charge_id = charges.id)"
        " WHERE EXISTS (SELECT 1 FROM attempts WHERE attempts.charge_id = charges.id)"
    )


def downgrade() -> None:
    op.execute(
        "UPDATE charges SET attempts = (SELECT count(*) FROM attempts"
        " WHERE attempts.charge_id = charges.id AND attempts.operation = 'duplicate')"
    )
    with op.batch_alter_table('ledger') as batch:
        batch.alter_column(
            'outcome', existing_type=sa.String(length=40), type_=sa.String(length=24),
            existing_nullable=False,
        )
    with op.batch_alter_table('charges') as batch:
        batch.drop_index('ix_charges_tx')
        batch.drop_index('ix_charges_review')
        batch.drop_column('review')
