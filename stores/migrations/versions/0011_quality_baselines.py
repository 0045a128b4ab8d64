"""Quality baselines set by hand, one per feature (`pagerloop quality baseline set`): the drift
rule reads them instead of the rolling 7 days until they are cleared.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quality_baselines",
        sa.Column("feature", sa.String(128), primary_key=True),
        sa.Column("mean", sa.Float, nullable=False),
        sa.Column("stddev", sa.Float, nullable=False),
        sa.Column("scores", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("set_by", sa.String(128), nullable=False),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quality_baselines")
