"""The FastAPI application: Slack interactions, ingest, status, health and metrics."""

from __future__ import annotations

from typing import NoReturn

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import (
    calls,
    controls,
    costs,
    errors,
    feedback,
    health,
    ingest,
    otlp,
    pagerduty,
    silences,
    slack,
    status,
    waterfall,
)
from api.auth import readable_by
from api.bodies import add_components
from api.deps import Services
from api.telemetry import REJECTED_REQUESTS

# Webhooks and operator requests are small; only the ingest endpoints take big batches.
SMALL_BODY_BYTES = 1_000_000
SILENCE_BODY_BYTES = 64_000


class BodySizeLimit:
    """413 for a body over the limit of its path prefix: at once when declared, else as soon as
    the streamed body passes it. Nothing is read here: the endpoint reads the body only after
    authenticating the caller, so an unauthenticated client cannot make the server read."""

    def __init__(self, app: ASGIApp, limits: dict[str, int]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        limit = next(
            (size for prefix, size in self.limits.items() if path.startswith(prefix)), None
        )
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    _too_large(limit)
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> NoReturn:
    REJECTED_REQUESTS.labels("any", "too_large").inc()
    raise HTTPException(413, f"request body larger than {limit} bytes")


async def _refuse(send: Send, limit: int) -> None:
    REJECTED_REQUESTS.labels("any", "too_large").inc()
    response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(svc: Services) -> FastAPI:
    # The schema and the docs are routes of our own, so that they can be kept to operators.
    app = FastAPI(
        title="pagerloop", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.services = svc
    ingest_limit = svc.settings.ingest_max_body_bytes
    app.add_middleware(
        BodySizeLimit,
        limits={
            "/v1/silences": SILENCE_BODY_BYTES,
            "/v1/controls": SILENCE_BODY_BYTES,
            "/v1/feedback": min(ingest_limit, SMALL_BODY_BYTES * 2),
            "/v1/": ingest_limit,
            "/slack/": SMALL_BODY_BYTES,
            "/pagerduty/": SMALL_BODY_BYTES,
        },
    )
    errors.install(app)
    routers = (
        ingest,
        otlp,
        feedback,
        silences,
        controls,
        calls,
        waterfall,
        costs,
        slack,
        pagerduty,
        status,
        health,
    )
    for module in routers:
        app.include_router(module.router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[readable_by("openapi")])
    def openapi() -> JSONResponse:
        if app.openapi_schema is None:
            app.openapi_schema = add_components(
                get_openapi(title=app.title, version=app.version, routes=app.routes)
            )
        return JSONResponse(app.openapi_schema)

    @app.get("/docs", include_in_schema=False, dependencies=[readable_by("docs")])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="pagerloop API")

    return app
