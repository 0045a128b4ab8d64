"""POST /pagerduty/webhook: an acknowledge or resolve done in PagerDuty (v3 webhooks) becomes
the incident's update, through the `pagerduty` channel (which the incident never echoes back)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError

from api.deps import Services, services
from api.telemetry import REJECTED_REQUESTS
from workflows.incident import IncidentWorkflow
from workflows.incident_types import ActionRequest

log = logging.getLogger(__name__)
router = APIRouter()

UPDATES: dict[str, Any] = {
    "incident.acknowledged": IncidentWorkflow.acknowledge,
    "incident.resolved": IncidentWorkflow.resolve,
}
ANSWER_WITHIN_SECONDS = 8


def signed(body: bytes, header: str, secret: str) -> bool:
    """`X-PagerDuty-Signature: v1=<hex>[,v1=<hex>...]` (several during a secret rotation)."""
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    candidates = [part.strip() for part in header.split(",")]
    return any(
        hmac.compare_digest(candidate.removeprefix("v1="), expected)
        for candidate in candidates
        if candidate.startswith("v1=")
    )


def _verify(svc: Services, body: bytes, request: Request) -> None:
    secret = svc.settings.pagerduty_webhook_secret
    if secret is None:
        REJECTED_REQUESTS.labels("pagerduty", "no_webhook_secret").inc()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "PagerDuty webhooks are refused: PAGERLOOP_PAGERDUTY_WEBHOOK_SECRET is not set",
        )
    header = request.headers.get("X-PagerDuty-Signature", "")
    if not signed(body, header, secret.get_secret_value()):
        REJECTED_REQUESTS.labels("pagerduty", "bad_signature").inc()
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid PagerDuty signature")


def _event(body: bytes) -> dict[str, Any]:
    try:
        event = json.loads(body)["event"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"event: not a PagerDuty v3 webhook ({exc})"
        ) from None
    if not isinstance(event, dict):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "event: expected an object")
    return event


@router.post("/pagerduty/webhook")
async def pagerduty_webhook(
    request: Request, svc: Annotated[Services, Depends(services)]
) -> dict[str, str]:
    body = await request.body()
    _verify(svc, body, request)
    event = _event(body)
    update = UPDATES.get(str(event.get("event_type", "")))
    data = event.get("data") or {}
    incident_key = str(data.get("incident_key") or "")
    if update is None or not incident_key.startswith("incident-"):
        return {"status": "ignored", "reason": "not an acknowledge or resolve of ours"}
    incident_id = incident_key.split("/")[0]  # "<incident id>/<level>" for a level's service
    agent = event.get("agent") or {}
    user = str(agent.get("summary") or agent.get("email") or agent.get("id") or "someone")
    handle = svc.temporal.get_workflow_handle(incident_id)
    action = ActionRequest(user=f"{user} (PagerDuty)", channel="pagerduty")
    try:
        async with asyncio.timeout(ANSWER_WITHIN_SECONDS):
            await handle.execute_update(update, action)
    except WorkflowUpdateFailedError as exc:  # already acknowledged or resolved: once is enough
        return {"status": "ignored", "reason": str(getattr(exc.cause, "message", exc.cause))}
    except RPCError as exc:
        return {"status": "ignored", "reason": f"{incident_id}: {exc.status.name}"}
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as exc:
        log.warning("PagerDuty %s for %s not applied yet", event.get("event_type"), incident_id)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "try again") from exc
    return {"status": "applied", "incident": incident_id}
