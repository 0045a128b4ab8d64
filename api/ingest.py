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
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pagerloop_sdk.http_sink import COLUMNS_TYPE
from pagerloop_sdk.pricing import PriceTable
from pagerloop_sdk.privacy import hash_user_id
from pagerloop_sdk.recorder import count_unpriced
from pydantic import BaseModel

from api.auth import require_ingest_key
from api.bodies import JsonBody
from api.columns import CallColumns
from api.deps import Services, services
from api.errors import INGEST_ERRORS
from api.ingest_types import CallBatch, CallIn
from api.otlp_limits import ExportRefusedError, inflate
from api.telemetry import INGESTED_CALLS
from stores.llm_calls import ERROR_MESSAGE_MAX, CallRecord, new_call_id, write_calls
from stores.quality import SCORER, ScoreRecord, write_scores

router = APIRouter()

BATCH = JsonBody[CallBatch]("CallBatch", CallBatch)
COLUMNS = JsonBody[CallColumns]("CallColumns", CallColumns, COLUMNS_TYPE)


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
    return CallRecord(
        call_id=call.call_id or new_call_id(),
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


def _refuse_repeated_call_ids(call_ids: Iterable[str | None], where: tuple[Any, ...]) -> None:
    """A call_id twice in one batch is the batch's own mistake (422), not a retry. `where`:
    the location of the call_ids in the body, with `{}` for the call's index."""
    seen: set[str] = set()
    for index, call_id in enumerate(call_ids):
        if call_id is None:
            continue
        if call_id in seen:
            loc = tuple(index if part == "{}" else part for part in where)
            message = "this call_id is already in this batch"
            raise RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])
        seen.add(call_id)


def _decode(
    raw: bytes, columnar: bool, salt: str, prices: PriceTable, now: datetime
) -> tuple[list[CallRecord], list[ScoreRecord]]:
    """The batch's records and scorer verdicts, validated; CPU bound (a worker thread's)."""
    calls: Sequence[Any]
    if columnar:
        columns = COLUMNS.validate(raw).columns
        _refuse_repeated_call_ids(columns.call_ids(), ("body", "columns", "call_id", "{}"))
        calls = list(columns.calls())
    else:
        calls = BATCH.validate(raw).calls
        _refuse_repeated_call_ids((c.call_id for c in calls), ("body", "calls", "{}", "call_id"))
    records = [to_record(call, salt, prices, now) for call in calls]
    scores = [
        score
        for call, record in zip(calls, records, strict=True)
        if (score := score_of(call, record)) is not None
    ]
    return records, scores


@router.post(
    "/v1/llm-calls",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_ingest_key)],
    openapi_extra=JsonBody.openapi_of(BATCH, COLUMNS),
    responses=INGEST_ERRORS,
)
async def ingest_calls(
    request: Request, svc: Annotated[Services, Depends(services)]
) -> IngestResult:
    raw = await request.body()
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        try:
            limit = svc.settings.ingest_max_body_bytes
            raw = await asyncio.to_thread(inflate, raw, encoding, limit)
        except ExportRefusedError as exc:
            raise HTTPException(exc.status, exc.message) from None
    columnar = request.headers.get("content-type", "").lower().startswith(COLUMNS_TYPE)
    salt = svc.settings.user_hash_salt.get_secret_value()
    records, scores = await asyncio.to_thread(
        _decode, raw, columnar, salt, svc.prices, datetime.now(UTC)
    )
    duplicates = await store_records(svc, records, "llm-calls", scores)
    return IngestResult(accepted=len(records), duplicates=duplicates)
