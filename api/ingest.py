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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
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
from stores.llm_calls import ERROR_MESSAGE_MAX, CallRecord, new_call_id
from stores.quality import SCORER, ScoreRecord, write_scores
from stores.writer import rows_from_columns, write_rows

router = APIRouter()

BATCH = JsonBody[CallBatch]("CallBatch", CallBatch)
COLUMNS = JsonBody[CallColumns]("CallColumns", CallColumns, COLUMNS_TYPE)


class IngestResult(BaseModel):
    accepted: int  # the calls of the batch, all recorded now
    duplicates: int = 0  # of which were already recorded (a retried batch): not written again


# CallRecord fields the API stores as sent; the others it computes (`to_rows`).
_COMPUTED = ("call_id", "ts", "cost_usd", "user_hash", "error_message")
_AS_SENT = tuple(
    f.name for f in fields(CallRecord) if f.name in CallIn.model_fields and f.name not in _COMPUTED
)


def columns_of(calls: Sequence[CallIn]) -> dict[str, list[Any]]:
    """The calls as the columnar form has them: one list per CallIn field."""
    return {name: [getattr(call, name) for call in calls] for name in CallIn.model_fields}


def to_rows(
    calls: Mapping[str, Sequence[Any]], salt: str, prices: PriceTable, received_at: datetime
) -> tuple[list[tuple[Any, ...]], list[ScoreRecord]]:
    """The stored rows of a batch (one sequence per CallIn field, defaults filled in) and
    its scorer verdicts. Both JSON forms and OTLP come through here, a column at a time: a
    CallRecord per call cost the API more than validating it."""
    asked = zip(calls["model"], calls["response_model"], strict=True)
    models = [answered or model for model, answered in asked]
    costs = list(calls["cost_usd"])
    tokens = zip(
        calls["input_tokens"], calls["output_tokens"], calls["cached_input_tokens"], strict=True
    )
    for index, (inputs, outputs, cached) in enumerate(tokens):
        if costs[index] is None and inputs is not None:
            model = models[index]
            costs[index] = prices.cost_usd(model, inputs, outputs or 0, cached or 0)
            if costs[index] is None:
                count_unpriced(model)
    stored: dict[str, Sequence[Any]] = {name: calls[name] for name in _AS_SENT}
    stored["call_id"] = [given or new_call_id() for given in calls["call_id"]]
    stored["ts"] = [(at or received_at).astimezone(UTC) for at in calls["timestamp"]]
    stored["cost_usd"] = costs
    stored["user_hash"] = [hash_user_id(user, salt) if user else None for user in calls["user"]]
    stored["error_message"] = [
        None if message is None else message[:ERROR_MESSAGE_MAX]
        for message in calls["error_message"]
    ]
    scores = [
        ScoreRecord(
            call_id=stored["call_id"][index],
            ts=stored["ts"][index],
            source=SCORER,
            score=verdict.score,
            format_compliance=verdict.format_compliance,
            hallucination_risk=verdict.hallucination_risk,
            relevance=verdict.relevance,
            model=models[index],
            feature=calls["feature"][index],
        )
        for index, verdict in enumerate(calls["quality"])
        if verdict is not None
    ]
    return rows_from_columns(stored), scores


async def store_records(
    svc: Services, rows: list[tuple[Any, ...]], endpoint: str, scores: Sequence[ScoreRecord] = ()
) -> int:
    """Write the rows whose call_id is not recorded yet (and their scorer verdicts, once per
    call too); how many were already recorded."""
    inserted = await asyncio.to_thread(write_rows, svc.engine, rows)
    if scores:
        await asyncio.to_thread(write_scores, svc.engine, scores)
    INGESTED_CALLS.labels(endpoint).inc(inserted)
    return len(rows) - inserted


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
) -> tuple[list[tuple[Any, ...]], list[ScoreRecord]]:
    """The batch's rows and scorer verdicts, validated; CPU bound (a worker thread's)."""
    if columnar:
        body = COLUMNS.validate(raw).columns
        _refuse_repeated_call_ids(body.call_ids(), ("body", "columns", "call_id", "{}"))
        columns = body.filled()
    else:
        calls = BATCH.validate(raw).calls
        _refuse_repeated_call_ids((c.call_id for c in calls), ("body", "calls", "{}", "call_id"))
        columns = columns_of(calls)
    return to_rows(columns, salt, prices, now)


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
    rows, scores = await asyncio.to_thread(
        _decode, raw, columnar, salt, svc.prices, datetime.now(UTC)
    )
    duplicates = await store_records(svc, rows, "llm-calls", scores)
    return IngestResult(accepted=len(rows), duplicates=duplicates)
