"""GET /healthz (liveness and dependencies) and GET /metrics (Prometheus): the service's own
metrics and the golden signals (api/signals_export.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.auth import readable_by
from api.deps import Services, services
from api.errors import RETRY_AFTER_SECONDS
from api.signals_export import exporter_of
from api.telemetry import REGISTRY
from stores.engine import ping

log = logging.getLogger(__name__)
router = APIRouter()
# Under a load balancer's own probe timeout, and a dead dependency does not hold the answer.
HEALTH_DEADLINE_SECONDS = 2


async def _check(name: str, probe: Any) -> str:
    """ "ok" or "failing": the reason goes to the log, never to an unauthenticated caller (it
    can hold addresses, user names and versions)."""
    try:
        await asyncio.wait_for(probe, timeout=HEALTH_DEADLINE_SECONDS)
    except Exception as exc:
        log.warning("health check %s failing: %s: %s", name, type(exc).__name__, exc)
        return "failing"
    return "ok"


@router.get("/healthz")
async def healthz(svc: Annotated[Services, Depends(services)]) -> JSONResponse:
    checks = {
        "store": await _check("store", asyncio.to_thread(ping, svc.engine)),
        "temporal": await _check("temporal", svc.temporal.service_client.check_health()),
    }
    healthy = all(result == "ok" for result in checks.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "checks": checks},
        status_code=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={} if healthy else {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@router.get("/metrics", dependencies=[readable_by("metrics")])
async def metrics(request: Request) -> Response:
    exporter = exporter_of(request.app)
    await exporter.refresh()  # bounded: past its wait, the last snapshot is served

    def render() -> bytes:
        return generate_latest(REGISTRY) + generate_latest(exporter.registry)

    return Response(await asyncio.to_thread(render), media_type=CONTENT_TYPE_LATEST)
