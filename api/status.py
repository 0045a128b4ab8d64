"""GET /status: the overall state and the open incidents, as JSON or as a page."""

from __future__ import annotations

import asyncio
import html
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from temporalio.service import RPCError

from activities.incidents import open_incidents_query
from api.auth import readable_by
from api.deps import Services, services
from api.errors import RETRY_AFTER_SECONDS
from domain import search_attributes as sa

router = APIRouter()
STATUS_DEADLINE_SECONDS = 3


class OpenIncident(BaseModel):
    id: str
    status: str | None
    severity: str | None
    trigger: str | None
    scope: str | None
    level: int | None
    opened_at: datetime | None


class StatusPage(BaseModel):
    overall: str
    open_incidents: list[OpenIncident]


def overall_state(incidents: list[OpenIncident]) -> str:
    active = [i for i in incidents if i.status != "resolved"]
    if any(i.severity == "SEV1" or i.trigger == "api_outage" for i in active):
        return "outage"
    return "degraded" if active else "operational"


async def open_incidents(svc: Services) -> list[OpenIncident]:
    found = []
    query = open_incidents_query(svc.settings.task_queue)
    async for execution in svc.temporal.list_workflows(query, limit=200):
        attrs = execution.typed_search_attributes
        found.append(
            OpenIncident(
                id=execution.id,
                status=attrs.get(sa.INCIDENT_STATUS),
                severity=attrs.get(sa.INCIDENT_SEVERITY),
                trigger=attrs.get(sa.INCIDENT_TRIGGER),
                scope=attrs.get(sa.INCIDENT_SCOPE),
                level=attrs.get(sa.INCIDENT_LEVEL),
                opened_at=execution.start_time,
            )
        )
    return found


@router.get("/status", response_model=StatusPage, dependencies=[readable_by("status")])
async def status_page(request: Request, svc: Annotated[Services, Depends(services)]) -> Response:
    code = 200
    try:
        async with asyncio.timeout(STATUS_DEADLINE_SECONDS):
            incidents = await open_incidents(svc)
        page = StatusPage(overall=overall_state(incidents), open_incidents=incidents)
    except (TimeoutError, RPCError, RuntimeError):
        # Temporal is away (a lazy client fails to connect with RuntimeError): say so.
        page, code = StatusPage(overall="unknown", open_incidents=[]), 503
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if code == 503 else {}
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(_render(page), status_code=code, headers=headers)
    return JSONResponse(page.model_dump(mode="json"), status_code=code, headers=headers)


def _render(page: StatusPage) -> str:
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(value))}</td>"
            for value in (
                i.severity,
                i.trigger,
                i.scope,
                i.status,
                f"L{i.level}",
                i.opened_at,
                i.id,
            )
        )
        + "</tr>"
        for i in page.open_incidents
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>pagerloop status</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.3em .8em;text-align:left}"
        "</style></head><body>"
        f"<h1>pagerloop: {html.escape(page.overall)}</h1>"
        "<table><tr><th>severity</th><th>trigger</th><th>scope</th><th>status</th><th>level</th>"
        f"<th>opened</th><th>incident</th></tr>{rows}</table></body></html>"
    )
