"""Alembic environment: migrations run on the connection `stores.schema.upgrade` hands over."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

# Every module defining tables, so that SQLModel.metadata is the whole schema.
import stores.controls
import stores.llm_calls
import stores.quality
import stores.silences  # noqa: F401

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through stores.schema.upgrade(engine)")

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
