"""Setting and reverting runbook controls (throttle, reroute, pin, cap tokens, disable, cache,
backoff) in the controls store, idempotently: a retried activity lands on the same control.

The instrumentation of every process reads the store every few seconds and enforces what is
active (pagerloop_sdk.controls).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from stores import controls as store

# How long a control stays in force unless its incident keeps extending it.
CONTROL_TTL_SECONDS = 4 * 3600


@dataclass
class ControlSpec:
    """One control a runbook wants in force.

    kind: concurrency | reroute | pin | max_tokens | disable | cache | backoff
    feature / model: what the control applies to (None: any feature / any model)
    value: concurrency -> max calls in flight ("4"); reroute / pin -> the model to use instead
      ("gpt-4.1-mini" / "gpt-4.1-2025-04-14"); max_tokens -> the cap ("512");
      backoff -> max attempts on a 429 ("5"); disable / cache -> "".
    fraction: the share of the calls in the target it applies to, 0 < fraction < 1 (a canary:
      each session stays on one side); None: all of them. Setting the same control again
      with None promotes the canary to all traffic.
    """

    kind: str
    feature: str | None = None
    model: str | None = None
    value: str = ""
    reason: str = ""
    ttl_seconds: int = CONTROL_TTL_SECONDS
    fraction: float | None = None


@dataclass
class SetControl:
    incident_id: str
    spec: ControlSpec
    set_by: str  # "runbook:rate_limit_exhaustion", or a user


@dataclass
class ControlRef:
    id: int
    key: str  # idempotency key: "<incident>/<kind>/<feature or *>/<model or *>"
    kind: str
    feature: str | None
    model: str | None
    value: str
    description: str  # one line for Slack / Jira / CLI, e.g. "reroute gpt-4.1 -> gpt-4.1-mini"
    # Last and defaulted: payloads recorded before canaries existed still decode.
    fraction: float | None = None  # None: all traffic in the target


@dataclass
class RevertControls:
    incident_id: str
    keys: list[str] | None = None  # None: every active control of the incident
    reason: str = ""
    reverted_by: str = "pagerloop"


@dataclass
class ExtendControls:
    incident_id: str
    ttl_seconds: int = CONTROL_TTL_SECONDS


@dataclass
class ControlList:
    controls: list[ControlRef] = field(default_factory=list)


def control_ref(control: store.Control) -> ControlRef:
    assert control.id is not None
    return ControlRef(
        id=control.id,
        key=control.key,
        kind=control.kind,
        feature=control.feature,
        model=control.model,
        value=control.value,
        description=control.description,
        fraction=control.fraction,
    )


class ControlActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="controls.set")
    async def set(self, request: SetControl) -> ControlRef:
        """Put a control in force (or refresh it: value, reason, expiry and fraction),
        idempotently."""
        spec = request.spec
        problem = store.validate(spec.kind, spec.value)
        if problem is None and spec.ttl_seconds <= 0:
            problem = f"a control needs a positive ttl_seconds, not {spec.ttl_seconds}"
        if problem is None:
            problem = store.fraction_problem(spec.fraction)
        if problem is not None:
            raise ApplicationError(problem, type="InvalidControl", non_retryable=True)
        now = datetime.now(UTC)
        control = await asyncio.to_thread(
            store.upsert,
            self._engine,
            incident_id=request.incident_id,
            kind=spec.kind,
            feature=spec.feature,
            model=spec.model,
            value=spec.value,
            reason=spec.reason,
            set_by=request.set_by,
            expires_at=now + timedelta(seconds=spec.ttl_seconds),
            now=now,
            fraction=spec.fraction,
        )
        return control_ref(control)

    @activity.defn(name="controls.revert")
    async def revert(self, request: RevertControls) -> ControlList:
        """Take the incident's controls (or those of `keys`) out of force; returns those this
        call reverted, so a retry reports nothing twice."""
        reverted = await asyncio.to_thread(
            store.revert,
            self._engine,
            request.incident_id,
            datetime.now(UTC),
            keys=request.keys,
            reverted_by=request.reverted_by,
            reason=request.reason,
        )
        return ControlList([control_ref(c) for c in reverted])

    @activity.defn(name="controls.extend")
    async def extend(self, request: ExtendControls) -> ControlList:
        """Keep the incident's controls in force `ttl_seconds` more (idempotent)."""
        now = datetime.now(UTC)
        until = now + timedelta(seconds=request.ttl_seconds)
        found = await asyncio.to_thread(store.extend, self._engine, request.incident_id, now, until)
        return ControlList([control_ref(c) for c in found])

    @activity.defn(name="controls.list")
    async def list_for(self, incident_id: str) -> ControlList:
        """The incident's controls in force now."""
        found = await asyncio.to_thread(store.active, self._engine, datetime.now(UTC), incident_id)
        return ControlList([control_ref(c) for c in found])
