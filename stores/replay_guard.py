"""Signed requests already used: one row per request key, shared by every API replica.

A signed webhook (a Slack interaction) stays valid for a few minutes after it is signed, so
anyone who captures one could send it again. The API records each one's key here, and a key
already on record and not expired is a replay. Because the table lives in the stores, a replay
is refused by any replica and after a restart, not only by the process that saw it first.

Taking a key is one statement, `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE expired
RETURNING key`: a new key, or one whose row has expired, is taken (a row comes back); a live
key changes nothing and returns nothing, which is the replay. Expired rows are deleted in
passing, at most once a minute per process (`take`), and by `prune`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import Column, DateTime, Engine, Index, delete
from sqlmodel import Field, SQLModel, col

from stores import dialect
from stores.pruning import Pruner

KEY_LENGTH = 64  # a SHA-256 hex digest


class SeenRequest(SQLModel, table=True):
    __tablename__ = "seen_requests"
    __table_args__ = (Index("ix_seen_requests_expires_at", "expires_at"),)

    key: str = Field(primary_key=True, max_length=KEY_LENGTH)
    # Until then the request's signature is still accepted, so its key must stay on record.
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


def request_key(source: str, signature: str) -> str:
    """The key of a signed request: a fixed-size digest of where it came from and its
    signature (the signature already covers the body and the timestamp)."""
    return hashlib.sha256(f"{source}\n{signature}".encode()).hexdigest()


def first_use(engine: Engine, key: str, now: datetime, expires_at: datetime) -> bool:
    """Record `key` until `expires_at`; False when it is already on record and not expired at
    `now` (a replay). Times are UTC."""
    table = SeenRequest.__table__  # type: ignore[attr-defined]
    statement = dialect.insert(engine)(table).values(key=key, expires_at=expires_at)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.key],
        set_={"expires_at": statement.excluded.expires_at},
        where=table.c.expires_at <= now,
    ).returning(table.c.key)  # a row back: taken (rowcount is not reliable on every driver)
    with engine.begin() as connection:
        return connection.execute(statement).first() is not None


def prune(engine: Engine, now: datetime) -> int:
    """Delete the rows expired at `now`; returns how many."""
    with engine.begin() as connection:
        statement = delete(SeenRequest).where(col(SeenRequest.expires_at) <= now)
        return int(connection.execute(statement).rowcount)


_pruner = Pruner(prune, "expired request keys")


def take(engine: Engine, key: str, now: datetime, expires_at: datetime) -> bool:
    """`first_use`, then, at most once every PRUNE_EVERY_SECONDS per process and store, a
    prune of the expired rows (whose failure only postpones it: the answer stands)."""
    fresh = first_use(engine, key, now, expires_at)
    _pruner.in_passing(engine, now)
    return fresh
