"""The call log, quality scores and the per-minute usage rollup.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, primary_key: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, primary_key=primary_key)


def upgrade() -> None:
    op.create_table(
        "llm_calls",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("call_id", sa.String(32), nullable=False, unique=True),
        _ts("ts"),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("response_model", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("ttft_ms", sa.Float),
        sa.Column("input_tokens", sa.Integer),
        sa.Column("output_tokens", sa.Integer),
        sa.Column("cached_input_tokens", sa.Integer),
        sa.Column("cost_usd", sa.Float),
        sa.Column("feature", sa.String(128)),
        sa.Column("team", sa.String(128)),
        sa.Column("environment", sa.String(64)),
        sa.Column("session_id", sa.String(128)),
        sa.Column("user_hash", sa.String(64)),
        sa.Column("error_type", sa.String(128)),
        sa.Column("error_message", sa.String(500)),
        sa.Column("retry_count", sa.Integer, nullable=False),
        sa.Column("finish_reason", sa.String(64)),
        sa.Column("request_id", sa.String(128)),
        sa.Column("trace_id", sa.String(64)),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("metadata", sa.JSON),
    )
    # Scoped questions (per model, per feature) go to usage_rollup; raw rows are only read by
    # time window (an index on random request ids would halve the insert rate).
    op.create_index("ix_llm_calls_ts", "llm_calls", ["ts"])

    op.create_table(
        "quality_scores",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("call_id", sa.String(128), nullable=False),
        _ts("ts"),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("format_compliance", sa.Float),
        sa.Column("hallucination_risk", sa.Float),
        sa.Column("relevance", sa.Float),
        sa.Column("evaluator", sa.String(128)),
        sa.Column("label", sa.String(64)),
        sa.Column("comment", sa.String(1000)),
        sa.Column("model", sa.String(128)),
        sa.Column("feature", sa.String(128)),
    )
    op.create_index("ix_quality_scores_ts", "quality_scores", ["ts"])
    op.create_index("ix_quality_scores_call_id", "quality_scores", ["call_id"])
    op.create_index("ix_quality_scores_model_ts", "quality_scores", ["model", "ts"])

    op.create_table(
        "usage_rollup",
        _ts("minute", primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("feature", sa.String(128), primary_key=True),
        sa.Column("team", sa.String(128), primary_key=True),
        sa.Column("environment", sa.String(64), primary_key=True),
        *(
            sa.Column(name, sa.Integer, nullable=False)
            for name in (
                "calls",
                "successes",
                "errors",
                "timeouts",
                "rate_limited",
                "server_errors",
                "input_tokens",
                "output_tokens",
                "cached_input_tokens",
                "unpriced_calls",
            )
        ),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("latency_ms_sum", sa.Float, nullable=False),
    )
    op.create_index("ix_usage_rollup_minute", "usage_rollup", ["minute"])


def downgrade() -> None:
    op.drop_table("usage_rollup")
    op.drop_table("quality_scores")
    op.drop_table("llm_calls")
