"""/v1/controls: the controls in force for an app instance, and controls set by hand.

`GET /v1/controls` (ingest key, header `X-Pagerloop-Instance`) is what the SDK of every app
process polls (every 2 s): the active controls, where a `concurrency`, `rpm` or `tpm` value is
already this instance's share of the app-wide limit (stores.instances.share; `limit` holds the
whole app's). The answer carries a strong `ETag`; `If-None-Match` with it answers 304 without
a body. Every poll records the instance, a 304 too. A canary (a control with a `fraction`) is
served only to an SDK that declares it can slice the traffic (`X-Pagerloop-Capabilities:
fraction`): an older one would apply it to every call, so it gets the controls without the
canaries, and its calls count among the rest the canary is compared with. The ETag depends on
the capabilities, so an old and a new SDK never share an answer. Nothing is cached across
requests: API replicas share the stores and answer alike.

`POST /v1/controls` (operator key) sets a control by hand, for `duration_minutes`. Tied to an
incident (`incident_id`), it is written on the incident's timeline (the `add_note` update) and
reverted with the incident's controls when it resolves, but the incident's keep-alive never
extends it. `pagerloop controls set` goes through `set_by_hand` here too, minus HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response, status
from fastapi.exceptions import HTTPException, RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy import Engine
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from api.auth import Operator, require_ingest_key
from api.bodies import JsonBody
from api.bounds import Storable, Text128, Text1000
from api.deps import Services, services
from api.errors import INGEST_ERRORS, OPERATOR_ERRORS, RETRY_AFTER_SECONDS
from domain import search_attributes as sa
from domain.incident import ActionRequest, IncidentStatus
from stores import controls, instances
from stores.controls import Control
from stores.llm_calls import utc
from workflows.incident import IncidentWorkflow

log = logging.getLogger(__name__)
router = APIRouter()

INSTANCE_HEADER = "X-Pagerloop-Instance"
CAPABILITIES_HEADER = "X-Pagerloop-Capabilities"
FRACTION = "fraction"  # the capability of SDKs that enforce canaries
INSTANCE_PATTERN = r"^[A-Za-z0-9._:-]+$"
MAX_CONTROL_MINUTES = 7 * 24 * 60
VALUE_MAX = 200  # the store's column
INCIDENT_ID_MAX = 200
# How long setting a control waits for its incident (to check it, then to note it).
INCIDENT_PATIENCE_SECONDS = 10.0
# Kinds that would stop every call of the app without a feature or a model to aim at.
NEEDS_TARGET = frozenset({"disable"})
# Kinds whose value means nothing: stored empty.
NO_VALUE = frozenset({"disable", "cache"})

InstanceId = Annotated[
    str,
    Header(
        alias=INSTANCE_HEADER,
        min_length=1,
        max_length=instances.INSTANCE_ID_MAX,
        pattern=INSTANCE_PATTERN,
        description="this app process's id, stable for its life (letters, digits, . _ : -)",
    ),
]


class ControlOut(BaseModel):
    """A control in force. `value` is a string as stored; for `concurrency`, `rpm` and `tpm`
    in `GET /v1/controls` it is the calling instance's share of `limit`, the whole app's
    (which may leave it "0" for a moment: wait, do not call). `limit` is null for other kinds.
    `incident_id` is null for a control set by hand for no incident."""

    id: int
    kind: str
    feature: str | None
    model: str | None
    value: str
    limit: int | None
    expires_at: datetime
    incident_id: str | None
    reason: str
    fraction: float | None = None  # the share of the target's calls it applies to; null: all


class ControlsOut(BaseModel):
    controls: list[ControlOut]
    instances: int  # the app instances live now, this one included


class ControlSet(ControlOut):
    """A control as set by hand: `value` is the whole app's, as given (and `limit` too, for
    `concurrency`, `rpm` and `tpm`). `noted`: whether the incident's timeline records it (null
    without an incident; false when the incident did not answer in time: the control is in
    force all the same)."""

    set_by: str
    created_at: datetime
    noted: bool | None = None


def _out(control: Control) -> ControlOut:
    assert control.id is not None
    shared = (
        control.kind in controls.SHARED and controls.validate(control.kind, control.value) is None
    )
    return ControlOut(
        id=control.id,
        kind=control.kind,
        feature=control.feature,
        model=control.model,
        value=control.value,
        limit=int(control.value) if shared else None,
        expires_at=utc(control.expires_at),
        incident_id=None
        if control.manual and control.incident_id == controls.MANUAL
        else control.incident_id,
        reason=control.reason,
        fraction=control.fraction,
    )


def capabilities(header: str | None) -> frozenset[str]:
    """The capabilities an SDK declares: a comma-separated list, any case and spacing."""
    if not header:
        return frozenset()
    return frozenset(p.strip().lower() for p in header.split(",") if p.strip())


def in_force_for(
    found: list[Control],
    instance_id: str,
    live: list[instances.Live],
    now: datetime,
    can: frozenset[str] = frozenset(),
) -> ControlsOut:
    """The answer of `GET /v1/controls` for `instance_id`, whose SDK declares `can` (pure)."""
    shown = []
    for control in found:
        if control.fraction is not None and FRACTION not in can:
            continue  # an SDK that cannot slice would apply the canary to every call
        out = _out(control)
        if out.limit is not None:
            out.value = str(instances.share(out.limit, instance_id, live, now))
        shown.append(out)
    return ControlsOut(controls=shown, instances=len({name for name, _ in live} | {instance_id}))


def _poll(
    engine: Engine, instance_id: str, now: datetime
) -> tuple[list[Control], list[instances.Live]]:
    live = instances.poll(engine, instance_id, now)
    return controls.active(engine, now), live


def etag_of(body: bytes, can: frozenset[str] = frozenset()) -> str:
    """Of the body and of the capabilities it was made for: the same body may mean something
    else to an SDK that cannot do what another can."""
    digest = hashlib.sha256(body)
    digest.update(b"\x00" + ",".join(sorted(can)).encode())
    return '"' + digest.hexdigest()[:32] + '"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (weak comparison, as RFC 9110 says)."""
    if if_none_match is None:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


@router.get(
    "/v1/controls",
    dependencies=[Depends(require_ingest_key)],
    response_model=ControlsOut,
    responses={
        **INGEST_ERRORS,
        304: {"description": "unchanged since the ETag sent in If-None-Match"},
        422: {"description": f"{INSTANCE_HEADER} missing or not an instance id"},
    },
)
async def controls_in_force(
    instance_id: InstanceId,
    svc: Annotated[Services, Depends(services)],
    if_none_match: Annotated[str | None, Header(max_length=8_000)] = None,
    x_pagerloop_capabilities: Annotated[
        str | None,
        Header(
            max_length=1_000,
            description='what the SDK can enforce, comma-separated: "fraction" (canaries)',
        ),
    ] = None,
) -> Response:
    """The controls in force for the calling app instance, its shares of app-wide limits;
    canaries only for an SDK declaring the `fraction` capability."""
    now = datetime.now(UTC)
    can = capabilities(x_pagerloop_capabilities)
    found, live = await asyncio.to_thread(_poll, svc.engine, instance_id, now)
    body = in_force_for(found, instance_id, live, now, can).model_dump_json().encode()
    etag = etag_of(body, can & {FRACTION})
    headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": CAPABILITIES_HEADER}
    if matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


# --- setting a control by hand ---------------------------------------------------------------


class ControlIn(BaseModel):
    """A control set by hand; the author is the operator key's name, not a field.

    kind: one of concurrency, rpm, tpm, reroute, pin, max_tokens, disable, cache, backoff.
    value: a whole number from 1 for concurrency / rpm / tpm (the whole app's limit),
      max_tokens and backoff; the model to use instead for reroute and pin; ignored for
      disable and cache (may be left out).
    feature / model: what it applies to; left out, every feature / every model. A `disable`
      needs one or the other (disabling every call of the app is not a control); every other
      kind may apply to all calls (an app-wide rpm, a global reroute during an outage).
    duration_minutes: 1 to 10080 (7 days). reason: 1 to 1000 characters.
    fraction: between 0 and 1 (exclusive): a canary, applied to that share of the calls in the
      target, each session staying on one side (only SDKs that can slice get it); left out or
      null, all calls. Setting the same control again without it promotes it to all calls.
    incident_id: an open incident: the control goes on its timeline and is reverted with the
      incident's controls when it resolves (the incidents of a trigger with a runbook: others
      revert nothing), never extended by it (404 when there is no such incident, 409 when it
      is resolved). Without one, the control is the incident "manual"'s and just expires.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Annotated[str, Field(min_length=1, max_length=32)]
    feature: Text128 | None = None
    model: Text128 | None = None
    value: Annotated[str, Field(max_length=VALUE_MAX), Storable] = ""
    duration_minutes: int = Field(ge=1, le=MAX_CONTROL_MINUTES)
    reason: Text1000
    incident_id: (
        Annotated[str, Field(min_length=1, max_length=INCIDENT_ID_MAX), Storable] | None
    ) = None
    fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = None

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in controls.KINDS:
            raise ValueError(f"unknown control kind (one of {', '.join(controls.KINDS)})")
        return kind

    @field_validator("value")
    @classmethod
    def _enforceable(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        if kind is None:  # the kind's own error says it
            return value
        if kind in NO_VALUE:
            return ""
        problem = controls.validate(kind, value)
        if problem is not None:
            raise ValueError(problem)
        return value


CONTROL = JsonBody[ControlIn]("ControlIn", ControlIn)


def refused(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


def target_problem(kind: str, feature: str | None, model: str | None) -> str | None:
    if kind in NEEDS_TARGET and feature is None and model is None:
        return f"a {kind} control needs a feature or a model (it would stop every call)"
    return None


def key_problem(
    incident_id: str | None, kind: str, feature: str | None, model: str | None
) -> str | None:
    if len(controls.manual_key(incident_id, kind, feature, model)) > controls.KEY_MAX:
        return "too long together with the feature and the model"
    return None


class IncidentRefusedError(Exception):
    """The incident a control names cannot take it: `status` is the HTTP answer (404 none,
    409 resolved, 503 unreachable)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


async def check_incident(
    client: Client, incident_id: str, patience: float = INCIDENT_PATIENCE_SECONDS
) -> None:
    """Raise IncidentRefusedError unless `incident_id` is an incident still open."""
    try:
        async with asyncio.timeout(patience):
            described = await client.get_workflow_handle(incident_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise IncidentRefusedError(404, f"no incident {incident_id!r}") from None
        raise IncidentRefusedError(
            503, f"could not reach incident {incident_id!r} ({exc.status.name}); try again"
        ) from None
    except (TimeoutError, RuntimeError):  # RuntimeError: a lazy client that cannot connect
        raise IncidentRefusedError(
            503, f"could not reach incident {incident_id!r} (Temporal did not answer); try again"
        ) from None
    if described.workflow_type != IncidentWorkflow.__name__:
        raise IncidentRefusedError(404, f"no incident {incident_id!r}")
    state = described.typed_search_attributes.get(sa.INCIDENT_STATUS)
    if described.status != WorkflowExecutionStatus.RUNNING or state == IncidentStatus.RESOLVED:
        raise IncidentRefusedError(409, f"incident {incident_id!r} is already resolved")


def note_text(control: Control, minutes: int) -> str:
    return f"control #{control.id} set by hand for {minutes} min: {control.description}" + (
        f" ({control.reason})" if control.reason else ""
    )


async def note_on_incident(
    client: Client,
    incident_id: str,
    request: ActionRequest,
    patience: float = INCIDENT_PATIENCE_SECONDS,
) -> bool:
    """Add the note to the incident's timeline: True once there, False when the incident did
    not answer in time; IncidentRefusedError (409) when it refused (resolved meanwhile)."""
    try:
        async with asyncio.timeout(patience):
            await client.get_workflow_handle(incident_id).execute_update(
                IncidentWorkflow.add_note, request
            )
    except WorkflowUpdateFailedError as exc:
        cause = getattr(exc.cause, "message", None) or str(exc.cause)
        raise IncidentRefusedError(409, f"incident {incident_id!r} refused it: {cause}") from None
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise IncidentRefusedError(409, f"incident {incident_id!r} is closed") from None
        log.warning("could not note a control on %s: %s", incident_id, exc.status.name)
        return False
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError, RuntimeError):
        log.warning("incident %s did not take the note of a control in time", incident_id)
        return False
    return True


async def set_by_hand(
    engine: Engine,
    client: Client | None,
    body: ControlIn,
    set_by: str,
    channel: str,
    now: datetime,
) -> tuple[Control, bool | None]:
    """Check the incident (if any), write the control, note it on the incident's timeline.
    The control and whether the timeline has it (None: no incident). IncidentRefusedError when the
    incident cannot take it: nothing is left in force then. `client` is needed only with an
    incident."""
    if body.incident_id is not None:
        if client is None:
            raise IncidentRefusedError(503, "Temporal is needed to reach an incident")
        await check_incident(client, body.incident_id)
    control = await asyncio.to_thread(
        controls.set_manual,
        engine,
        incident_id=body.incident_id,
        kind=body.kind,
        feature=body.feature,
        model=body.model,
        value=body.value,
        reason=body.reason,
        set_by=set_by,
        expires_at=now + timedelta(minutes=body.duration_minutes),
        now=now,
        fraction=body.fraction,
    )
    if body.incident_id is None or client is None:
        return control, None
    request = ActionRequest(set_by, channel, note_text(control, body.duration_minutes))
    try:
        noted = await note_on_incident(client, body.incident_id, request)
    except IncidentRefusedError:
        # Resolved between the check and now: its revert may have come before this control.
        assert control.id is not None
        await asyncio.to_thread(
            controls.revert_id,
            engine,
            control.id,
            datetime.now(UTC),
            reverted_by=set_by,
            reason="its incident was resolved meanwhile",
        )
        raise
    return control, noted


def control_set(control: Control, noted: bool | None) -> ControlSet:
    return ControlSet(
        **_out(control).model_dump(),
        set_by=control.set_by,
        created_at=utc(control.created_at),
        noted=noted,
    )


@router.post(
    "/v1/controls",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=CONTROL.openapi,
    responses={
        **OPERATOR_ERRORS,
        404: {"description": "no such incident"},
        409: {"description": "the incident is already resolved"},
    },
)
async def set_control(
    request: Request, author: Operator, svc: Annotated[Services, Depends(services)]
) -> ControlSet:
    """Set a control by hand (see ControlIn for the fields and their bounds)."""
    body = await CONTROL.parse(request)  # after the key is checked
    for field, problem in (
        ("feature", target_problem(body.kind, body.feature, body.model)),
        ("incident_id", key_problem(body.incident_id, body.kind, body.feature, body.model)),
    ):
        if problem is not None:
            raise refused(field, problem)
    try:
        control, noted = await set_by_hand(
            svc.engine, svc.temporal, body, author, "api", datetime.now(UTC)
        )
    except IncidentRefusedError as exc:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status_code == 503 else None
        raise HTTPException(exc.status_code, exc.message, headers=headers) from None
    return control_set(control, noted)
