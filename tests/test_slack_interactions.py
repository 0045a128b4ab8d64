"""POST /slack/interactions at its edges: bad requests, a worker that is away, Slack's 3 s."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

import worker
from activities.incidents import IncidentActivities, OpenIncidentRequest
from api.app import create_app
from api.deps import Services
from config import Settings
from domain.incident import IncidentStatus, NotificationPlan
from tests.conftest import SIGNING_SECRET
from tests.fakes.slack import FakeSlack, Message, button_click
from tests.helpers import api_client, eventually
from tests.test_incident_workflow import breach
from workflows.incident import IncidentWorkflow


@pytest.fixture
def api(settings: Settings, dev_env: WorkflowEnvironment, tmp_path: Path) -> httpx.AsyncClient:
    engine = worker.open_store(settings)
    return api_client(settings, engine, dev_env.client, worker.make_slack_client(settings))


def message_for(incident_id: str) -> Message:
    button = {"type": "button", "action_id": "incident_acknowledge", "value": incident_id,
              "text": {"type": "plain_text", "text": "Acknowledge"}}  # fmt: skip
    return Message("C00000001", "1.000001", "x", [{"type": "actions", "elements": [button]}])


async def test_malformed_signature_headers_are_401_not_500(api: httpx.AsyncClient) -> None:
    body, headers = button_click(
        message_for("incident-x"), "incident_acknowledge", "U1", SIGNING_SECRET
    )
    for broken in (
        {"X-Slack-Request-Timestamp": "soon"},
        {"X-Slack-Request-Timestamp": ""},
        {"X-Slack-Signature": ""},
    ):
        response = await api.post(
            "/slack/interactions", content=body, headers={**headers, **broken}
        )
        assert response.status_code == 401


async def test_huge_bodies_are_refused_before_verification(api: httpx.AsyncClient) -> None:
    response = await api.post("/slack/interactions", content=b"x" * 1_500_000)
    assert response.status_code == 413


async def test_unknown_incident_is_explained_to_the_clicker(
    api: httpx.AsyncClient, fake_slack: FakeSlack
) -> None:
    body, headers = button_click(
        message_for("incident-nope"), "incident_acknowledge", "U1", SIGNING_SECRET
    )
    assert (await api.post("/slack/interactions", content=body, headers=headers)).status_code == 200
    await eventually(lambda: len(fake_slack.ephemeral) == 1)
    assert "does not exist" in fake_slack.ephemeral[0]["text"]


async def test_a_click_while_the_worker_is_away_is_answered_in_time_and_applied_later(
    api: httpx.AsyncClient, dev_env: WorkflowEnvironment, settings: Settings, task_queue: str
) -> None:
    client = dev_env.client
    opener = IncidentActivities(client, task_queue, NotificationPlan(), worker.open_store(settings))
    incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=task_queue, workflows=[IncidentWorkflow]):
        await opener.open_or_update([OpenIncidentRequest(breach(), incident_id)])
    # No worker now: the update cannot run.
    body, headers = button_click(
        message_for(incident_id), "incident_acknowledge", "U1", SIGNING_SECRET
    )
    started = time.monotonic()
    response = await api.post("/slack/interactions", content=body, headers=headers)
    assert response.status_code == 200
    assert time.monotonic() - started < 3

    handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
    async with Worker(client, task_queue=task_queue, workflows=[IncidentWorkflow]):

        async def acknowledged() -> bool:
            state = await handle.query(IncidentWorkflow.state)
            return state.status == IncidentStatus.ACKNOWLEDGED

        await eventually(acknowledged, timeout=30)
        await handle.terminate()


async def test_status_says_unknown_when_temporal_is_away(
    settings: Settings, tmp_path: Path
) -> None:
    dead = settings.model_copy(update={"temporal_address": "127.0.0.1:9"})
    client = await worker.connect_temporal(dead, lazy=True)
    engine = worker.open_store(settings)
    app = create_app(Services(dead, engine, client, slack=None))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as api:
        started = time.monotonic()
        response = await api.get("/status")
        health = await api.get("/healthz")
        ingest = await api.post(
            "/v1/llm-calls",
            json={"calls": [{"model": "m", "status": "success", "latency_ms": 1}]},
            headers={"Authorization": "Bearer test-ingest-key"},
        )
    assert response.status_code == 503
    assert response.json()["overall"] == "unknown"
    assert time.monotonic() - started < 10
    assert health.status_code == 503
    assert health.json()["checks"]["store"] == "ok"
    assert ingest.status_code == 202  # ingest needs only the store
