"""Schema versions: alembic migrations under stores/migrations, applied at start.

Every process that opens the stores calls `upgrade(engine)`; a lock (an advisory lock on
PostgreSQL, a file lock beside a SQLite file) keeps two processes from migrating at once.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

# Tables defined outside the modules stores/migrations/env.py imports: imported here so that
# SQLModel.metadata (what the migrations are checked against) holds them wherever the stores
# are opened.
from stores import (  # noqa: F401
    email_ledger,
    incident_reports,
    instances,
    quality_baselines,
    replay_guard,
)

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_LOCK_KEY = 7_406_231_977  # any constant: "pagerloop schema"
_SQLITE_BUSY_MS = 30_000


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _patient(connection: Connection) -> None:
    """Lift, until the transaction ends, the lock and statement timeouts of an engine made to
    fail fast: a migration waits for its locks and may rewrite a large table."""
    connection.execute(text("SET LOCAL lock_timeout = 0"))
    connection.execute(text("SET LOCAL statement_timeout = 0"))


@contextlib.contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            _patient(connection)
            yield connection
            return
        # SQLite keeps its busy timeout per connection: restore it before the pool reuses it.
        (busy,) = connection.exec_driver_sql("PRAGMA busy_timeout").one()
        connection.exec_driver_sql(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
        try:
            yield connection
        finally:
            connection.exec_driver_sql(f"PRAGMA busy_timeout={int(busy)}")


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            _patient(connection)
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
                connection.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the stores to `revision` (the newest by default); a no-op when already there."""
    with _migration_lock(engine):
        if current_revision(engine) == head_revision() and revision == "head":
            return
        with _migrating(engine) as connection:
            command.upgrade(_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with _migration_lock(engine), _migrating(engine) as connection:
        command.downgrade(_config(connection), revision)
