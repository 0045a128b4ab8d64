"""GET /v1/calls: search the call log; GET /v1/calls/stats: sum it up per group (operator key).

`q` is a Lucene-style query (stores.call_search: `status:error AND model:gpt-4.1`,
`latency_ms:>2000`, ...), at most 2,000 characters; empty: every call. `since` (default 1 h
ago) and `until` (default now, exclusive) are RFC 3339 times or durations back from now (`30m`,
`1h`, `7d`; a time needs its UTC offset: domain.periods). `limit` 1..1,000 (default 50); a
page's `next` is the `cursor` of the following page, null on the last one. The cursor carries the
range of the first page, resolved once: following `next` sweeps exactly that range however
long it takes (a `since=1h` stays the hour before the first page); `since` / `until` may be left
out beside a cursor, and are refused (422 naming `cursor`) when they name another range, as is
a cursor of another `q`. A query that cannot be read is a 400 with `{"detail", "position"}`;
any other bad parameter a 422 naming it; a search that runs past 10 s a 503 (narrow it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import ColumnElement

from api.auth import Operator
from api.bounds import Storable
from api.deps import Services, services
from api.errors import OPERATOR_ERRORS, RETRY_AFTER_SECONDS
from stores import call_search
from stores.call_search import (
    DEFAULT_LIMIT,
    ERROR_STATUSES,
    MAX_LIMIT,
    MAX_QUERY_LENGTH,
    ParameterError,
    QueryError,
    SearchTimeoutError,
)

TIME_MAX_LENGTH = 64
CURSOR_MAX_LENGTH = 256  # a cursor this API makes is about 140 characters


def _utc_now() -> datetime:
    return datetime.now(UTC)


clock: Callable[[], datetime] = _utc_now  # the tests move it
StatsBy = Literal[
    "model",
    "served_model",
    "feature",
    "team",
    "environment",
    "status",
    "error_type",
    "http_status",
]
router = APIRouter(
    responses={
        **OPERATOR_ERRORS,
        400: {"description": "the query cannot be read: `detail` says what, `position` where"},
        503: {"description": "the store is unavailable, or the search ran past 10 s"},
    }
)

Q = Annotated[
    str,
    Query(
        max_length=MAX_QUERY_LENGTH,
        description="Lucene-style query, e.g. `status:error AND model:gpt-4.1`; empty: all calls",
    ),
    Storable,
]
Since = Annotated[
    str | None,
    Query(max_length=TIME_MAX_LENGTH, description="RFC 3339 time or duration back (1h); 1h"),
]
Until = Annotated[
    str | None,
    Query(max_length=TIME_MAX_LENGTH, description="RFC 3339 time or duration back; now"),
]


class CallOut(BaseModel):
    """A call as ingested (the end user as its pseudonym, `user_hash`), with its id and time."""

    call_id: str
    timestamp: datetime
    model: str
    response_model: str | None
    status: str
    http_status: int | None
    latency_ms: float
    ttft_ms: float | None
    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int | None
    cost_usd: float | None
    feature: str | None
    team: str | None
    environment: str | None
    session_id: str | None
    user_hash: str | None
    error_type: str | None
    error_message: str | None
    retry_count: int
    request_id: str | None
    trace_id: str | None
    operation: str
    finish_reason: str | None
    source: str
    controls: str | None
    metadata: dict[str, Any] | None


class CallsOut(BaseModel):
    calls: list[CallOut]  # newest first
    next: str | None  # pass as `cursor` for the next page; null: no more
    since: datetime
    until: datetime


class GroupOut(BaseModel):
    """One group: `key` null for calls without the field. `errors` counts the statuses of
    `error_statuses` (a 429, `rate_limited`, is counted apart, as the detectors count it).
    Latency percentiles from the calls' histogram buckets: within 2.5 % of the exact value."""

    key: str | int | None
    calls: int
    errors: int
    error_pct: float
    rate_limited: int
    rate_limited_pct: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: float


class StatsOut(BaseModel):
    by: str
    calls: int  # every matching call
    groups_total: int  # groups found; the largest 50 by calls are in `groups`
    groups: list[GroupOut]
    error_statuses: list[str]
    since: datetime
    until: datetime


def _refused(field: str, message: str) -> RequestValidationError:
    error = {"loc": ("query", field), "msg": message, "type": "value_error"}
    return RequestValidationError([error])


def _refused_parameter(exc: ParameterError) -> RequestValidationError:
    return _refused(exc.field, exc.message)


def window(since: str | None, until: str | None, now: datetime) -> tuple[datetime, datetime]:
    """[since, until) of the request; a 422 naming the parameter when it cannot be read."""
    try:
        return call_search.time_range(since, until, now)
    except ParameterError as exc:
        raise _refused_parameter(exc) from None


def _bad_query(exc: QueryError) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "position": exc.position}, status_code=400)


def _too_slow(exc: SearchTimeoutError) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


def _where(svc: Services, q: str) -> ColumnElement[bool]:
    return call_search.compile_query(q, user_salt=svc.settings.user_hash_salt.get_secret_value())


@router.get("/v1/calls", response_model=CallsOut)
async def search_calls(
    _: Operator,
    svc: Annotated[Services, Depends(services)],
    q: Q = "",
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=CURSOR_MAX_LENGTH)] = None,
) -> Any:
    """The calls matching `q` in [since, until), newest first, `limit` a page."""
    try:
        sweep, after = call_search.sweep_of(q, since, until, cursor, clock())
    except ParameterError as exc:
        raise _refused_parameter(exc) from None
    try:
        where = _where(svc, q)
        page = await asyncio.to_thread(
            call_search.search,
            svc.engine,
            where,
            since=sweep.since,
            until=sweep.until,
            limit=limit,
            after=None if after is None else after.after,
        )
    except QueryError as exc:
        return _bad_query(exc)
    except SearchTimeoutError as exc:
        return _too_slow(exc)
    return CallsOut(
        calls=[CallOut.model_validate(c) for c in page.calls],
        next=sweep.next(page),
        since=sweep.since,
        until=sweep.until,
    )


def stats_out(found: call_search.Stats, since: datetime, until: datetime) -> StatsOut:
    return StatsOut(
        by=found.by,
        calls=found.calls,
        groups_total=found.groups_total,
        groups=[
            GroupOut(
                key=g.key,
                calls=g.calls,
                errors=g.errors,
                error_pct=round(g.error_pct, 3),
                rate_limited=g.rate_limited,
                rate_limited_pct=round(g.rate_limited_pct, 3),
                latency_p50_ms=_ms(g.latency_p50_ms),
                latency_p95_ms=_ms(g.latency_p95_ms),
                latency_p99_ms=_ms(g.latency_p99_ms),
                input_tokens=g.input_tokens,
                output_tokens=g.output_tokens,
                cost_usd=round(g.cost_usd, 6),
            )
            for g in found.groups
        ],
        error_statuses=list(ERROR_STATUSES),
        since=since,
        until=until,
    )


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@router.get("/v1/calls/stats", response_model=StatsOut)
async def call_stats(
    _: Operator,
    svc: Annotated[Services, Depends(services)],
    q: Q = "",
    by: StatsBy = "model",
    since: Since = None,
    until: Until = None,
) -> Any:
    """Per group of `by` (the 50 largest by calls): calls, error %, 429 %, p50/p95/p99 latency,
    tokens and cost of the calls matching `q` in [since, until)."""
    start, end = window(since, until, clock())
    try:
        where = _where(svc, q)
        found = await asyncio.to_thread(
            call_search.stats, svc.engine, where, by=by, since=start, until=end
        )
    except QueryError as exc:
        return _bad_query(exc)
    except SearchTimeoutError as exc:
        return _too_slow(exc)
    return stats_out(found, start, end)
