"""POST /v1/feedback: user feedback and external eval scores for recorded calls."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from api.auth import require_ingest_key
from api.bodies import JsonBody
from api.bounds import MAX_FEEDBACK_PER_REQUEST, RecentTimestamp, Storable, Text128
from api.deps import Services, services
from api.errors import INGEST_ERRORS
from api.telemetry import INGESTED_CALLS
from stores.llm_calls import LLMCall
from stores.quality import ScoreRecord, write_scores

router = APIRouter()
REQUEST_ID_WINDOW = timedelta(days=2)


class FeedbackIn(BaseModel):
    """A verdict on one call, referenced by its `call_id` or its OpenAI `request_id`."""

    model_config = ConfigDict(extra="forbid")

    call_id: Text128
    score: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    thumbs: Literal["up", "down"] | None = None
    source: Literal["feedback", "eval"] = "feedback"
    evaluator: Annotated[str, Field(max_length=128), Storable] | None = None
    label: Annotated[str, Field(max_length=64), Storable] | None = None
    comment: Annotated[str, Field(max_length=1000), Storable] | None = None
    timestamp: RecentTimestamp | None = None

    @model_validator(mode="after")
    def _one_verdict(self) -> FeedbackIn:
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of `score` (0..1) or `thumbs` (up/down)")
        return self

    @property
    def value(self) -> float:
        if self.score is not None:
            return self.score
        return 1.0 if self.thumbs == "up" else 0.0


FEEDBACK = JsonBody[FeedbackIn | list[FeedbackIn]](
    "Feedback",
    FeedbackIn
    | Annotated[
        list[FeedbackIn],
        Field(min_length=1, max_length=MAX_FEEDBACK_PER_REQUEST, fail_fast=True),
    ],
)


class FeedbackResult(BaseModel):
    accepted: int


def _calls_by_reference(engine: Engine, references: set[str]) -> dict[str, LLMCall]:
    """Calls by our call_id (indexed), else by OpenAI request id among recent calls (request
    ids are not indexed: feedback by request id must come within REQUEST_ID_WINDOW)."""
    found: dict[str, LLMCall] = {}
    since = datetime.now(UTC) - REQUEST_ID_WINDOW
    with Session(engine) as session:
        for call in session.exec(select(LLMCall).where(col(LLMCall.call_id).in_(references))):
            found[call.call_id] = call
        rest = references - found.keys()
        if rest:
            query = select(LLMCall).where(
                col(LLMCall.ts) >= since, col(LLMCall.request_id).in_(rest)
            )
            for call in session.exec(query):
                found[call.request_id or call.call_id] = call
    return found


@router.post(
    "/v1/feedback",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_ingest_key)],
    openapi_extra=FEEDBACK.openapi,
    responses={**INGEST_ERRORS, 404: {"description": "a referenced call is not recorded"}},
)
async def post_feedback(
    request: Request, svc: Annotated[Services, Depends(services)]
) -> FeedbackResult:
    body = await FEEDBACK.parse(request)
    items = body if isinstance(body, list) else [body]
    calls = await asyncio.to_thread(
        _calls_by_reference, svc.engine, {item.call_id for item in items}
    )
    unknown = sorted({item.call_id for item in items} - calls.keys())
    if unknown:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no recorded call with call_id {', '.join(unknown[:10])} (or with that request_id "
            "in the last two days); nothing written",
        )
    now = datetime.now(UTC)
    scores = []
    for item in items:
        call = calls[item.call_id]
        scores.append(
            ScoreRecord(
                call_id=call.call_id,
                ts=item.timestamp or now,
                source=item.source,
                score=item.value,
                evaluator=item.evaluator,
                label=item.label or item.thumbs,
                comment=item.comment,
                model=call.response_model or call.model,
                feature=call.feature,
            )
        )
    await asyncio.to_thread(write_scores, svc.engine, scores)
    INGESTED_CALLS.labels("feedback").inc(len(scores))
    return FeedbackResult(accepted=len(scores))
