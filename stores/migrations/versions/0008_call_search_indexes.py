"""Indexes for searching the call log (`GET /v1/calls`, `pagerloop calls search`).

Lookups by request, trace, session and user, a feature's calls, calls of an error type, the
calls that failed or were retried, newest first, and the slow calls (over 8 s). Partial
indexes hold only the rows with the field set, or the rare rows (failed, retried, slow), so
that ingest pays little for the rows they leave out (most calls succeed, fast, at once).

On PostgreSQL each index is built under the table's SHARE lock (writes wait, reads do not):
about 1-3 s per million rows each on a 2-core machine; see bench/p9_call_search.py.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# name, columns, the rows it holds, the index method on PostgreSQL (SQLite: a B-tree)
INDEXES: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("ix_llm_calls_request_id", ("request_id",), "request_id IS NOT NULL", "hash"),
    ("ix_llm_calls_trace_id", ("trace_id",), "trace_id IS NOT NULL", "hash"),
    ("ix_llm_calls_session_id", ("session_id",), "session_id IS NOT NULL", "btree"),
    ("ix_llm_calls_user_hash", ("user_hash",), "user_hash IS NOT NULL", "btree"),
    ("ix_llm_calls_feature_ts", ("feature", "ts"), "feature IS NOT NULL", "btree"),
    ("ix_llm_calls_error_type_ts", ("error_type", "ts"), "error_type IS NOT NULL", "btree"),
    ("ix_llm_calls_failed_ts", ("ts",), "status <> 'success'", "btree"),
    ("ix_llm_calls_retried_ts", ("ts",), "retry_count > 0", "btree"),
    # Slow calls, past the seed's p95 warning: `latency_ms:>60000` finds the few or none at once.
    ("ix_llm_calls_slow", ("latency_ms",), "latency_ms > 8000", "btree"),
)


def upgrade() -> None:
    for name, columns, where, using in INDEXES:
        op.create_index(
            name,
            "llm_calls",
            list(columns),
            postgresql_where=sa.text(where),
            postgresql_using=using,
            sqlite_where=sa.text(where),
        )


def downgrade() -> None:
    for name, *_ in reversed(INDEXES):
        op.drop_index(name, table_name="llm_calls")
