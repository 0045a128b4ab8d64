"""The emails already sent: one row per Message-ID, so a retried send finds its own.

SMTP cannot be asked what it already took, so the email activity keeps its own record: a
message's Message-ID is deterministic per incident and event, the activity looks it up before
it connects, and records it once the server has answered 250 to the message. A retry of an
attempt that got that far (the worker died, or its result was lost) finds the row and sends
nothing. The window left open: a crash after the server's 250 and before the row is committed
sends the message again under the same Message-ID, which receiving mail systems and clients
treat as the same message (most show it once).

Rows are tiny and few (about three per incident); retention drops them with the call log (a
send is retried for a day at most).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, Engine, select
from sqlmodel import Field, SQLModel

from stores import dialect

MESSAGE_ID_MAX = 255
INCIDENT_ID_MAX = 1000  # Temporal's default limit on workflow ids


class SentEmail(SQLModel, table=True):
    __tablename__ = "email_sent"

    message_id: str = Field(primary_key=True, max_length=MESSAGE_ID_MAX)
    incident_id: str = Field(max_length=INCIDENT_ID_MAX)
    sent_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


def was_sent(engine: Engine, message_id: str) -> bool:
    """Whether a message with this Message-ID is on record as sent."""
    table = SentEmail.__table__  # type: ignore[attr-defined]
    with engine.connect() as connection:
        found = connection.execute(
            select(table.c.message_id).where(table.c.message_id == message_id)
        ).first()
    return found is not None


def record_sent(engine: Engine, message_id: str, incident_id: str, at: datetime) -> bool:
    """Put the message on record as sent at `at` (UTC); False when it already was (the first
    record stands)."""
    table = SentEmail.__table__  # type: ignore[attr-defined]
    statement = (
        dialect.insert(engine)(table)
        .values(message_id=message_id, incident_id=incident_id, sent_at=at)
        .on_conflict_do_nothing(index_elements=[table.c.message_id])
        .returning(table.c.message_id)  # a row back: recorded now (rowcount varies by driver)
    )
    with engine.begin() as connection:
        return connection.execute(statement).first() is not None
