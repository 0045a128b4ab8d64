"""How refusals and outages are answered: 422 naming the field, 503 with Retry-After.

A 5xx means a dependency is really down, never bad input. Error bodies never echo the input
back (it may be megabytes, NaN, or text JSON cannot carry) nor anything internal.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.telemetry import REJECTED_REQUESTS

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 5
MAX_ERRORS_SHOWN = 100

INGEST_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid ingest key"},
    413: {"description": "body over the size limit"},
    422: {"description": "a field out of its bounds, named with the record index"},
    503: {"description": "the store is unavailable; retry after Retry-After seconds"},
}
OPERATOR_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid operator key"},
    403: {"description": "an ingest key: operator actions need an operator key"},
    422: {"description": "a field out of its bounds"},
    503: {"description": "the store is unavailable; retry after Retry-After seconds"},
}


def printable(part: Any, limit: int = 200) -> str:
    """Text for an error body: short, and encodable (an unpaired surrogate shows escaped)."""
    return str(part).encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    path = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{printable(part)}" if path else printable(part)
    return path or "body"


def problems(exc: ValidationError, most: int = 5) -> str:
    """`field: message; ...` of a pydantic error, without its input."""
    errors = exc.errors(include_input=False, include_url=False)[:most]
    return "; ".join(f"{field_path(e['loc'])}: {printable(e['msg'])}" for e in errors)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    REJECTED_REQUESTS.labels(route_of(request), "invalid").inc()
    shown = [
        {
            "field": field_path(error["loc"]),
            "type": error.get("type"),
            "msg": printable(error.get("msg", "")),
        }
        for error in errors[:MAX_ERRORS_SHOWN]
    ]
    return JSONResponse(
        {
            "detail": "; ".join(f"{e['field']}: {e['msg']}" for e in shown[:20]),
            "errors": shown,
        },
        status_code=422,
    )


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("store unavailable on %s: %s", route_of(request), type(exc).__name__)
    REJECTED_REQUESTS.labels(route_of(request), "store_unavailable").inc()
    return JSONResponse(
        {"detail": "the store is unavailable; nothing was written, retry later"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def route_of(request: Request) -> str:
    """The route's template, never the raw path: a label must not take caller-chosen values."""
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    for unavailable in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(unavailable, store_unavailable)
    app.add_exception_handler(DataError, _store_refused)


async def _store_refused(request: Request, exc: Exception) -> JSONResponse:
    """A value the store refused that the bounds should have caught: a 4xx for the caller (it
    is their value), logged as the bug of ours it is."""
    log.error("the store refused a value on %s: %s", route_of(request), type(exc).__name__)
    REJECTED_REQUESTS.labels(route_of(request), "store_refused").inc()
    return JSONResponse(
        {"detail": "the store refused a value of this request; nothing was written"},
        status_code=422,
    )
