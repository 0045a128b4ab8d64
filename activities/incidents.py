"""Opening incidents: one update-with-start per breach, one open incident per trigger + scope."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from temporalio import activity
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
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

from detectors.naming import detector_workflow_id
from workflows import search_attributes as sa
from workflows.incident import IncidentWorkflow
from workflows.incident_types import Breach, IncidentInput, IncidentStatus, NotificationPlan

log = logging.getLogger(__name__)


@dataclass
class OpenIncidentRequest:
    # Proposed by the detector and stable across activity retries, so a retry after a
    # crash lands on the incident the first attempt started.
    incident_id: str
    breach: Breach
    # The detector has no incident on record for this trigger + scope (first breach, or its
    # state was lost): join a running one if visibility knows it.
    join_open_incident: bool = True


@dataclass
class OpenIncidentResult:
    incident_id: str | None  # None: that incident is resolved, propose a new id
    opened: bool = False
    breach_count: int = 0


def open_incidents_query(task_queue: str) -> str:
    """Visibility query for this deployment's running incidents."""
    return (
        "WorkflowType = 'IncidentWorkflow' AND ExecutionStatus = 'Running' "
        f"AND TaskQueue = {sa.literal(task_queue)}"
    )


def incident_summary(breach: Breach) -> str:
    return f"{breach.severity} {breach.trigger} · {breach.scope} · {breach.summary}"


class IncidentActivities:
    def __init__(self, client: Client, task_queue: str, plan: NotificationPlan) -> None:
        self._client = client
        self._task_queue = task_queue
        self._plan = plan

    @activity.defn(name="incidents.open_or_update")
    async def open_or_update(self, request: OpenIncidentRequest) -> OpenIncidentResult:
        breach = request.breach
        incident_id = request.incident_id
        if request.join_open_incident:
            incident_id = await self._find_open(breach) or incident_id
        start = WithStartWorkflowOperation(
            IncidentWorkflow.run,
            IncidentInput(
                incident_id=incident_id,
                trigger=breach.trigger,
                scope=breach.scope,
                severity=breach.severity,
                opened_at=breach.observed_at,
                notify=self._plan,
                detector_workflow_id=detector_workflow_id(self._task_queue),
            ),
            id=incident_id,
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(sa.INCIDENT_STATUS, str(IncidentStatus.DETECTED)),
                    SearchAttributePair(sa.INCIDENT_SEVERITY, str(breach.severity)),
                    SearchAttributePair(sa.INCIDENT_TRIGGER, str(breach.trigger)),
                    SearchAttributePair(sa.INCIDENT_SCOPE, breach.scope),
                    SearchAttributePair(sa.INCIDENT_LEVEL, 1),
                ]
            ),
            static_summary=incident_summary(breach),
        )
        try:
            receipt = await self._client.execute_update_with_start_workflow(
                IncidentWorkflow.report_breach, breach, start_workflow_operation=start
            )
        except (WorkflowAlreadyStartedError, WorkflowUpdateFailedError, RPCError) as exc:
            # Closed (servers differ in how they say so), or running but already resolved.
            if isinstance(exc, RPCError) and exc.status != RPCStatusCode.ALREADY_EXISTS:
                raise
            log.info("incident %s is over (%s)", incident_id, exc)
            return OpenIncidentResult(incident_id=None)
        return OpenIncidentResult(
            incident_id=receipt.incident_id,
            opened=receipt.breach_count == 1,
            breach_count=receipt.breach_count,
        )

    async def _find_open(self, breach: Breach) -> str | None:
        query = (
            f"{open_incidents_query(self._task_queue)} "
            f"AND IncidentTrigger = {sa.literal(breach.trigger)} "
            f"AND IncidentScope = {sa.literal(breach.scope)} "
            f"AND IncidentStatus != '{IncidentStatus.RESOLVED}'"
        )
        async for execution in self._client.list_workflows(query, limit=1):
            return execution.id
        return None
