"""The emails already sent, by Message-ID: a retried send finds its own and sends nothing.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "email_sent",
        sa.Column("message_id", sa.String(255), primary_key=True),
        sa.Column("incident_id", sa.String(1000), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("email_sent")
