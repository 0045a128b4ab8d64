"""Escalation L1 -> L3 on the time-skipping server, with the real Slack, PagerDuty and Jira
clients talking to the fakes: deadlines, reminders, snoozes, and the vendor calls each makes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

import worker
from config.escalation import load_escalation
from config.settings import Settings
from domain.escalation import span
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentInput,
    IncidentState,
    IncidentStatus,
    NotificationPlan,
    Severity,
    SnoozeRequest,
    Trigger,
)
from tests.conftest import incident_worker
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import close_incidents, eventually
from workflows.incident import IncidentWorkflow

DEFAULT_KEY = "R" * 32  # PAGERLOOP_PAGERDUTY_ROUTING_KEY in the settings fixture
L2_KEY = "K" * 32
POLICY_FILE = f"""
repeat_interval_seconds = 600
[[levels]]
name = "L1"
description = "On-call"
ack_timeout_seconds = 300
resolve_timeout_seconds = 1800
[[levels]]
name = "L2"
description = "Platform"
ack_timeout_seconds = 600
resolve_timeout_seconds = 3600
pagerduty_routing_key = "{L2_KEY}"
jira_project = "OPS"
[[levels]]
name = "L3"
description = "Leadership"
ack_timeout_seconds = 900
resolve_timeout_seconds = 7200
jira_project = "OPS"
"""


class Incidents:
    def __init__(self, env: WorkflowEnvironment, task_queue: str, plan: NotificationPlan) -> None:
        self.env = env
        self.client: Client = env.client
        self.task_queue = task_queue
        self.plan = plan
        self.handles: list[WorkflowHandle] = []

    async def open(self) -> WorkflowHandle:
        incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
        opened = datetime.now(UTC)
        handle = await self.client.start_workflow(
            IncidentWorkflow.run,
            IncidentInput(
                incident_id=incident_id,
                trigger=Trigger.ERROR_RATE,
                scope="global",
                severity=Severity.SEV2,
                opened_at=opened,
                notify=self.plan,
            ),
            id=incident_id,
            task_queue=self.task_queue,
        )
        breach = Breach(Trigger.ERROR_RATE, "global", Severity.SEV2, opened, "error rate 9.0%")
        await handle.execute_update(IncidentWorkflow.report_breach, breach)
        self.handles.append(handle)
        return handle

    async def after(self, handle: WorkflowHandle, minutes: float) -> IncidentState:
        await self.env.sleep(timedelta(minutes=minutes))
        state: IncidentState = await handle.query(IncidentWorkflow.state)
        return state


@pytest.fixture
async def incidents(
    time_skipping_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> AsyncIterator[Incidents]:
    policy_file = tmp_path / "escalation.toml"
    policy_file.write_text(POLICY_FILE)
    settings = settings.model_copy(update={"escalation_policy_file": policy_file})
    client = time_skipping_env.client
    plan = worker.notification_plan(settings, load_escalation(policy_file))
    async with incident_worker(client, settings):
        opened = Incidents(time_skipping_env, settings.task_queue, plan)
        yield opened
        await close_incidents(opened.handles)


def kinds(state: IncidentState) -> list[str]:
    return [entry.kind for entry in state.timeline]


async def test_acknowledged_in_time_stays_at_l1(
    incidents: Incidents, fake_pagerduty: FakePagerDuty, fake_jira: FakeJira
) -> None:
    handle = await incidents.open()
    await incidents.after(handle, 3)
    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U1", "slack"))
    state = await incidents.after(handle, 20)
    assert (state.level_name, state.status) == ("L1", IncidentStatus.ACKNOWLEDGED)
    assert state.ack_by is None
    assert "escalated" not in kinds(state)
    assert len(fake_pagerduty.events("trigger")) == 1
    assert fake_jira.issues == {}


async def test_acknowledged_late_escalates_once(
    incidents: Incidents, fake_pagerduty: FakePagerDuty, fake_jira: FakeJira, fake_slack: FakeSlack
) -> None:
    handle = await incidents.open()
    state = await incidents.after(handle, 6)
    assert state.level_name == "L2"
    assert "not acknowledged within 5 min at L1" in state.timeline[-1].text or any(
        "not acknowledged within 5 min at L1" in e.text for e in state.timeline
    )
    # L2 pages its own service and opens the ticket.
    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 2)
    l1, l2 = fake_pagerduty.events("trigger")
    assert (l1["routing_key"], l1["dedup_key"]) == (DEFAULT_KEY, state.incident_id)
    assert (l2["routing_key"], l2["dedup_key"]) == (L2_KEY, f"{state.incident_id}/L2")
    await eventually(lambda: len(fake_jira.issues) == 1)

    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U2", "slack"))
    state = await incidents.after(handle, 12)
    assert state.level_name == "L2"  # acknowledged: no further escalation for that
    await eventually(lambda: len(fake_pagerduty.events("acknowledge")) == 2)
    assert {e["dedup_key"] for e in fake_pagerduty.events("acknowledge")} == {
        state.incident_id,
        f"{state.incident_id}/L2",
    }
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("U2", "slack", "fixed"))
    await handle.result()
    [issue] = fake_jira.issues.values()
    assert issue["status"] == "Done"
    assert issue["comments"][-1]["body"].startswith("h3. Postmortem")
    assert f"pagerloop:{state.incident_id}" in issue["fields"]["labels"]
    [message] = fake_slack.messages.values()
    assert any("escalated" in reply for reply in message.replies)
    assert len(fake_slack.posts()) == 1


async def test_never_acknowledged_climbs_to_l3_then_reminds(
    incidents: Incidents, fake_pagerduty: FakePagerDuty, fake_slack: FakeSlack
) -> None:
    handle = await incidents.open()
    assert (await incidents.after(handle, 6)).level_name == "L2"
    assert (await incidents.after(handle, 11)).level_name == "L3"
    state = await incidents.after(handle, 16)
    assert state.level_name == "L3"
    assert kinds(state).count("reminder") == 1
    state = await incidents.after(handle, 10)
    assert kinds(state).count("reminder") == 2
    assert kinds(state).count("escalated") == 2
    assert state.remind_at is not None
    # L1 and L3 page the default service (one PagerDuty incident, re-triggered), L2 its own.
    await eventually(lambda: len(fake_pagerduty.events("trigger")) >= 5)
    dedup_keys = {e["dedup_key"] for e in fake_pagerduty.events("trigger")}
    assert dedup_keys == {state.incident_id, f"{state.incident_id}/L2"}

    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U3", "slack"))
    state = await incidents.after(handle, 30)
    assert kinds(state).count("reminder") == 2  # acknowledged: the reminders stop
    assert state.resolve_by is None  # the top level's resolve deadline had passed already


async def test_resolved_before_any_deadline(
    incidents: Incidents, fake_pagerduty: FakePagerDuty
) -> None:
    handle = await incidents.open()
    await incidents.after(handle, 2)
    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))
    result = await handle.result()
    assert result.status == IncidentStatus.RESOLVED
    assert "escalated" not in [e.kind for e in result.timeline]
    await eventually(lambda: len(fake_pagerduty.events("resolve")) == 1)


async def test_a_snooze_moves_the_deadline(incidents: Incidents) -> None:
    handle = await incidents.open()
    await incidents.after(handle, 4)
    state = await handle.execute_update(
        IncidentWorkflow.snooze, SnoozeRequest("U1", minutes=30, channel="slack")
    )
    assert state.ack_by is not None
    assert (await incidents.after(handle, 20)).level_name == "L1"  # would be L2 at minute 5
    state = await incidents.after(handle, 15)
    assert state.level_name == "L2"  # the snoozed deadline (minute 34) passed
    assert "snoozed" in kinds(state)


async def test_not_resolved_in_time_escalates_too(incidents: Incidents) -> None:
    handle = await incidents.open()
    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U1", "slack"))
    assert (await incidents.after(handle, 25)).level_name == "L1"
    state = await incidents.after(handle, 10)
    assert state.level_name == "L2"
    assert any("not resolved within 30 min at L1" in e.text for e in state.timeline)


async def test_manual_escalation_and_notes(incidents: Incidents, fake_slack: FakeSlack) -> None:
    handle = await incidents.open()
    await eventually(lambda: len(fake_slack.messages) == 1)
    state = await handle.execute_update(
        IncidentWorkflow.escalate, ActionRequest("U1", "slack", "needs the platform team")
    )
    assert state.level_name == "L2"
    await handle.execute_update(
        IncidentWorkflow.add_note, ActionRequest("U1", "cli", "quota raised with OpenAI")
    )
    [message] = fake_slack.messages.values()
    await eventually(lambda: any("quota raised" in reply for reply in message.replies))
    assert len(fake_slack.posts()) == 1  # the escalation came while the post was in flight
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(IncidentWorkflow.add_note, ActionRequest("U1", "cli", " "))
    assert "a note needs some text" in str(refused.value.cause)


def test_timeouts_read_as_people_say_them() -> None:
    assert [span(s) for s in (20, 60, 90, 300, 3600, 5400)] == [
        "20 s",
        "1 min",
        "1 min 30 s",
        "5 min",
        "1 h",
        "90 min",
    ]
