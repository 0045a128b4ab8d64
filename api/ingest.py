"""POST /v1/llm-calls: LLM call records from any language, validated as one batch."""

from __future__ import annotations

import asyncio
import hmac
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.deps import Services, services
from api.telemetry import INGESTED_CALLS, REJECTED_REQUESTS
from instrumentation.pricing import cost_usd
from instrumentation.privacy import hash_user_id
from stores.llm_calls import LLMCall, insert_calls

router = APIRouter()

MAX_CALLS_PER_BATCH = 10_000
ERROR_MESSAGE_MAX = 2000

Short = Annotated[str, Field(min_length=1, max_length=128)]


class CallRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Short
    status: Literal["success", "error", "timeout", "rate_limited", "server_error"]
    latency_ms: float = Field(ge=0)
    timestamp: AwareDatetime | None = None
    feature: Short | None = None
    team: Short | None = None
    environment: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    session_id: Short | None = None
    user: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    http_status: int | None = Field(default=None, ge=100, le=599)
    ttft_ms: float | None = Field(default=None, ge=0)
    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    cost_usd: float | None = Field(default=None, ge=0)
    error_type: Short | None = None
    error_message: str | None = None
    retry_count: int = Field(default=0, ge=0)
    request_id: Short | None = None
    trace_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    metadata: dict[str, Any] | None = None


class CallBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    calls: list[CallRecord] = Field(min_length=1, max_length=MAX_CALLS_PER_BATCH)


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


def to_row(record: CallRecord, salt: str, received_at: datetime) -> LLMCall:
    cost = record.cost_usd
    if cost is None and record.input_tokens is not None:
        cost = cost_usd(record.model, record.input_tokens, record.output_tokens or 0)
    message = record.error_message
    return LLMCall(
        ts=(record.timestamp or received_at).astimezone(UTC),
        model=record.model,
        status=record.status,
        latency_ms=record.latency_ms,
        feature=record.feature,
        team=record.team,
        environment=record.environment,
        session_id=record.session_id,
        user_hash=hash_user_id(record.user, salt) if record.user else None,
        http_status=record.http_status,
        ttft_ms=record.ttft_ms,
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
        cost_usd=cost,
        error_type=record.error_type,
        error_message=message[:ERROR_MESSAGE_MAX] if message else None,
        retry_count=record.retry_count,
        request_id=record.request_id,
        trace_id=record.trace_id,
        metadata_=record.metadata,
    )


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
    rows = [to_row(record, salt, now) for record in batch.calls]
    await asyncio.to_thread(insert_calls, svc.engine, rows)
    INGESTED_CALLS.labels("llm-calls").inc(len(rows))
    return IngestResult(accepted=len(rows))
