"""/v1/silences: maintenance windows that keep new incidents from opening."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from api.auth import Operator
from api.bodies import JsonBody
from api.bounds import MAX_INT64, Storable, Text1000
from api.deps import Services, services
from api.errors import OPERATOR_ERRORS
from domain.incident import Trigger
from stores import silence_rules, silences
from stores.llm_calls import utc
from stores.silences import Silence

MAX_SILENCE_MINUTES = int(silence_rules.MAX_SILENCE.total_seconds() // 60)
# Far enough for any silence the rules allow; near enough that no arithmetic overflows.
NEAR = 2 * (silence_rules.MAX_START_AHEAD + silence_rules.MAX_SILENCE)


def _near(value: datetime) -> datetime:
    now = datetime.now(UTC)
    try:
        at = value.astimezone(UTC)
    except (OverflowError, ValueError):  # year 1 at +14:00 has no UTC time
        at = None
    if at is None or abs(at - now) > NEAR:
        raise ValueError(f"must lie within {NEAR.days} days of now")
    return at


NearTime = Annotated[AwareDatetime, AfterValidator(_near)]
MAX_LISTED = 1_000
router = APIRouter(responses=OPERATOR_ERRORS)


class SilenceIn(BaseModel):
    """A silence; the author is the operator key's name, not a field. Bounds: at most 30 days
    long, starting between a day ago and 30 days ahead; silencing every trigger on every
    scope needs `match_all: true`."""

    model_config = ConfigDict(extra="forbid")

    trigger: Trigger | None = None
    scope: Annotated[str, Field(min_length=1, max_length=160), Storable] | None = None
    starts_at: NearTime | None = None
    ends_at: NearTime | None = None
    duration_minutes: int | None = Field(default=None, gt=0, le=MAX_SILENCE_MINUTES)
    reason: Text1000
    match_all: bool = False

    @model_validator(mode="after")
    def _a_window(self) -> SilenceIn:
        if self.ends_at is not None and self.duration_minutes is not None:
            raise ValueError("give ends_at or duration_minutes, not both")
        return self


SILENCE = JsonBody[SilenceIn]("SilenceIn", SilenceIn)


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


def _window(body: SilenceIn, now: datetime) -> tuple[datetime, datetime]:
    starts = body.starts_at or now
    return starts, body.ends_at or starts + timedelta(minutes=body.duration_minutes or 60)


def _refused(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


@router.post("/v1/silences", status_code=status.HTTP_201_CREATED, openapi_extra=SILENCE.openapi)
async def create_silence(
    request: Request, author: Operator, svc: Annotated[Services, Depends(services)]
) -> SilenceOut:
    body = await SILENCE.parse(request)  # after the key is checked
    now = datetime.now(UTC)
    starts, ends = _window(body, now)
    silence = Silence(
        trigger=str(body.trigger) if body.trigger else None,
        scope=body.scope,
        starts_at=starts,
        ends_at=ends,
        author=author,
        reason=body.reason,
        created_at=now,
    )
    cap = svc.settings.max_active_silences
    try:
        created = await asyncio.to_thread(
            silence_rules.create_checked, svc.engine, silence, now, cap, body.match_all
        )
    except silence_rules.SilenceRefusedError as exc:
        raise _refused(exc.field, str(exc)) from None
    except silence_rules.TooManySilencesError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return _out(created, now)


@router.get("/v1/silences")
async def list_silences(
    _: Operator, svc: Annotated[Services, Depends(services)], include_past: bool = False
) -> list[SilenceOut]:
    now = datetime.now(UTC)
    found = await asyncio.to_thread(silences.listed, svc.engine, now, include_past)
    return [_out(s, now) for s in found[-MAX_LISTED:]]  # the latest


@router.delete("/v1/silences/{silence_id}")
async def expire_silence(
    silence_id: Annotated[int, Path(ge=1, le=MAX_INT64)],
    _: Operator,
    svc: Annotated[Services, Depends(services)],
) -> SilenceOut:
    now = datetime.now(UTC)
    expired = await asyncio.to_thread(silences.expire, svc.engine, silence_id, now)
    if expired is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no silence #{silence_id}")
    return _out(expired, now)
