"""The records the SDK delivers: one per LLM call, and one per quality score of a sampled call.

They are what crosses the wire to `POST /v1/llm-calls` and what the server's stores write; the
server imports them from here, so there is one definition of a call record.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

CALL_STATUSES = ("success", "error", "timeout", "rate_limited", "server_error")
# Where a record came from: the SDK wrapper, the ingest API, OTLP spans, or the wrapper's
# response cache. A "cache" call was answered in-process and never reached OpenAI: its row stays
# in the call log (with the `cache#id` control that served it) but no rollup, detector or
# diagnosis counts it, or a cache serving during an outage would dilute the error rate.
CALL_SOURCES = ("sdk", "ingest", "otlp", "cache")
CACHE_SOURCE = "cache"
ERROR_MESSAGE_MAX = 500
CONTROLS_MAX = 200


# Call ids must be unique, not secret: a seeded generator is ten times cheaper than urandom.
_ids = random.Random(os.urandom(16))  # noqa: S311
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(16)))


def new_call_id() -> str:
    """A UUIDv7 in hex: time-ordered, so the unique index grows at its end (twice the insert
    rate of random ids on SQLite), and still unique across processes."""
    millis = time.time_ns() // 1_000_000
    rand = _ids.getrandbits(74)
    value = (millis << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62)
    return f"{value | (rand & ((1 << 62) - 1)):032x}"


@dataclass(slots=True)
class CallRecord:
    """One LLM call, as the instrumentation, the ingest API and OTLP all deliver it."""

    ts: datetime
    model: str
    status: str
    latency_ms: float
    call_id: str = field(default_factory=new_call_id)
    operation: str = "chat"
    response_model: str | None = None
    http_status: int | None = None
    ttft_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cost_usd: float | None = None
    feature: str | None = None
    team: str | None = None
    environment: str | None = None
    session_id: str | None = None
    user_hash: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    retry_count: int = 0
    finish_reason: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    source: str = "sdk"  # CALL_SOURCES; "cache" is kept out of the golden signals
    metadata: dict[str, Any] | None = None
    controls: str | None = None  # the runbook controls that changed the call: "reroute#3,..."


@dataclass(slots=True)
class ScoreRecord:
    call_id: str
    ts: datetime
    source: str
    score: float
    format_compliance: float | None = None
    hallucination_risk: float | None = None
    relevance: float | None = None
    evaluator: str | None = None
    label: str | None = None
    comment: str | None = None
    model: str | None = None
    feature: str | None = None
