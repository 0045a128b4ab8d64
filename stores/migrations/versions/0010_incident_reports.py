"""Incident reports: each incident's report as written at resolve (Markdown, the Slack
summary and the figures), so it outlives the call log it was computed from.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incident_reports",
        sa.Column("incident_id", sa.String(1000), primary_key=True),
        sa.Column("markdown", sa.Text, nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("figures", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("incident_reports")
