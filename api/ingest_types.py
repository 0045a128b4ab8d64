"""The call record as `POST /v1/llm-calls` takes it, one model per call: every field bounded
(api/bounds.py, README "Limits"). OTLP spans are validated into it too."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.bounds import (
    MAX_CALLS_PER_BATCH,
    MAX_COST_USD,
    MAX_LATENCY_MS,
    MAX_RETRIES,
    MAX_TOKENS,
    ErrorMessage,
    Metadata,
    RecentTimestamp,
    Text64,
    Text128,
    Text256,
)
from stores.llm_calls import CONTROLS_MAX

CallId = Annotated[str, Field(min_length=8, max_length=32, pattern=r"^[0-9a-f]+$")]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class QualityIn(BaseModel):
    """The SDK scorer's verdict on a sampled call (0 bad .. 1 good)."""

    model_config = ConfigDict(extra="forbid")

    score: Fraction
    format_compliance: Fraction | None = None
    hallucination_risk: Fraction | None = None
    relevance: Fraction | None = None


class CallIn(BaseModel):
    """One call as other languages send it (the contract's `/v1/llm-calls` record); every
    field bounded (api/bounds.py, README "Limits")."""

    model_config = ConfigDict(extra="forbid")

    model: Text128
    status: Literal["success", "error", "timeout", "rate_limited", "server_error"]
    latency_ms: float = Field(ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False)
    timestamp: RecentTimestamp | None = None
    call_id: CallId | None = None
    operation: Literal["chat", "responses", "embeddings"] = "chat"
    response_model: Text128 | None = None
    feature: Text128 | None = None
    team: Text128 | None = None
    environment: Text64 | None = None
    session_id: Text128 | None = None
    user: Text256 | None = None
    http_status: int | None = Field(default=None, ge=100, le=599)
    ttft_ms: float | None = Field(default=None, ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False)
    input_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    output_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    cached_input_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    cost_usd: float | None = Field(default=None, ge=0, le=MAX_COST_USD, allow_inf_nan=False)
    error_type: Text128 | None = None
    error_message: ErrorMessage | None = None
    retry_count: int = Field(default=0, ge=0, le=MAX_RETRIES)
    finish_reason: Text64 | None = None
    request_id: Text128 | None = None
    trace_id: Text64 | None = None
    metadata: Metadata | None = None
    # Sent by the pagerloop SDK: the controls that changed the call ("kind#id,..."), whether
    # its response cache answered it ("cache": kept out of the golden signals), its verdict.
    controls: Annotated[str, Field(min_length=1, max_length=CONTROLS_MAX)] | None = None
    source: Literal["ingest", "sdk", "cache"] = "ingest"
    quality: QualityIn | None = None


class CallBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # fail_fast: a body of a million empty objects is refused at the first, not after
    # building a million errors (seconds holding the GIL, and the event loop with it).
    calls: list[CallIn] = Field(min_length=1, max_length=MAX_CALLS_PER_BATCH, fail_fast=True)
