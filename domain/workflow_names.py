"""Workflow names and ids that more than one layer uses: those that start, signal or update a
workflow without importing its class (the detector's activity opens incidents by name) or
derive its id (the worker starts the detector, the CLI signals it, an incident names it)."""

from __future__ import annotations

# IncidentWorkflow's type and the updates its reporters send (workflows/incident.py).
INCIDENT_WORKFLOW = "IncidentWorkflow"
REPORT_BREACH = "report_breach"
REPORT_RECOVERY = "report_recovery"
# One problem, one incident: merge an incident into another, tell that one, note a related
# trigger firing on an incident that covers it.
MERGE_INTO = "merge_into"
ABSORB = "absorb"
REPORT_RELATED = "report_related"
# A resolved incident's trigger breached again within its rule's cooldown: a new run of the
# incident, started with its final state, takes the breach and comes back.
REOPEN = "reopen"


def detector_workflow_id(task_queue: str) -> str:
    """One detector per deployment; deployments sharing a namespace differ by task queue."""
    return f"detector-{task_queue}"
