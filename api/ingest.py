"""POST /v1/llm-calls: LLM call records from any language, validated as one batch."""

from __future__ import annotations

import asyncio
import hmac
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from api.deps import Services, services
from api.telemetry import INGESTED_CALLS, REJECTED_REQUESTS
from instrumentation.pricing import PriceTable
from instrumentation.privacy import hash_user_id
from instrumentation.recorder import UNPRICED
from stores.llm_calls import ERROR_MESSAGE_MAX, CallRecord, write_calls

router = APIRouter()

MAX_CALLS_PER_BATCH = 10_000

Short = Annotated[str, Field(min_length=1, max_length=128)]
CallId = Annotated[str, Field(min_length=8, max_length=32, pattern=r"^[0-9a-f]+$")]


class CallIn(BaseModel):
    """One call as other languages send it (the contract's `/v1/llm-calls` record)."""

    model_config = ConfigDict(extra="forbid")

    model: Short
    status: Literal["success", "error", "timeout", "rate_limited", "server_error"]
    latency_ms: float = Field(ge=0)
    timestamp: AwareDatetime | None = None
    call_id: Annotated[str, Field(min_length=8, max_length=32, pattern=r"^[0-9a-f]+$")] | None = (
        None
    )
    operation: Literal["chat", "responses", "embeddings"] = "chat"
    response_model: Short | None = None
    feature: Short | None = None
    team: Short | None = None
    environment: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    session_id: Short | None = None
    user: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    http_status: int | None = Field(default=None, ge=100, le=599)
    ttft_ms: float | None = Field(default=None, ge=0)
    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    cached_input_tokens: int | None = Field(default=None, ge=0)
    cost_usd: float | None = Field(default=None, ge=0)
    error_type: Short | None = None
    error_message: str | None = None
    retry_count: int = Field(default=0, ge=0)
    finish_reason: Annotated[str, Field(max_length=64)] | None = None
    request_id: Short | None = None
    trace_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    metadata: dict[str, Any] | None = None


class CallBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    calls: list[CallIn] = Field(min_length=1, max_length=MAX_CALLS_PER_BATCH)


class IngestResult(BaseModel):
    accepted: int


def require_ingest_key(
    svc: Annotated[Services, Depends(services)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    keys = svc.settings.ingest_api_keys
    if not keys:
        if svc.settings.dev_mode:
            return
        REJECTED_REQUESTS.labels("ingest", "disabled").inc()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "ingest is disabled: set PAGERLOOP_INGEST_API_KEYS",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not any(
        hmac.compare_digest(presented.encode(), key.get_secret_value().encode()) for key in keys
    ):
        REJECTED_REQUESTS.labels("ingest", "bad_key").inc()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid bearer key is required (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


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
            UNPRICED.labels(call.response_model or call.model).inc()
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
        error_message=message[:ERROR_MESSAGE_MAX] if message else None,
        retry_count=call.retry_count,
        finish_reason=call.finish_reason,
        request_id=call.request_id,
        trace_id=call.trace_id,
        source="ingest",
        metadata=call.metadata,
    )
    if call.call_id:
        record.call_id = call.call_id
    return record


async def store_records(svc: Services, records: list[CallRecord], endpoint: str) -> None:
    try:
        await asyncio.to_thread(write_calls, svc.engine, records)
    except IntegrityError:
        REJECTED_REQUESTS.labels(endpoint, "duplicate").inc()
        raise HTTPException(
            status.HTTP_409_CONFLICT, "a call_id of this batch is already recorded; nothing written"
        ) from None
    INGESTED_CALLS.labels(endpoint).inc(len(records))


@router.post(
    "/v1/llm-calls",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_ingest_key)],
)
async def ingest_calls(
    batch: CallBatch, svc: Annotated[Services, Depends(services)]
) -> IngestResult:
    salt = svc.settings.user_hash_salt.get_secret_value()
    now = datetime.now(UTC)
    records = [to_record(call, salt, svc.prices, now) for call in batch.calls]
    await store_records(svc, records, "llm-calls")
    return IngestResult(accepted=len(records))
