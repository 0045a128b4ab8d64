"""POST /v1/llm-calls: LLM call records from any language, validated as one batch.

Ingest is idempotent on `call_id`: a batch sent again (a client retrying after a timeout)
is accepted and writes nothing twice; the answer says how many of its calls were already
recorded. A call without a `call_id` gets a new one, so a client that wants its retries to be
safe sends one (the pagerloop SDK always does).

The body may be gzipped (`Content-Encoding: gzip`, as the SDK sends it); it is refused once it
inflates past the ingest body limit. A call may carry the SDK's quality verdict (`quality`),
recorded in the quality store with the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pagerloop_sdk.pricing import PriceTable
from pagerloop_sdk.privacy import hash_user_id
from pagerloop_sdk.recorder import count_unpriced
from pydantic import BaseModel, ConfigDict, Field

from api.auth import require_ingest_key
from api.bodies import JsonBody
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
from api.deps import Services, services
from api.errors import INGEST_ERRORS
from api.otlp_limits import ExportRefusedError, inflate
from api.telemetry import INGESTED_CALLS
from stores.llm_calls import CONTROLS_MAX, ERROR_MESSAGE_MAX, CallRecord, write_calls
from stores.quality import SCORER, ScoreRecord, write_scores

router = APIRouter()

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


BATCH = JsonBody[CallBatch]("CallBatch", CallBatch)


class IngestResult(BaseModel):
    accepted: int  # the calls of the batch, all recorded now
    duplicates: int = 0  # of which were already recorded (a retried batch): not written again


def to_record(call: CallIn, salt: str, prices: PriceTable, received_at: datetime) -> CallRecord:
    """The stored record; the same function serves JSON ingest and OTLP."""
    cost = call.cost_usd
    if cost is None and call.input_tokens is not None:
        cost = prices.cost_usd(
            call.response_model or call.model,
            call.input_tokens,
            call.output_tokens or 0,
            call.cached_input_tokens or 0,
        )
        if cost is None:
            count_unpriced(call.response_model or call.model)
    message = call.error_message
    record = CallRecord(
        ts=(call.timestamp or received_at).astimezone(UTC),
        operation=call.operation,
        model=call.model,
        response_model=call.response_model,
        status=call.status,
        http_status=call.http_status,
        latency_ms=call.latency_ms,
        ttft_ms=call.ttft_ms,
        input_tokens=call.input_tokens,
        output_tokens=call.output_tokens,
        cached_input_tokens=call.cached_input_tokens,
        cost_usd=cost,
        feature=call.feature,
        team=call.team,
        environment=call.environment,
        session_id=call.session_id,
        user_hash=hash_user_id(call.user, salt) if call.user else None,
        error_type=call.error_type,
        error_message=message[:ERROR_MESSAGE_MAX] if message is not None else None,
        retry_count=call.retry_count,
        finish_reason=call.finish_reason,
        request_id=call.request_id,
        trace_id=call.trace_id,
        source=call.source,
        metadata=call.metadata,
        controls=call.controls,
    )
    if call.call_id:
        record.call_id = call.call_id
    return record


def score_of(call: CallIn, record: CallRecord) -> ScoreRecord | None:
    verdict = call.quality
    if verdict is None:
        return None
    return ScoreRecord(
        call_id=record.call_id,
        ts=record.ts,
        source=SCORER,
        score=verdict.score,
        format_compliance=verdict.format_compliance,
        hallucination_risk=verdict.hallucination_risk,
        relevance=verdict.relevance,
        model=record.response_model or record.model,
        feature=record.feature,
    )


async def store_records(
    svc: Services, records: list[CallRecord], endpoint: str, scores: Sequence[ScoreRecord] = ()
) -> int:
    """Write the records whose call_id is not recorded yet (and their scorer verdicts, once
    per call too); how many were already recorded."""
    inserted = await asyncio.to_thread(write_calls, svc.engine, records)
    if scores:
        await asyncio.to_thread(write_scores, svc.engine, scores)
    INGESTED_CALLS.labels(endpoint).inc(inserted)
    return len(records) - inserted


def _refuse_repeated_call_ids(batch: CallBatch) -> None:
    """A call_id twice in one batch is the batch's own mistake (422), not a retry."""
    seen: set[str] = set()
    for index, call in enumerate(batch.calls):
        if call.call_id is None:
            continue
        if call.call_id in seen:
            raise RequestValidationError(
                [
                    {
                        "loc": ("body", "calls", index, "call_id"),
                        "msg": "this call_id is already in this batch",
                        "type": "value_error",
                    }
                ]
            )
        seen.add(call.call_id)


@router.post(
    "/v1/llm-calls",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_ingest_key)],
    openapi_extra=BATCH.openapi,
    responses=INGEST_ERRORS,
)
async def ingest_calls(
    request: Request, svc: Annotated[Services, Depends(services)]
) -> IngestResult:
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        limit = svc.settings.ingest_max_body_bytes
        try:
            raw = await asyncio.to_thread(inflate, await request.body(), encoding, limit)
        except ExportRefusedError as exc:
            raise HTTPException(exc.status, exc.message) from None
        batch = await BATCH.parse_bytes(raw)
    else:
        batch = await BATCH.parse(request)
    _refuse_repeated_call_ids(batch)
    salt = svc.settings.user_hash_salt.get_secret_value()
    now = datetime.now(UTC)
    records = [to_record(call, salt, svc.prices, now) for call in batch.calls]
    scores = [
        score
        for call, record in zip(batch.calls, records, strict=True)
        if (score := score_of(call, record)) is not None
    ]
    duplicates = await store_records(svc, records, "llm-calls", scores)
    return IngestResult(accepted=len(records), duplicates=duplicates)
