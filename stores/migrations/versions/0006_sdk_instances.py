"""The app instances polling GET /v1/controls, for their shares of app-wide limits.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sdk_instances",
        sa.Column("instance_id", sa.String(128), primary_key=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sdk_instances_last_seen", "sdk_instances", ["last_seen"])


def downgrade() -> None:
    op.drop_table("sdk_instances")
