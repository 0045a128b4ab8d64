"""The LLM call log: one row per call to the OpenAI API, whatever path it arrived by.

Cost lives in columns of the call row (a call's cost belongs to the call: one write, no join),
and `usage_rollup` sums calls, statuses, tokens and cost per minute and dimension so that the
detectors' cost-rate and budget queries read a few hundred rows, not millions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# The record types live in the SDK; importable from here for the stores' users.
from pagerloop_sdk.records import CACHE_SOURCE as CACHE_SOURCE
from pagerloop_sdk.records import CALL_SOURCES as CALL_SOURCES
from pagerloop_sdk.records import CALL_STATUSES as CALL_STATUSES
from pagerloop_sdk.records import CONTROLS_MAX as CONTROLS_MAX
from pagerloop_sdk.records import ERROR_MESSAGE_MAX as ERROR_MESSAGE_MAX
from pagerloop_sdk.records import CallRecord as CallRecord
from pagerloop_sdk.records import new_call_id as new_call_id
from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, SmallInteger, text
from sqlmodel import Field, SQLModel

from domain.usage import FLOAT_COUNTERS, USAGE_COUNTERS

# Ids and counters that add up over a lifetime outgrow PostgreSQL's 32-bit integer. SQLite's
# INTEGER is 64-bit already, and an id must stay INTEGER there to remain the rowid alias.
BIG = BigInteger().with_variant(Integer, "sqlite")


def big(default: int | None = 0, *, primary_key: bool = False) -> Any:
    return Field(default=default, sa_type=BIG, primary_key=primary_key)


def utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes and PostgreSQL aware ones: both mean UTC here."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _partial(name: str, *columns: str, where: str, using: str = "btree") -> Index:
    """An index of the rows `where` holds, on both stores (autogenerate compares the columns).
    `using="hash"`: a hash index on PostgreSQL (equality only; a B-tree on SQLite)."""
    return Index(
        name,
        *columns,
        postgresql_where=text(where),
        postgresql_using=using,
        sqlite_where=text(where),
    )


# The call log's search (stores.call_search). Ingest writes every row into every index whose
# condition the row meets, so: partial indexes, holding only the rows with the field set or the
# rare rows worth finding (calls that failed or were retried); hash indexes (a third of a
# B-tree's size) for the ids that are only ever looked up whole; sessions and users without ts
# (their B-trees deduplicate to a fraction of the size: a user's calls are few enough to sort).
# A feature's calls are many: (feature, ts) reads the newest first. Migration 0008.
SEARCH_INDEXES = (
    _partial("ix_llm_calls_request_id", "request_id", where="request_id IS NOT NULL", using="hash"),
    _partial("ix_llm_calls_trace_id", "trace_id", where="trace_id IS NOT NULL", using="hash"),
    _partial("ix_llm_calls_session_id", "session_id", where="session_id IS NOT NULL"),
    _partial("ix_llm_calls_user_hash", "user_hash", where="user_hash IS NOT NULL"),
    _partial("ix_llm_calls_feature_ts", "feature", "ts", where="feature IS NOT NULL"),
    _partial("ix_llm_calls_error_type_ts", "error_type", "ts", where="error_type IS NOT NULL"),
    _partial("ix_llm_calls_failed_ts", "ts", where="status <> 'success'"),
    _partial("ix_llm_calls_retried_ts", "ts", where="retry_count > 0"),
    _partial("ix_llm_calls_slow", "latency_ms", where="latency_ms > 8000"),
)


class LLMCall(SQLModel, table=True):
    __tablename__ = "llm_calls"
    __table_args__ = (Index("ix_llm_calls_ts", "ts"), *SEARCH_INDEXES)

    id: int | None = big(None, primary_key=True)
    call_id: str = Field(default_factory=new_call_id, max_length=32, unique=True)
    ts: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    operation: str = Field(default="chat", max_length=32)
    model: str = Field(max_length=128)
    response_model: str | None = Field(default=None, max_length=128)
    status: str = Field(max_length=16)
    http_status: int | None = None
    latency_ms: float
    ttft_ms: float | None = None
    input_tokens: int | None = big(None)
    output_tokens: int | None = big(None)
    cached_input_tokens: int | None = big(None)
    cost_usd: float | None = None
    feature: str | None = Field(default=None, max_length=128)
    team: str | None = Field(default=None, max_length=128)
    environment: str | None = Field(default=None, max_length=64)
    session_id: str | None = Field(default=None, max_length=128)
    user_hash: str | None = Field(default=None, max_length=64)
    error_type: str | None = Field(default=None, max_length=128)
    error_message: str | None = Field(default=None, max_length=ERROR_MESSAGE_MAX)
    retry_count: int = 0
    finish_reason: str | None = Field(default=None, max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    trace_id: str | None = Field(default=None, max_length=64)
    source: str = Field(default="sdk", max_length=16)
    metadata_: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JSON))
    latency_bucket: int | None = Field(default=None, sa_column=Column(SmallInteger))
    controls: str | None = Field(default=None, max_length=CONTROLS_MAX)


def _counter_columns(namespace: dict[str, Any]) -> None:
    """Declare a column per usage counter in the class body whose namespace this is."""
    annotations = namespace["__annotations__"]
    for name in USAGE_COUNTERS:
        if name in FLOAT_COUNTERS:
            annotations[name], namespace[name] = "float", 0.0
        else:
            annotations[name], namespace[name] = "int", big()


class UsageRollup(SQLModel, table=True):
    """Per minute and dimension: what the cost and traffic detectors aggregate. Calls served
    from the response cache (source "cache") are not counted here, nor in LatencyRollup."""

    __tablename__ = "usage_rollup"
    __table_args__ = (Index("ix_usage_rollup_minute", "minute"),)

    # Missing dimensions are stored as "" so that they can be part of the key.
    minute: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    model: str = Field(primary_key=True, max_length=128)
    feature: str = Field(primary_key=True, max_length=128)
    team: str = Field(primary_key=True, max_length=128)
    environment: str = Field(primary_key=True, max_length=64)
    # The usage counters (domain.usage), a column each: a 64-bit integer, or a float.
    _counter_columns(locals())


class LatencyRollup(SQLModel, table=True):
    """Per minute and dimension: how many calls fell in each latency bucket (domain.histogram)."""

    __tablename__ = "latency_rollup"
    __table_args__ = (Index("ix_latency_rollup_minute", "minute"),)

    minute: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    model: str = Field(primary_key=True, max_length=128)
    feature: str = Field(primary_key=True, max_length=128)
    team: str = Field(primary_key=True, max_length=128)
    environment: str = Field(primary_key=True, max_length=64)
    bucket: int = Field(sa_column=Column(SmallInteger, primary_key=True))
    calls: int = big()
