"""The request waterfall (the seed's LLMTracer): the calls of one trace on a time axis, and the
trace links an incident's diagnosis carries.

Each call is placed by its start (the record's timestamp: when the SDK began the call, the
span's start for OTLP) and its latency; offsets count from the trace's first call. A bar is
the call's share of a fixed number of columns, at least one column wide, so that a 2 ms call
beside a 20 s one still shows where it ran.

A call's span attributes are those the SDK's span of it carries: the GenAI semantic
conventions and the seed's `llm.latency_ms` / `llm.cost_usd` beside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# The seed's own span attributes (its LLMTracer.create_llm_span), beside the GenAI ones.
LLM_LATENCY_MS = "llm.latency_ms"
LLM_COST_USD = "llm.cost_usd"
PROVIDER = "openai"
# The GenAI operation name of each call operation, as the SDK names its spans.
OPERATION_NAMES = {"chat": "chat", "responses": "chat", "embeddings": "embeddings"}
# The record source of a call the SDK's response cache answered (pagerloop_sdk.records).
CACHE_SOURCE = "cache"
BAR = "█"
TRACK = " "


@dataclass(frozen=True)
class TraceCall:
    """One call of a trace, as the call log holds it."""

    call_id: str
    started_at: datetime  # aware, UTC
    latency_ms: float
    model: str
    status: str
    operation: str = "chat"
    response_model: str | None = None
    feature: str | None = None
    http_status: int | None = None
    error_type: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cost_usd: float | None = None
    retry_count: int = 0
    request_id: str | None = None
    finish_reason: str | None = None
    source: str = "sdk"
    controls: str | None = None

    @property
    def cache_hit(self) -> bool:
        return self.source == CACHE_SOURCE


@dataclass(frozen=True)
class Placed:
    call: TraceCall
    offset_ms: float  # from the trace's first call
    duration_ms: float


@dataclass(frozen=True)
class Waterfall:
    started_at: datetime  # the first call's start
    duration_ms: float  # from the first call's start to the last call's end
    calls: list[Placed]  # by start


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def waterfall(calls: Sequence[TraceCall]) -> Waterfall:
    """The calls on one time axis, ordered by start (ties: as given). ValueError when empty."""
    if not calls:
        raise ValueError("a waterfall needs at least one call")
    ordered = sorted(calls, key=lambda c: c.started_at)
    first = ordered[0].started_at
    placed = [
        Placed(c, _ms((c.started_at - first).total_seconds()), max(c.latency_ms, 0.0))
        for c in ordered
    ]
    end = max(p.offset_ms + p.duration_ms for p in placed)
    return Waterfall(first, round(end, 3), placed)


def bar(offset_ms: float, duration_ms: float, total_ms: float, width: int) -> tuple[int, int]:
    """(first column, columns) of a call's bar in `width` columns spanning `total_ms`: at least
    one column, never past the last."""
    if width < 1:
        raise ValueError("width: at least 1 column")
    if total_ms <= 0:
        return 0, 1
    scale = width / total_ms
    start = min(max(math.floor(offset_ms * scale), 0), width - 1)
    end = min(math.ceil((offset_ms + max(duration_ms, 0.0)) * scale), width)
    return start, max(end - start, 1)


def draw(start: int, columns: int, width: int) -> str:
    """The bar as text, `width` characters."""
    return (TRACK * start + BAR * columns).ljust(width, TRACK)[:width]


def span_attributes(call: TraceCall) -> dict[str, Any]:
    """The attributes of the call's span as the SDK sets them (pagerloop_sdk.telemetry)."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATION_NAMES.get(call.operation, call.operation),
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": call.model,
    }
    if call.response_model:
        attributes["gen_ai.response.model"] = call.response_model
    if call.request_id:
        attributes["gen_ai.response.id"] = call.request_id
    if call.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [call.finish_reason]
    if call.input_tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = call.input_tokens
    if call.output_tokens is not None:
        attributes["gen_ai.usage.output_tokens"] = call.output_tokens
    if call.cached_input_tokens:
        attributes["gen_ai.usage.cache_read.input_tokens"] = call.cached_input_tokens
    if call.status != "success":
        attributes["error.type"] = call.error_type or call.status
    attributes[LLM_LATENCY_MS] = call.latency_ms
    if call.cost_usd is not None:
        attributes[LLM_COST_USD] = call.cost_usd
    return attributes


# --- the trace links of an incident's diagnosis -------------------------------------------------

TRACES_IN_DIAGNOSIS = 3


@dataclass
class TracedCall:
    """One of the worst calls a diagnosis query found, with the trace it belongs to."""

    trace_id: str
    why: str  # slowest | failed | rate_limited | costliest | lowest_quality
    model: str = ""
    status: str = ""
    latency_ms: float = 0.0
    cost_usd: float | None = None
    url: str = ""  # its waterfall over HTTP, when the API's public URL is known


def worst_traces(found: Sequence[TracedCall], most: int = TRACES_IN_DIAGNOSIS) -> list[TracedCall]:
    """The first `most` calls of distinct traces, in the order found (each query ranks its
    worst first, and a runbook asks its most telling query first)."""
    seen: set[str] = set()
    picked: list[TracedCall] = []
    for call in found:
        if call.trace_id and call.trace_id not in seen:
            seen.add(call.trace_id)
            picked.append(call)
            if len(picked) == most:
                break
    return picked


def _why(call: TracedCall) -> str:
    what = call.why.replace("_", " ")
    if call.why == "costliest" and call.cost_usd is not None:
        return f"{what}: {call.model}, ${call.cost_usd:.4f}"
    detail = f"{call.status}, " if call.status and call.status != "success" else ""
    return f"{what}: {call.model}, {detail}{call.latency_ms:,.0f} ms"


def traces_finding(traces: Sequence[TracedCall]) -> str | None:
    """The diagnosis line that links the worst calls' traces; None without any."""
    if not traces:
        return None
    shown = []
    for call in traces:
        link = f" {call.url}" if call.url else ""
        shown.append(f"{call.trace_id} ({_why(call)}){link}")
    return (
        "traces of the worst calls (`pagerloop calls trace TRACE_ID` shows the waterfall): "
        + "; ".join(shown)
    )
