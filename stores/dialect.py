"""What differs between the two databases the stores run on, for the statements that differ."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite


def insert(engine: Engine) -> Any:
    """The engine's own INSERT construct: the one with `on_conflict_do_update` / `_nothing`
    (SQLite and PostgreSQL spell the upsert alike, but each in its dialect's construct)."""
    return (postgresql if engine.dialect.name == "postgresql" else sqlite).insert
