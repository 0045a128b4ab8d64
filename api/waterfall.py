"""GET /v1/waterfall/{trace_id}: every call of one trace on a time axis (operator key).

`POST /v1/traces` stays the OTLP intake; this reads the calls back. The trace id is whatever
the calls carried (`trace_id` of `POST /v1/llm-calls`, the span's trace id in hex for OTLP and
the SDK): 1 to 64 characters, without NUL (422 naming `path.trace_id` otherwise). Each call
has its offset from the trace's first call, its duration, and the attributes of its span (the
GenAI semantic conventions and the seed's `llm.latency_ms` / `llm.cost_usd`). At most 1,000
calls, the first by start (`truncated` says more exist); 404 when no call carries the id; 503
when the read runs past 10 s.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.auth import Operator
from api.bounds import Storable
from api.deps import Services, services
from api.errors import OPERATOR_ERRORS, RETRY_AFTER_SECONDS
from domain.waterfall import span_attributes, waterfall
from stores.call_search import SEARCH_TIMEOUT_SECONDS, SearchTimeoutError
from stores.waterfall import TRACE_ID_MAX_LENGTH, Trace, trace_calls

router = APIRouter(
    responses={
        **OPERATOR_ERRORS,
        404: {"description": "no call in the call log carries this trace id"},
        503: {"description": "the store is unavailable, or the read ran past 10 s"},
    }
)

TraceId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=TRACE_ID_MAX_LENGTH,
        description="the trace id the calls carry (OpenTelemetry's: 32 hex digits)",
    ),
    Storable,
]


class WaterfallCallOut(BaseModel):
    call_id: str
    started_at: datetime
    offset_ms: float  # from the trace's first call
    duration_ms: float  # the call's latency
    model: str
    response_model: str | None
    operation: str
    feature: str | None
    status: str
    http_status: int | None
    error_type: str | None
    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int | None
    cost_usd: float | None
    cache_hit: bool  # answered by the SDK's response cache: nothing reached OpenAI
    retry_count: int
    request_id: str | None
    controls: str | None  # the runbook controls that changed the call
    attributes: dict[str, Any]  # the call's span attributes: gen_ai.* and the seed's llm.*


class WaterfallOut(BaseModel):
    trace_id: str
    started_at: datetime  # the first call's start
    duration_ms: float  # from the first call's start to the last call's end
    calls: list[WaterfallCallOut]  # by start
    cost_usd: float  # of the calls shown
    input_tokens: int
    output_tokens: int
    truncated: bool  # more calls carry this trace id than the 1,000 shown


def waterfall_out(trace: Trace) -> WaterfallOut:
    """The document of a trace with at least one call."""
    laid = waterfall(trace.calls)
    calls = [
        WaterfallCallOut(
            call_id=p.call.call_id,
            started_at=p.call.started_at,
            offset_ms=p.offset_ms,
            duration_ms=p.duration_ms,
            model=p.call.model,
            response_model=p.call.response_model,
            operation=p.call.operation,
            feature=p.call.feature,
            status=p.call.status,
            http_status=p.call.http_status,
            error_type=p.call.error_type,
            input_tokens=p.call.input_tokens,
            output_tokens=p.call.output_tokens,
            cached_input_tokens=p.call.cached_input_tokens,
            cost_usd=p.call.cost_usd,
            cache_hit=p.call.cache_hit,
            retry_count=p.call.retry_count,
            request_id=p.call.request_id,
            controls=p.call.controls,
            attributes=span_attributes(p.call),
        )
        for p in laid.calls
    ]
    return WaterfallOut(
        trace_id=trace.trace_id,
        started_at=laid.started_at,
        duration_ms=laid.duration_ms,
        calls=calls,
        cost_usd=round(sum(c.cost_usd or 0.0 for c in calls), 6),
        input_tokens=sum(c.input_tokens or 0 for c in calls),
        output_tokens=sum(c.output_tokens or 0 for c in calls),
        truncated=trace.truncated,
    )


# `:path`: a trace id sent by `POST /v1/llm-calls` may hold a `/` (sent as %2F).
@router.get("/v1/waterfall/{trace_id:path}", response_model=WaterfallOut)
async def get_waterfall(
    _: Operator,
    svc: Annotated[Services, Depends(services)],
    trace_id: TraceId,
) -> Any:
    """Every call of the trace, by start: offset, duration, model, status, tokens, cost and
    span attributes."""
    try:
        trace = await asyncio.to_thread(trace_calls, svc.engine, trace_id)
    except SearchTimeoutError:
        return JSONResponse(
            {"detail": f"reading the trace's calls ran past {SEARCH_TIMEOUT_SECONDS:g} s"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if not trace.calls:
        raise HTTPException(
            404,
            "no call in the call log carries this trace id (calls past retention are gone)",
        )
    return waterfall_out(trace)
