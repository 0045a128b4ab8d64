"""Engine setup for the stores: SQLite by default, PostgreSQL for real deployments."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url
from sqlmodel import create_engine

from stores import schema

# Background writers (worker, SDK recorder) would rather wait out a long lock than drop a batch.
PATIENT_LOCK_SECONDS = 30.0
# With a lock timeout set, a statement may still run this long: enough for the API's searches
# and reports, short enough that a stuck query frees its connection.
STATEMENT_TIMEOUT_SECONDS = 10.0


def make_engine(
    database_url: str,
    *,
    lock_timeout_seconds: float | None = None,
    statement_timeout_seconds: float | None = None,
) -> Engine:
    """An engine for the stores. `lock_timeout_seconds` makes it fail fast instead of waiting:
    a SQLite write waits that long for the lock; PostgreSQL waits about that long to connect
    (libpq's minimum is 2 s), for a row or table lock, and for a pooled connection, and its
    statements stop after `statement_timeout_seconds` (10 s by default; 0: never). Without
    it, waits are long (SQLite 30 s) or unbounded (PostgreSQL). Lock and connection errors
    come out as sqlalchemy.exc.OperationalError."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        pool: dict[str, Any] = {}
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            if lock_timeout_seconds is not None:  # a memory database has no pool to wait for
                pool["pool_timeout"] = lock_timeout_seconds
        wait = PATIENT_LOCK_SECONDS if lock_timeout_seconds is None else lock_timeout_seconds
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": wait}, **pool
        )
        event.listen(engine, "connect", _sqlite_tuning(round(wait * 1000)))
        return engine
    if lock_timeout_seconds is None:
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    statement = (
        STATEMENT_TIMEOUT_SECONDS
        if statement_timeout_seconds is None
        else statement_timeout_seconds
    )
    options = [
        f"-c lock_timeout={round(lock_timeout_seconds * 1000)}",
        f"-c statement_timeout={round(statement * 1000)}",
    ]
    given = url.query.get("options")  # what the URL sets still applies
    options[:0] = [given] if isinstance(given, str) else list(given or ())
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        pool_timeout=lock_timeout_seconds,
        connect_args={
            "connect_timeout": max(2, math.ceil(lock_timeout_seconds)),
            "options": " ".join(options),
        },
    )


def _sqlite_tuning(busy_timeout_ms: int) -> Any:
    def tune(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the API write while the detector reads; NORMAL sync is safe with WAL.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    return tune


def create_schema(engine: Engine) -> None:
    """Create or upgrade the stores' tables to the newest schema version."""
    schema.upgrade(engine)


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
