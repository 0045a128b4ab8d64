"""The share of its target's traffic a control applies to (a canary); NULL: all of it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("controls") as batch:
        batch.add_column(sa.Column("fraction", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("controls") as batch:
        batch.drop_column("fraction")
