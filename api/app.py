"""The FastAPI application: Slack interactions, ingest, status, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import feedback, health, ingest, otlp, pagerduty, silences, slack, status
from api.deps import Services
from api.telemetry import REJECTED_REQUESTS

# Webhooks are small; only the ingest endpoints take big batches.
WEBHOOK_MAX_BYTES = 1_000_000


class BodySizeLimit:
    """413 for a body over the limit of its path prefix, declared or streamed, before any
    parsing or signature check."""

    def __init__(self, app: ASGIApp, limits: dict[str, int]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = next(
            (
                size
                for prefix, size in self.limits.items()
                if scope.get("path", "").startswith(prefix)
            ),
            None,
        )
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        # Read the body here (bounded) so a streamed, undeclared body is measured too.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._refuse(send, limit)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        REJECTED_REQUESTS.labels("any", "too_large").inc()
        response = JSONResponse(
            {"detail": f"request body larger than {limit} bytes"}, status_code=413
        )
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    path = ""
    for part in loc:
        if part == "body":
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    REJECTED_REQUESTS.labels(request.url.path, "invalid").inc()
    messages = [f"{_field_path(error['loc'])}: {error['msg']}" for error in errors]
    return JSONResponse(
        {"detail": "; ".join(messages[:20]), "errors": [dict(e, ctx=None) for e in errors[:100]]},
        status_code=422,
    )


def create_app(svc: Services) -> FastAPI:
    app = FastAPI(title="pagerloop", version="0.1.0")
    app.state.services = svc
    app.add_middleware(
        BodySizeLimit,
        limits={
            "/v1/": svc.settings.ingest_max_body_bytes,
            "/slack/": WEBHOOK_MAX_BYTES,
            "/pagerduty/": WEBHOOK_MAX_BYTES,
        },
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    for module in (ingest, otlp, feedback, silences, slack, pagerduty, status, health):
        app.include_router(module.router)
    return app
