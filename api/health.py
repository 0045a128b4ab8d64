"""GET /healthz (liveness and dependencies) and GET /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import Services, services
from api.telemetry import REGISTRY
from stores.engine import ping

router = APIRouter()


async def _check(probe: Any) -> str:
    try:
        await asyncio.wait_for(probe, timeout=3)
    except Exception as exc:
        return f"failing: {type(exc).__name__}: {exc}"[:300]
    return "ok"


@router.get("/healthz")
async def healthz(svc: Annotated[Services, Depends(services)]) -> JSONResponse:
    checks = {
        "store": await _check(asyncio.to_thread(ping, svc.engine)),
        "temporal": await _check(svc.temporal.service_client.check_health()),
    }
    healthy = all(result == "ok" for result in checks.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "checks": checks},
        status_code=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE,
    )


@router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
