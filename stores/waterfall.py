"""Every call of one trace, from the call log, in the order they started: what the request
waterfall (`GET /v1/waterfall/{trace_id}`, `pagerloop calls trace`) lays out.

The lookup reads the partial hash index on `trace_id` (migration 0008), so its cost is that of
the trace's own calls, however large the log. A trace holds at most MAX_TRACE_CALLS calls here
(the first by start; `truncated` says more exist), and the read runs under the call search's
statement timeout (SearchTimeoutError past it): an app that gives every call the same trace id
makes one huge trace, and that must not hold a connection for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from domain.waterfall import TraceCall
from stores.call_search import SEARCH_TIMEOUT_SECONDS, bounded
from stores.llm_calls import LLMCall, utc

MAX_TRACE_CALLS = 1_000
TRACE_ID_MAX_LENGTH = 64  # the column's (and ingest's) bound

_c = LLMCall.__table__.c  # type: ignore[attr-defined]
_COLUMNS = (
    "call_id",
    "latency_ms",
    "model",
    "status",
    "operation",
    "response_model",
    "feature",
    "http_status",
    "error_type",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_usd",
    "retry_count",
    "request_id",
    "finish_reason",
    "source",
    "controls",
)


@dataclass(frozen=True)
class Trace:
    trace_id: str
    calls: list[TraceCall]  # by start; empty: no call carries this trace id
    truncated: bool  # more calls carry it than `calls` holds


def _call(row: Any) -> TraceCall:
    values = {name: row._mapping[name] for name in _COLUMNS}
    return TraceCall(started_at=utc(row.ts), **values)


def trace_calls(
    engine: Engine,
    trace_id: str,
    *,
    limit: int = MAX_TRACE_CALLS,
    timeout_seconds: float = SEARCH_TIMEOUT_SECONDS,
) -> Trace:
    """The first `limit` calls of the trace by start (ties by arrival)."""
    if not 1 <= limit <= MAX_TRACE_CALLS:
        raise ValueError(f"limit: 1 to {MAX_TRACE_CALLS}")
    statement = (
        select(_c.ts, *(_c[name] for name in _COLUMNS))
        .where(_c.trace_id == trace_id)
        .order_by(_c.ts, _c.id)
        .limit(limit + 1)
    )
    with bounded(engine, timeout_seconds) as connection:
        rows = connection.execute(statement).all()
    return Trace(trace_id, [_call(row) for row in rows[:limit]], truncated=len(rows) > limit)
