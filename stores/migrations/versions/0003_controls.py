"""Runbook controls, and which control changed each call.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("llm_calls") as table:
        table.add_column(sa.Column("controls", sa.String(200)))

    op.create_table(
        "controls",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(400), nullable=False, unique=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("feature", sa.String(128)),
        sa.Column("model", sa.String(128)),
        sa.Column("value", sa.String(200), nullable=False),
        sa.Column("incident_id", sa.String(200), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        sa.Column("set_by", sa.String(128), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("expires_at"),
        _ts("reverted_at", nullable=True),
        sa.Column("reverted_by", sa.String(128)),
        sa.Column("revert_reason", sa.String(1000)),
    )
    op.create_index("ix_controls_incident_id", "controls", ["incident_id"])


def downgrade() -> None:
    op.drop_table("controls")
    with op.batch_alter_table("llm_calls") as table:
        table.drop_column("controls")
