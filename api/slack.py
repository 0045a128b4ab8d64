"""POST /slack/interactions: a button click on an incident message (or on a runbook step's ask
for approval, in its thread) becomes a workflow update."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, Field, ValidationError
from slack_sdk.signature import SignatureVerifier
from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from activities.slack import (
    ACK_ACTION,
    APPROVE_ACTION,
    DENY_ACTION,
    ESCALATE_ACTION,
    RESOLVE_ACTION,
    RESOLVE_KEEP_ACTION,
    SNOOZE_ACTION,
    SNOOZE_MINUTES,
    parse_approval_value,
    post_ephemeral,
)
from api.bounds import Storable
from api.deps import Services, services
from api.errors import problems, store_unavailable
from api.telemetry import REJECTED_REQUESTS, SLACK_ACTIONS
from domain.incident import ActionRequest, ApprovalDecision, SnoozeRequest
from domain.incident_machine import slack_user_refusal
from stores import replay_guard
from workflows.incident import IncidentWorkflow

log = logging.getLogger(__name__)
router = APIRouter()

# Slack gives up on an interaction after 3 s: answer by then (counted from the request's
# arrival), whatever the update is doing.
ANSWER_WITHIN_SECONDS = 2.3
# An update still pending then (a worker restarting, Temporal slow) goes on in the background.
UPDATE_PATIENCE_SECONDS = 60
_background: set[asyncio.Task[None]] = set()

UPDATES: dict[str, Any] = {
    ACK_ACTION: IncidentWorkflow.acknowledge,
    RESOLVE_ACTION: IncidentWorkflow.resolve,
    RESOLVE_KEEP_ACTION: IncidentWorkflow.resolve,
    ESCALATE_ACTION: IncidentWorkflow.escalate,
    SNOOZE_ACTION: IncidentWorkflow.snooze,
}
# Slack accepts a signed request for 5 minutes: within that time, one use per signature. The
# signatures used are kept in the stores, so that every API replica, and the next process after
# a restart, refuses a replay. A row is kept until the signature stops being accepted (its
# timestamp + 5 min), plus a margin for clocks of replicas that disagree a little.
REPLAY_WINDOW_SECONDS = 5 * 60
CLOCK_MARGIN_SECONDS = 60
# The store answers in milliseconds; one that does not answer by then is unavailable (503):
# Slack must hear back within 3 s, and a replay must not get through on a store outage. The
# API's engine gives up on a lock or a connection sooner (1.5 s / 2 s): this is the backstop.
REPLAY_CHECK_SECONDS = 2.0
# Threads of their own, so that a burst of ingest writes never queues a click behind it.
_REPLAY_CHECKS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="slack-replay")


def _verify(svc: Services, body: bytes, request: Request) -> tuple[str, int]:
    """The request's signature and timestamp, once both are valid; else a 401."""
    secret = svc.settings.slack_signing_secret
    timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
    signature = request.headers.get("X-Slack-Signature", "")
    if secret is None:
        REJECTED_REQUESTS.labels("slack", "no_signing_secret").inc()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Slack interactions are refused: PAGERLOOP_SLACK_SIGNING_SECRET is not set",
        )
    try:
        valid = signature.isascii() and SignatureVerifier(secret.get_secret_value()).is_valid(
            body, timestamp, signature
        )
    except (ValueError, TypeError):  # a timestamp that is not a number, non-ASCII text
        valid = False
    if not valid:
        REJECTED_REQUESTS.labels("slack", "bad_signature").inc()
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or stale Slack signature")
    return signature, int(timestamp)


async def _first_use(svc: Services, signature: str, signed_at: int) -> bool:
    """Take the signature in the stores' replay cache; False when it was already taken.
    Store errors (and a store slower than REPLAY_CHECK_SECONDS) propagate: a 503."""
    now = datetime.now(UTC)
    expires_at = datetime.fromtimestamp(signed_at, UTC) + timedelta(
        seconds=REPLAY_WINDOW_SECONDS + CLOCK_MARGIN_SECONDS
    )
    key = replay_guard.request_key("slack", signature)
    check = asyncio.get_running_loop().run_in_executor(
        _REPLAY_CHECKS, replay_guard.take, svc.engine, key, now, expires_at
    )
    return await asyncio.wait_for(check, REPLAY_CHECK_SECONDS)


class _Ref(BaseModel):
    id: Annotated[str, Field(max_length=64), Storable] = ""


class _Action(BaseModel):
    # Slack's own limits on block action ids and button values.
    action_id: Annotated[str, Field(max_length=255), Storable] = ""
    value: Annotated[str, Field(max_length=2000), Storable] = ""


class _Interaction(BaseModel):
    """The part of a Slack interactive payload we act on; Slack sends much more."""

    type: Annotated[str, Field(max_length=64)]
    user: _Ref = _Ref()
    channel: _Ref | None = None
    actions: Annotated[list[_Action], Field(max_length=25)] = []


def _payload(body: bytes) -> _Interaction:
    try:
        raw = parse_qs(body.decode(), strict_parsing=True)["payload"][0]
        return _Interaction.model_validate_json(raw)
    except ValidationError as exc:
        problem = problems(exc)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"payload: {problem}") from None
    except (KeyError, ValueError, UnicodeDecodeError):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "payload: not a Slack interaction (a form field `payload` holding JSON)",
        ) from None


@router.post("/slack/interactions")
async def slack_interactions(
    request: Request, svc: Annotated[Services, Depends(services)]
) -> Response:
    loop = asyncio.get_running_loop()
    answer_by = loop.time() + ANSWER_WITHIN_SECONDS  # the replay check counts too
    body = await request.body()
    signature, signed_at = _verify(svc, body, request)
    try:
        fresh = await _first_use(svc, signature, signed_at)
    except TimeoutError as exc:
        return await store_unavailable(request, exc)
    if not fresh:
        REJECTED_REQUESTS.labels("slack", "replayed").inc()
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this signed request was already used")
    payload = _payload(body)
    if payload.type != "block_actions":
        return Response(status_code=status.HTTP_200_OK)
    user = payload.user.id
    channel = payload.channel.id if payload.channel else ""
    for action in payload.actions:
        update = UPDATES.get(action.action_id)
        if action.action_id in (APPROVE_ACTION, DENY_ACTION):
            work = asyncio.create_task(
                _decide_and_tell(svc, action.action_id, action.value, user, channel)
            )
        elif update is not None:
            work = asyncio.create_task(
                _apply_and_tell(svc, update, action.action_id, action.value, user, channel)
            )
        else:
            continue
        _background.add(work)
        work.add_done_callback(_background.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(work), max(0.0, answer_by - loop.time()))
    return Response(status_code=status.HTTP_200_OK)


async def _apply_and_tell(
    svc: Services, update: Any, action_id: str, incident_id: str, user: str, channel: str
) -> None:
    refusal = slack_user_refusal(user, "slack", svc.settings.slack_allowed_users)
    if refusal is None:
        keep = action_id == RESOLVE_KEEP_ACTION
        refusal = await _apply(svc, update, incident_id, user, keep_controls=keep)
    SLACK_ACTIONS.labels(action_id, "refused" if refusal else "applied").inc()
    if refusal:
        await _tell(svc, channel, user, refusal)


async def _decide_and_tell(
    svc: Services, action_id: str, value: str, user: str, channel: str
) -> None:
    """Approve / Deny on a runbook step's ask; the workflow shows who decided on that message."""
    target = parse_approval_value(value)
    refusal = slack_user_refusal(user, "slack", svc.settings.slack_allowed_users)
    if target is None:
        refusal = "This button does not name a runbook step's approval."
    elif refusal is None:
        incident_id, approval_id = target
        decision = ApprovalDecision(
            approval_id, approved=action_id == APPROVE_ACTION, decided_by=user, channel="slack"
        )
        refusal = await _update(svc, IncidentWorkflow.decide_approval, incident_id, decision)
    SLACK_ACTIONS.labels(action_id, "refused" if refusal else "applied").inc()
    if refusal:
        await _tell(svc, channel, user, refusal)


async def _apply(
    svc: Services, update: Any, incident_id: str, user: str, keep_controls: bool = False
) -> str | None:
    """Run the update; return the reason it was refused or failed, if it was."""
    request: Any = ActionRequest(user=user, channel="slack", keep_controls=keep_controls)
    if update is IncidentWorkflow.snooze:
        request = SnoozeRequest(user=user, minutes=SNOOZE_MINUTES, channel="slack")
    return await _update(svc, update, incident_id, request)


async def _update(svc: Services, update: Any, incident_id: str, request: Any) -> str | None:
    handle = svc.temporal.get_workflow_handle(incident_id)
    try:
        async with asyncio.timeout(UPDATE_PATIENCE_SECONDS):
            await handle.execute_update(update, request)
    except WorkflowUpdateFailedError as exc:
        return str(getattr(exc.cause, "message", None) or exc.cause)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return f"Incident `{incident_id}` does not exist or is closed."
        log.warning("update on %s failed: %s", incident_id, exc)
        return f"Could not reach incident `{incident_id}` ({exc.status.name}); try again."
    except RuntimeError as exc:  # a lazy client that cannot connect
        log.warning("update on %s failed: %s", incident_id, exc)
        return f"Could not reach incident `{incident_id}` (Temporal is unreachable); try again."
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        log.warning("update on %s did not complete in %ss", incident_id, UPDATE_PATIENCE_SECONDS)
        return f"Incident `{incident_id}` did not answer in time; try again."
    return None


async def _tell(svc: Services, channel: str, user: str, text: str) -> None:
    if svc.slack is None or not channel or not user:
        return
    try:
        await asyncio.to_thread(post_ephemeral, svc.slack, channel, user, text)
    except Exception as exc:  # the click's answer must not fail on a side message
        log.warning("could not tell %s in Slack: %s", user, exc)
