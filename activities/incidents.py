"""Opening incidents: one update-with-start per breach, one open incident per trigger + scope,
none while a silence covers them; and telling open incidents that their signal recovered.

One problem, one incident (detectors/correlation.py decides, this carries it out): a breach
that joins the open incident of a wider problem is noted there; one that takes in the open
incidents of narrower problems merges them into its own, which (opening now) takes over the
first one's Slack message, PagerDuty alert and Jira ticket.

The incident workflow is started and updated by name (domain.workflow_names): activities sit
below the workflows that call them and never import one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from temporalio import activity
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from domain import search_attributes as sa
from domain.incident import (
    Breach,
    BreachReceipt,
    CarriedState,
    Handover,
    IncidentInput,
    IncidentResult,
    IncidentState,
    IncidentStatus,
    MergeRequest,
    NotificationPlan,
    Recovery,
    ReopenRequest,
)
from domain.incident_machine import reopen_refusal
from domain.workflow_names import (
    ABSORB,
    INCIDENT_WORKFLOW,
    MERGE_INTO,
    REOPEN,
    REPORT_BREACH,
    REPORT_RECOVERY,
    REPORT_RELATED,
    detector_workflow_id,
)
from stores import silences

log = logging.getLogger(__name__)


@dataclass
class OpenIncidentRequest:
    breach: Breach
    # Made by the detector from its own clock, so an activity retry after a crash lands on
    # the incident the first attempt started.
    proposed_id: str
    # The open incident the detector has on record for this trigger + scope, if any.
    known_id: str | None = None
    # The open incident of a wider problem this breach joins (noted there; nothing opens) ...
    joins: str | None = None
    # ... or the open incidents of narrower problems the breach's incident takes in.
    absorbs: list[str] = field(default_factory=list)
    # Its own incident resolved within the rule's cooldown: reopened rather than a new one.
    reopen: str | None = None
    cooldown_seconds: int = 0


@dataclass
class OpenIncidentResult:
    incident_id: str | None  # the open incident that took the breach; None: none did
    opened: bool = False
    silenced_by: int | None = None
    silence_reason: str | None = None
    joined: bool = False  # noted on the wider problem's incident (`joins`)
    merged: list[str] = field(default_factory=list)  # the `absorbs` now merged into it
    reopened: bool = False  # `incident_id` is the resolved incident `reopen` named, back
    # Which episode of `incident_id` took the breach (BreachReceipt.reopened): one that has
    # closed since is over, one reopened after a close is not.
    episode: int = 0
    # That incident's resolved run is still finishing: nothing opened, ask again next time.
    reopen_pending: bool = False


@dataclass
class RecoveryReport:
    incident_id: str
    recovery: Recovery


@dataclass
class RecoveryResults:
    told: list[str] = field(default_factory=list)


def _unless_over(exc: Exception) -> None:
    """Raise `exc` unless it says the incident is over: refused (resolved) or closed."""
    if isinstance(exc, RPCError) and exc.status != RPCStatusCode.NOT_FOUND:
        raise exc


def open_incidents_query(task_queue: str) -> str:
    """Visibility query for this deployment's running incidents."""
    return (
        f"WorkflowType = '{INCIDENT_WORKFLOW}' AND ExecutionStatus = 'Running' "
        f"AND TaskQueue = {sa.literal(task_queue)}"
    )


def _open_again(state: IncidentState, breach: Breach) -> bool:
    """A reopened incident of this trigger and scope, open again (not resolved since)."""
    return (
        state.reopened > 0
        and state.status != IncidentStatus.RESOLVED
        and state.merged_into is None
        and (state.trigger, state.scope) == (breach.trigger, breach.scope)
    )


def incident_summary(breach: Breach) -> str:
    return f"{breach.severity} {breach.trigger} · {breach.scope} · {breach.summary}"


class IncidentActivities:
    def __init__(
        self, client: Client, task_queue: str, plan: NotificationPlan, engine: Engine
    ) -> None:
        self._client = client
        self._task_queue = task_queue
        self._plan = plan
        self._engine = engine

    @activity.defn(name="incidents.open_or_update")
    async def open_or_update(self, requests: list[OpenIncidentRequest]) -> list[OpenIncidentResult]:
        return [await self._open_or_update(request) for request in requests]

    @activity.defn(name="incidents.report_recovery")
    async def report_recovery(self, reports: list[RecoveryReport]) -> RecoveryResults:
        told = RecoveryResults()
        for report in reports:
            handle = self._client.get_workflow_handle(report.incident_id)
            try:
                await handle.execute_update(
                    REPORT_RECOVERY, report.recovery, result_type=IncidentState
                )
            except (WorkflowUpdateFailedError, RPCError) as exc:
                log.info("incident %s not told of recovery: %s", report.incident_id, exc)
                continue
            told.told.append(report.incident_id)
        return told

    async def _open_or_update(self, request: OpenIncidentRequest) -> OpenIncidentResult:
        breach = request.breach
        if request.joins and (related := await self._related(request.joins, breach)):
            # Its own incident, if it had one, is the wider one's too now.
            merged = []
            if request.known_id:
                wider: IncidentState = await self._client.get_workflow_handle(request.joins).query(
                    "state", result_type=IncidentState
                )
                merged = await self._absorb_into(
                    MergeRequest(request.joins, wider.trigger, wider.scope), [request.known_id]
                )
            return OpenIncidentResult(
                request.joins, joined=True, merged=merged, episode=related.reopened
            )
        # (a wider incident that is over leaves the breach a problem of its own)
        known = request.known_id
        resolved = None  # the detector's incident on record, found over
        took = await self._report(known, breach) if known else None
        if took is None:
            resolved = known
            known = await self._find_open(breach)
            took = await self._report(known, breach) if known else None
        if known is not None and took is not None:
            into = MergeRequest(known, breach.trigger, breach.scope)
            merged = await self._absorb_into(into, request.absorbs)
            return OpenIncidentResult(known, merged=merged, episode=took.reopened)
        silence = await asyncio.to_thread(
            silences.matching, self._engine, breach.trigger, breach.scope, breach.observed_at
        )
        if silence is not None:
            return OpenIncidentResult(None, silenced_by=silence.id, silence_reason=silence.reason)
        if request.cooldown_seconds > 0:
            # The incident it closed, or the one on record that turned out resolved (the
            # detector hears of the close only once its run ends).
            for candidate in dict.fromkeys(c for c in (request.reopen, resolved) if c):
                reopened = await self._reopen(candidate, breach, request.cooldown_seconds)
                if reopened is not None:
                    if reopened.incident_id is not None:
                        into = MergeRequest(reopened.incident_id, breach.trigger, breach.scope)
                        reopened.merged = await self._absorb_into(into, request.absorbs)
                    return reopened
        handovers: list[Handover] = []
        for target in request.absorbs:
            # The first one merged hands over where people were told of it.
            into = MergeRequest(request.proposed_id, breach.trigger, breach.scope, not handovers)
            if (handover := await self._merge(target, into)) is not None:
                handovers.append(handover)
        receipt = await self._report(request.proposed_id, breach, handovers)
        if receipt is None:  # that id belongs to an incident resolved in the meantime
            return OpenIncidentResult(None)
        opened = receipt.breach_count == 1
        if not opened:  # already running (a retry): it was not started with them
            for handover in handovers:
                await self._update(request.proposed_id, ABSORB, handover)
        merged = [handover.incident_id for handover in handovers]
        return OpenIncidentResult(
            request.proposed_id, opened=opened, merged=merged, episode=receipt.reopened
        )

    async def _reopen(
        self, incident_id: str, breach: Breach, cooldown_seconds: int
    ) -> OpenIncidentResult | None:
        """A new run of the resolved incident, started with its final state, takes the breach
        and comes back. None: it cannot be reopened (merged, gone, past the cooldown), so a
        new incident opens."""
        handle = self._client.get_workflow_handle(incident_id)
        try:
            state: IncidentState = await handle.query("state", result_type=IncidentState)
        except (WorkflowQueryFailedError, RPCError) as exc:
            if isinstance(exc, RPCError) and exc.status != RPCStatusCode.NOT_FOUND:
                raise
            log.info("incident %s not reopened: %s", incident_id, exc)
            return None
        refused = reopen_refusal(state, breach, cooldown_seconds, breach.observed_at)
        if refused is not None:
            if _open_again(state, breach) and (took := await self._report(incident_id, breach)):
                # Reopened already (an earlier attempt of this activity): it takes the breach.
                return OpenIncidentResult(incident_id, reopened=True, episode=took.reopened)
            log.info("incident %s not reopened: %s", incident_id, refused)
            return None
        start = self._start(
            IncidentInput(
                incident_id=incident_id,
                trigger=state.trigger,
                scope=state.scope,
                severity=state.severity,
                opened_at=state.opened_at,
                notify=self._plan,
                detector_workflow_id=detector_workflow_id(self._task_queue),
                carried=CarriedState(state),
                reopen=True,
            ),
            breach,
            state.status,
            state.level,
            # The closed run's id again: the incident keeps its id, its history its runs.
            WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        )
        try:
            receipt: BreachReceipt = await self._client.execute_update_with_start_workflow(
                REOPEN,
                ReopenRequest(breach, cooldown_seconds),
                start_workflow_operation=start,
                result_type=BreachReceipt,
            )
        except WorkflowUpdateFailedError as exc:
            # A run that was not started to reopen it refused: the resolved one, still writing
            # its report; or a reopened one (this is a retry), which takes the breach.
            if (took := await self._report(incident_id, breach)) is not None:
                return OpenIncidentResult(incident_id, reopened=True, episode=took.reopened)
            log.info("incident %s not reopened yet: %s", incident_id, exc)
            return OpenIncidentResult(None, reopen_pending=True)
        return OpenIncidentResult(incident_id, reopened=True, episode=receipt.reopened)

    async def _absorb_into(self, into: MergeRequest, targets: list[str]) -> list[str]:
        """Merge `targets` into the running incident `into.into`, which keeps its own message,
        alert and ticket (theirs are updated to say where the problem went)."""
        merged: list[str] = []
        for target in targets:
            handover = await self._merge(target, into)
            if handover is not None and await self._update(into.into, ABSORB, handover):
                merged.append(target)
        return merged

    async def _merge(self, target: str, request: MergeRequest) -> Handover | None:
        """Merge `target` into `request.into`; what it hands over, or None when it is over
        (resolved by someone, or merged elsewhere). A retry finds it merged: its final state
        says what it handed over."""
        handle = self._client.get_workflow_handle(target)
        try:
            handover: Handover = await handle.execute_update(
                MERGE_INTO, request, result_type=Handover
            )
            return handover
        except (WorkflowUpdateFailedError, RPCError) as exc:
            _unless_over(exc)
            state: IncidentState | None = None
            with contextlib.suppress(WorkflowQueryFailedError):
                state = await handle.query("state", result_type=IncidentState)
            if state is not None and state.merged_into == request.into:
                return state.handover(request.hand_over)
            log.info("incident %s not merged into %s: %s", target, request.into, exc)
            return None

    async def _related(self, incident_id: str, breach: Breach) -> BreachReceipt | None:
        """Note `breach` on the running incident of a wider problem; None when it is over."""
        try:
            receipt: BreachReceipt = await self._client.get_workflow_handle(
                incident_id
            ).execute_update(REPORT_RELATED, breach, result_type=BreachReceipt)
        except (WorkflowUpdateFailedError, RPCError) as exc:
            _unless_over(exc)
            log.info("incident %s did not take %s: %s", incident_id, REPORT_RELATED, exc)
            return None
        return receipt

    async def _update(self, incident_id: str, update: str, arg: object) -> bool:
        """Whether the running incident took the update (not when it is over; any other
        failure raises, so that the activity is retried)."""
        try:
            await self._client.get_workflow_handle(incident_id).execute_update(update, arg)
        except (WorkflowUpdateFailedError, RPCError) as exc:
            _unless_over(exc)
            log.info("incident %s did not take %s: %s", incident_id, update, exc)
            return False
        return True

    async def _report(
        self, incident_id: str, breach: Breach, absorbs: list[Handover] | None = None
    ) -> BreachReceipt | None:
        """Update-with-start: the breach lands on the running incident or starts it (taking in
        `absorbs`). None when that incident is over (closed, or running but resolved)."""
        start = self._start(
            IncidentInput(
                incident_id=incident_id,
                trigger=breach.trigger,
                scope=breach.scope,
                severity=breach.severity,
                opened_at=breach.observed_at,
                notify=self._plan,
                detector_workflow_id=detector_workflow_id(self._task_queue),
                absorbs=absorbs or [],
            ),
            breach,
            IncidentStatus.DETECTED,
            1,
            WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
        try:
            receipt: BreachReceipt = await self._client.execute_update_with_start_workflow(
                REPORT_BREACH, breach, start_workflow_operation=start, result_type=BreachReceipt
            )
        except (WorkflowAlreadyStartedError, WorkflowUpdateFailedError, RPCError) as exc:
            # Closed (servers differ in how they say so), or running but already resolved.
            if isinstance(exc, RPCError) and exc.status != RPCStatusCode.ALREADY_EXISTS:
                raise
            log.info("incident %s is over (%s)", incident_id, exc)
            return None
        return receipt

    def _start(
        self,
        input: IncidentInput,
        breach: Breach,
        status: IncidentStatus,
        level: int,
        reuse: WorkflowIDReusePolicy,
    ) -> WithStartWorkflowOperation[Any, IncidentResult]:
        """The incident workflow's start, for an update-with-start: a run already going on
        under its id takes the update instead."""
        return WithStartWorkflowOperation(
            INCIDENT_WORKFLOW,
            input,
            id=input.incident_id,
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=reuse,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(sa.INCIDENT_STATUS, str(status)),
                    SearchAttributePair(sa.INCIDENT_SEVERITY, str(breach.severity)),
                    SearchAttributePair(sa.INCIDENT_TRIGGER, str(breach.trigger)),
                    SearchAttributePair(sa.INCIDENT_SCOPE, breach.scope),
                    SearchAttributePair(sa.INCIDENT_LEVEL, level),
                ]
            ),
            static_summary=incident_summary(breach),
            result_type=IncidentResult,
        )

    async def _find_open(self, breach: Breach) -> str | None:
        query = (
            f"{open_incidents_query(self._task_queue)} "
            f"AND IncidentTrigger = {sa.literal(breach.trigger)} "
            f"AND IncidentScope = {sa.literal(breach.scope)} "
            f"AND IncidentStatus != '{IncidentStatus.RESOLVED}'"
        )
        try:
            async for execution in self._client.list_workflows(query, limit=1):
                return execution.id
        except RPCError as exc:
            if exc.status != RPCStatusCode.UNIMPLEMENTED:  # a server without visibility
                raise
        return None
