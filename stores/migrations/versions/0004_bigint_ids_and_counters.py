"""64-bit ids and counters on PostgreSQL: its integer caps an id, or a minute's token sum, at
2^31 - 1. SQLite's INTEGER is 64-bit already, so there is nothing to change there (and an id
must stay INTEGER PRIMARY KEY, the rowid alias).

Each table is altered in one statement, so PostgreSQL rewrites it once, not once per column;
the serial sequences are widened too, or they would still stop at 2^31 - 1.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS: dict[str, tuple[str, ...]] = {
    "llm_calls": ("id", "input_tokens", "output_tokens", "cached_input_tokens"),
    "quality_scores": ("id",),
    "silences": ("id",),
    "controls": ("id",),
    "usage_rollup": (
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
    ),
    "latency_rollup": ("calls",),
    "quality_rollup": ("scores",),
}


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    bind = op.get_bind()
    for table, columns in COLUMNS.items():
        changes = ", ".join(f"ALTER COLUMN {column} TYPE bigint" for column in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
        if "id" in columns:
            sequence = bind.execute(
                sa.text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table}
            ).scalar_one()
            op.execute(f"ALTER SEQUENCE {sequence} AS bigint")


def downgrade() -> None:
    # The columns stay 64-bit: narrowing them fails once a value is past 2^31 - 1, and the code
    # of revision 0003 reads and writes bigint columns as well.
    pass
