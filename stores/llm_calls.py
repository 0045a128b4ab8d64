"""The LLM call log: one row per call to the OpenAI API, whatever path it arrived by."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Engine, Index, case, func
from sqlmodel import Field, Session, SQLModel, col, select

CALL_STATUSES = ("success", "error", "timeout", "rate_limited", "server_error")


def utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes and PostgreSQL aware ones: both mean UTC here."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class LLMCall(SQLModel, table=True):
    __tablename__ = "llm_calls"
    __table_args__ = (
        Index("ix_llm_calls_ts", "ts"),
        Index("ix_llm_calls_model_ts", "model", "ts"),
        Index("ix_llm_calls_feature_ts", "feature", "ts"),
    )

    id: int | None = Field(default=None, primary_key=True)
    call_id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=64, unique=True)
    ts: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    model: str = Field(max_length=128)
    status: str = Field(max_length=16)
    latency_ms: float
    feature: str | None = Field(default=None, max_length=128)
    team: str | None = Field(default=None, max_length=128)
    environment: str | None = Field(default=None, max_length=64)
    session_id: str | None = Field(default=None, max_length=128)
    user_hash: str | None = Field(default=None, max_length=64)
    http_status: int | None = None
    ttft_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    error_type: str | None = Field(default=None, max_length=128)
    error_message: str | None = Field(default=None, max_length=2000)
    retry_count: int = 0
    request_id: str | None = Field(default=None, max_length=128)
    trace_id: str | None = Field(default=None, max_length=64)
    metadata_: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JSON))


def insert_calls(engine: Engine, calls: list[LLMCall]) -> int:
    """Insert a batch in one transaction: all rows land or none do."""
    for call in calls:
        call.ts = utc(call.ts)  # SQLite compares the stored text: one zone for every row
    with Session(engine) as session:
        session.add_all(calls)
        session.commit()
    return len(calls)


@dataclass(frozen=True)
class ErrorCounts:
    total: int
    errors: int

    @property
    def rate(self) -> float:
        return self.errors / self.total if self.total else 0.0


def error_counts(engine: Engine, start: datetime, end: datetime) -> ErrorCounts:
    """Calls and non-success calls with start <= ts < end."""
    start, end = utc(start), utc(end)
    not_ok = case((col(LLMCall.status) != "success", 1), else_=0)
    query = select(func.count(), func.coalesce(func.sum(not_ok), 0)).where(
        col(LLMCall.ts) >= start, col(LLMCall.ts) < end
    )
    with Session(engine) as session:
        total, errors = session.exec(query).one()
    return ErrorCounts(total=int(total), errors=int(errors))
