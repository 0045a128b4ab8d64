"""/v1/silences: maintenance windows that keep new incidents from opening."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from api.deps import Services, services
from api.ingest import require_ingest_key
from stores import silences
from stores.llm_calls import utc
from stores.silences import Silence
from workflows.incident_types import Trigger

router = APIRouter(dependencies=[Depends(require_ingest_key)])


class SilenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trigger: Trigger | None = None
    scope: Annotated[str, Field(min_length=1, max_length=160)] | None = None
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    duration_minutes: int | None = Field(default=None, gt=0, le=60 * 24 * 30)
    author: Annotated[str, Field(min_length=1, max_length=128)]
    reason: Annotated[str, Field(min_length=1, max_length=1000)]

    @model_validator(mode="after")
    def _a_window(self) -> SilenceIn:
        if self.ends_at is not None and self.duration_minutes is not None:
            raise ValueError("give ends_at or duration_minutes, not both")
        starts, ends = self.starts_at, self.ends_at
        if starts is not None and ends is not None and ends <= starts:
            raise ValueError("ends_at must be after starts_at")
        return self


class SilenceOut(BaseModel):
    id: int
    trigger: str | None
    scope: str | None
    starts_at: datetime
    ends_at: datetime
    author: str
    reason: str
    created_at: datetime
    expired_at: datetime | None
    active: bool


def _out(silence: Silence, now: datetime) -> SilenceOut:
    assert silence.id is not None
    return SilenceOut(
        id=silence.id,
        trigger=silence.trigger,
        scope=silence.scope,
        starts_at=utc(silence.starts_at),
        ends_at=utc(silence.ends_at),
        author=silence.author,
        reason=silence.reason,
        created_at=utc(silence.created_at),
        expired_at=utc(silence.expired_at) if silence.expired_at else None,
        active=silence.active_at(now),
    )


@router.post("/v1/silences", status_code=status.HTTP_201_CREATED)
async def create_silence(
    body: SilenceIn, svc: Annotated[Services, Depends(services)]
) -> SilenceOut:
    now = datetime.now(UTC)
    starts = body.starts_at or now
    ends = body.ends_at or starts + timedelta(minutes=body.duration_minutes or 60)
    silence = Silence(
        trigger=str(body.trigger) if body.trigger else None,
        scope=body.scope,
        starts_at=utc(starts),
        ends_at=utc(ends),
        author=body.author,
        reason=body.reason,
        created_at=now,
    )
    created = await asyncio.to_thread(silences.create, svc.engine, silence)
    return _out(created, now)


@router.get("/v1/silences")
async def list_silences(
    svc: Annotated[Services, Depends(services)], include_past: bool = False
) -> list[SilenceOut]:
    now = datetime.now(UTC)
    found = await asyncio.to_thread(silences.listed, svc.engine, now, include_past)
    return [_out(s, now) for s in found]


@router.delete("/v1/silences/{silence_id}")
async def expire_silence(
    silence_id: int, svc: Annotated[Services, Depends(services)]
) -> SilenceOut:
    now = datetime.now(UTC)
    expired = await asyncio.to_thread(silences.expire, svc.engine, silence_id, now)
    if expired is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no silence #{silence_id}")
    return _out(expired, now)
