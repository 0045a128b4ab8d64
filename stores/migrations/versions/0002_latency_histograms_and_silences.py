"""Latency histograms per minute, quality sums per hour (percentiles and drift baselines from
rollups), and silences.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False, primary_key: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, primary_key=primary_key)


def upgrade() -> None:
    with op.batch_alter_table("llm_calls") as table:
        table.add_column(sa.Column("latency_bucket", sa.SmallInteger))

    op.create_table(
        "latency_rollup",
        _ts("minute", primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("feature", sa.String(128), primary_key=True),
        sa.Column("team", sa.String(128), primary_key=True),
        sa.Column("environment", sa.String(64), primary_key=True),
        sa.Column("bucket", sa.SmallInteger, primary_key=True),
        sa.Column("calls", sa.Integer, nullable=False),
    )
    op.create_index("ix_latency_rollup_minute", "latency_rollup", ["minute"])

    op.create_table(
        "quality_rollup",
        _ts("hour", primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("feature", sa.String(128), primary_key=True),
        sa.Column("scores", sa.Integer, nullable=False),
        sa.Column("score_sum", sa.Float, nullable=False),
        sa.Column("score_sumsq", sa.Float, nullable=False),
    )
    op.create_index("ix_quality_rollup_hour", "quality_rollup", ["hour"])

    op.create_table(
        "silences",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("trigger", sa.String(64)),
        sa.Column("scope", sa.String(160)),
        _ts("starts_at"),
        _ts("ends_at"),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        _ts("created_at"),
        _ts("expired_at", nullable=True),
    )
    op.create_index("ix_silences_ends_at", "silences", ["ends_at"])


def downgrade() -> None:
    op.drop_table("silences")
    op.drop_table("quality_rollup")
    op.drop_table("latency_rollup")
    with op.batch_alter_table("llm_calls") as table:
        table.drop_column("latency_bucket")
