"""The thin loop, every part real: HTTP ingest → store → detector → incident → Slack and
PagerDuty fakes → a signed Slack click → acknowledged everywhere. Local dev server."""

from __future__ import annotations

import time

import httpx
from temporalio.client import Client

from config import Settings
from detectors.detector import DetectorWorkflow
from domain import search_attributes as sa
from domain.incident import IncidentStatus
from domain.workflow_names import detector_workflow_id
from tests.conftest import INGEST_KEY, SIGNING_SECRET, incident_ids
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack, Message, button_click
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow


async def incidents(client: Client, settings: Settings, where: str = "") -> list[str]:
    return await incident_ids(client, settings.task_queue, where)


async def test_failed_calls_page_and_a_signed_click_acknowledges(
    running: Client, settings: Settings, fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty
) -> None:
    client = running
    calls = [{"model": "gpt-4.1", "status": "error", "latency_ms": 900, "http_status": 400}]
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=10) as api:
        posted = await api.post(
            "/v1/llm-calls",
            json={"calls": calls * 50},
            headers={"Authorization": f"Bearer {INGEST_KEY}"},
        )
        assert posted.status_code == 202

        detected = await eventually(
            lambda: incidents(client, settings, "AND IncidentStatus = 'detected'")
        )
        [incident_id] = detected
        assert incident_id.startswith("incident-error_rate-global-")
        await eventually(lambda: len(fake_slack.messages) == 1)
        await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)

        # The storm goes on for several more evaluations: still one of everything.
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        await eventually(lambda: _firing_for(client, settings, evaluations=4), timeout=30)
        assert await incidents(client, settings) == [incident_id]
        assert len(fake_slack.posts()) == 1
        assert len(fake_pagerduty.events("trigger")) == 1
        assert fake_pagerduty.events("trigger")[0]["dedup_key"] == incident_id

        [message] = fake_slack.messages.values()
        before = len(message.edits)

        # Tampered, wrongly signed and stale clicks are refused and change nothing.
        click = button_click(message, "incident_acknowledge", "U024BE7LH", SIGNING_SECRET)
        tampered = (click[0].replace(b"U024BE7LH", b"U0EVIL000"), click[1])
        wrong_secret = button_click(message, "incident_acknowledge", "U024BE7LH", "not-it")
        stale = button_click(
            message, "incident_acknowledge", "U024BE7LH", SIGNING_SECRET, at=time.time() - 360
        )
        for refused in (tampered, wrong_secret, stale):
            response = await api.post("/slack/interactions", content=refused[0], headers=refused[1])
            assert response.status_code == 401
        assert (await handle.query(IncidentWorkflow.state)).status == IncidentStatus.DETECTED
        assert fake_pagerduty.events("acknowledge") == []

        # The real click.
        clicked = await api.post("/slack/interactions", content=click[0], headers=click[1])
        assert clicked.status_code == 200
        await eventually(lambda: incidents(client, settings, "AND IncidentStatus = 'acknowledged'"))
        await eventually(lambda: len(message.edits) > before)
        assert "acknowledged by <@U024BE7LH>" in str(message.blocks)
        await eventually(lambda: len(fake_pagerduty.events("acknowledge")) == 1)
        assert fake_pagerduty.events("acknowledge")[0]["dedup_key"] == incident_id
        described = await handle.describe()
        assert described.typed_search_attributes.get(sa.INCIDENT_STATUS) == "acknowledged"

        # A slow responder still has the first version on screen: told privately who acked.
        late = button_click(
            as_first_posted(message), "incident_acknowledge", "U0LATE000", SIGNING_SECRET
        )
        assert (
            await api.post("/slack/interactions", content=late[0], headers=late[1])
        ).status_code == 200
        await eventually(lambda: len(fake_slack.ephemeral) == 1)
        assert "already acknowledged by U024BE7LH" in fake_slack.ephemeral[0]["text"]
        assert fake_slack.ephemeral[0]["user"] == "U0LATE000"

        # Resolve from Slack closes it everywhere.
        resolve = button_click(message, "incident_resolve", "U0LATE000", SIGNING_SECRET)
        assert (
            await api.post("/slack/interactions", content=resolve[0], headers=resolve[1])
        ).status_code == 200
        await handle.result()
        await eventually(lambda: fake_pagerduty.alerts[incident_id] == "resolved")
        await eventually(lambda: "resolved by <@U0LATE000>" in str(message.blocks))


async def _firing_for(client: Client, settings: Settings, evaluations: int) -> bool:
    detector = client.get_workflow_handle_for(
        DetectorWorkflow.run, detector_workflow_id(settings.task_queue)
    )
    status = await detector.query(DetectorWorkflow.status)
    state = status.rule_states["error_rate|global"]
    return status.last_verdicts["error_rate|global"] == "firing" and (state.breaches >= evaluations)


def as_first_posted(message: Message) -> Message:
    first = message.edits[0] if message.edits else {"blocks": message.blocks, "text": message.text}
    return Message(message.channel, message.ts, first["text"], first["blocks"])


async def test_detector_status_is_queryable(running: Client, settings: Settings) -> None:
    handle = running.get_workflow_handle_for(
        DetectorWorkflow.run, detector_workflow_id(settings.task_queue)
    )

    async def evaluated() -> bool:
        status = await handle.query(DetectorWorkflow.status)
        verdicts = status.last_verdicts
        return (
            status.evaluations >= 2
            and verdicts["error_rate|global"] == "insufficient_data"
            and set(verdicts.values()) <= {"insufficient_data", "ok"}
        )

    await eventually(evaluated)
