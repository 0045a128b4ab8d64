"""POST /pagerduty/webhook: an acknowledge or resolve done in PagerDuty (v3 webhooks) becomes
the incident's update, through the `pagerduty` channel (which the incident never echoes back)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, Field, ValidationError
from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from api.bounds import Storable
from api.deps import Services, services
from api.errors import RETRY_AFTER_SECONDS, problems
from api.telemetry import REJECTED_REQUESTS
from domain.incident import ActionRequest
from workflows.incident import IncidentWorkflow

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
    # Bytes, not str: compare_digest raises on non-ASCII text, which a caller may send.
    return any(
        hmac.compare_digest(candidate.removeprefix("v1=").encode(), expected.encode())
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


Short = Annotated[str, Field(max_length=1000), Storable]


class _Agent(BaseModel):
    id: Short | None = None
    summary: Short | None = None
    email: Short | None = None


class _Data(BaseModel):
    incident_key: Short | None = None


class _Event(BaseModel):
    """The part of a v3 webhook event we act on; PagerDuty sends much more."""

    event_type: Short = ""
    agent: _Agent | None = None
    data: _Data | None = None


class _Webhook(BaseModel):
    event: _Event


def _event(body: bytes) -> _Event:
    try:
        return _Webhook.model_validate_json(body).event
    except ValidationError as exc:
        problem = problems(exc)
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"not a PagerDuty v3 webhook: {problem}"
        ) from None


def _try_again() -> HTTPException:
    # Temporal is away or slow: PagerDuty retries a 5xx, so the acknowledge is not lost.
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "the incident could not be reached; try again",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@router.post("/pagerduty/webhook")
async def pagerduty_webhook(
    request: Request, svc: Annotated[Services, Depends(services)]
) -> dict[str, str]:
    body = await request.body()
    _verify(svc, body, request)
    event = _event(body)
    update = UPDATES.get(event.event_type)
    incident_key = (event.data.incident_key if event.data else None) or ""
    if update is None or not incident_key.startswith("incident-"):
        return {"status": "ignored", "reason": "not an acknowledge or resolve of ours"}
    incident_id = incident_key.split("/")[0]  # "<incident id>/<level>" for a level's service
    agent = event.agent or _Agent()
    user = agent.summary or agent.email or agent.id or "someone"
    handle = svc.temporal.get_workflow_handle(incident_id)
    action = ActionRequest(user=f"{user} (PagerDuty)", channel="pagerduty")
    try:
        async with asyncio.timeout(ANSWER_WITHIN_SECONDS):
            await handle.execute_update(update, action)
    except WorkflowUpdateFailedError as exc:  # already acknowledged or resolved: once is enough
        return {"status": "ignored", "reason": str(getattr(exc.cause, "message", exc.cause))}
    except RPCError as exc:
        if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            return {"status": "ignored", "reason": f"{incident_id}: {exc.status.name}"}
        log.warning("PagerDuty %s for %s not applied: %s", event.event_type, incident_id, exc)
        raise _try_again() from exc
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError, RuntimeError) as exc:
        # RuntimeError: a lazy client that cannot reach Temporal. PagerDuty retries a 5xx.
        log.warning("PagerDuty %s for %s not applied yet", event.event_type, incident_id)
        raise _try_again() from exc
    return {"status": "applied", "incident": incident_id}
