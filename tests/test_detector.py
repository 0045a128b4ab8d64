"""DetectorWorkflow against the store on the local dev server (real time, real visibility)."""

from __future__ import annotations

import httpx
from temporalio.client import Client, WorkflowHandle

import worker
from config import Settings
from detectors.detector import DetectorWorkflow
from domain.incident import ActionRequest, IncidentState, IncidentStatus
from domain.workflow_names import detector_workflow_id
from tests.conftest import INGEST_KEY, incident_ids
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow


async def post_calls(settings: Settings, count: int, status: str = "error") -> None:
    calls = [{"model": "gpt-4.1", "status": status, "latency_ms": 500}] * count
    async with httpx.AsyncClient(base_url=settings.api_url) as api:
        response = await api.post(
            "/v1/llm-calls",
            json={"calls": calls},
            headers={"Authorization": f"Bearer {INGEST_KEY}"},
        )
    assert response.status_code == 202


def detector(client: Client, settings: Settings) -> WorkflowHandle:
    return client.get_workflow_handle_for(
        DetectorWorkflow.run, detector_workflow_id(settings.task_queue)
    )


async def evaluations_after(client: Client, settings: Settings, more: int) -> None:
    start = (await detector(client, settings).query(DetectorWorkflow.status)).evaluations

    async def done() -> bool:
        status = await detector(client, settings).query(DetectorWorkflow.status)
        return status.evaluations >= start + more

    await eventually(done, timeout=30)


async def test_nineteen_failed_calls_open_nothing(running: Client, settings: Settings) -> None:
    await post_calls(settings, 19)
    await evaluations_after(running, settings, 3)
    assert await incident_ids(running, settings.task_queue) == []
    status = await detector(running, settings).query(DetectorWorkflow.status)
    assert status.last_verdicts["error_rate|global"] == "insufficient_data"


async def test_mostly_successful_traffic_opens_nothing(running: Client, settings: Settings) -> None:
    await post_calls(settings, 2, "error")
    await post_calls(settings, 98, "success")  # 2 % errors: under the 5 % line
    await evaluations_after(running, settings, 3)
    assert await incident_ids(running, settings.task_queue) == []


async def test_a_breach_right_after_a_resolve_reopens_the_incident_instead_of_a_new_one(
    running: Client, settings: Settings
) -> None:
    """A flap across a resolve: the rule still firing when someone resolves, the next
    evaluation brings the same incident back (within the rule's 300 s cooldown)."""
    await post_calls(settings, 50)
    [first] = await eventually(lambda: incident_ids(running, settings.task_queue))
    handle = running.get_workflow_handle_for(IncidentWorkflow.run, first)
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))
    await handle.result()

    async def reopened() -> IncidentState | None:
        state = await running.get_workflow_handle_for(IncidentWorkflow.run, first).query(
            IncidentWorkflow.state
        )
        return state if state.reopened else None

    state = await eventually(reopened, timeout=30)
    assert state.status != IncidentStatus.RESOLVED
    assert any(e.kind == "reopened" and "alice resolved it" in e.text for e in state.timeline)
    assert await incident_ids(running, settings.task_queue, "AND ExecutionStatus = 'Running'") == [
        first
    ]
    status = await detector(running, settings).query(DetectorWorkflow.status)
    assert status.trigger_states["error_rate|global"].incident_id == first


async def test_a_detector_that_lost_its_state_joins_the_open_incident(
    running: Client, settings: Settings
) -> None:
    await post_calls(settings, 50)
    [incident_id] = await eventually(lambda: incident_ids(running, settings.task_queue))
    await detector(running, settings).terminate("simulating a lost detector")
    await worker.ensure_detector(running, settings)
    await evaluations_after(running, settings, 4)

    assert await incident_ids(running, settings.task_queue) == [incident_id]
    status = await detector(running, settings).query(DetectorWorkflow.status)
    assert status.trigger_states["error_rate|global"].incident_id == incident_id
