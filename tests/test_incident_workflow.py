"""IncidentWorkflow on the time-skipping server, with the real Slack and PagerDuty clients
talking to the local fakes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from activities.incidents import IncidentActivities, OpenIncidentRequest, OpenIncidentResult
from config.settings import Settings
from domain import search_attributes as sa
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentInput,
    IncidentResult,
    IncidentState,
    IncidentStatus,
    NotificationPlan,
    Recovery,
    Severity,
    Trigger,
)
from tests.conftest import incident_worker
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import close_incidents, eventually
from workflows.incident import IncidentWorkflow


def breach(scope: str = "global") -> Breach:
    return Breach(
        trigger=Trigger.ERROR_RATE,
        scope=scope,
        severity=Severity.SEV2,
        observed_at=datetime(2026, 11, 26, 12, tzinfo=UTC),
        summary="error rate 40.0% > 5% (20/50 calls in 300s)",
        metrics={"error_rate": 0.4, "calls": 50, "errors": 20},
    )


class Stack:
    def __init__(
        self, client: Client, task_queue: str, plan: NotificationPlan, engine: Engine
    ) -> None:
        self.client = client
        self.opener = IncidentActivities(client, task_queue, plan, engine)
        self.handles: list[WorkflowHandle] = []

    async def report(self, incident_id: str) -> OpenIncidentResult:
        # The time-skipping server cannot list workflows: always name the incident.
        [result] = await self.opener.open_or_update(
            [OpenIncidentRequest(breach(), proposed_id=incident_id, known_id=incident_id)]
        )
        return result

    async def open(self, incident_id: str | None = None) -> tuple[str, WorkflowHandle]:
        incident_id = incident_id or f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
        result = await self.report(incident_id)
        assert result.incident_id == incident_id
        handle = self.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        self.handles.append(handle)
        return incident_id, handle


@pytest.fixture
def plan() -> NotificationPlan:
    return NotificationPlan(slack_channel="#llm-oncall", pagerduty=True)


@pytest.fixture
async def stack(
    time_skipping_env: WorkflowEnvironment, settings: Settings, plan: NotificationPlan
) -> AsyncIterator[Stack]:
    client = time_skipping_env.client
    async with incident_worker(client, settings) as engine:
        opened = Stack(client, settings.task_queue, plan, engine)
        yield opened
        await close_incidents(opened.handles)


async def state_of(handle: WorkflowHandle) -> IncidentState:
    return await handle.query(IncidentWorkflow.state)


async def test_opens_pages_posts_and_updates_in_place(
    stack: Stack, fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty
) -> None:
    incident_id, handle = await stack.open()

    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)
    await eventually(lambda: len(fake_slack.messages) == 1)
    [trigger] = fake_pagerduty.events("trigger")
    assert trigger["dedup_key"] == incident_id
    assert trigger["payload"]["severity"] == "error"
    assert trigger["payload"]["custom_details"]["error_rate"] == 0.4
    [message] = fake_slack.messages.values()
    assert "incident_acknowledge" in str(message.blocks)

    acked = await handle.execute_update(
        IncidentWorkflow.acknowledge, ActionRequest("U024BE7LH", "slack")
    )
    assert acked.status == IncidentStatus.ACKNOWLEDGED
    await eventually(lambda: len(fake_pagerduty.events("acknowledge")) == 1)
    await eventually(lambda: len(message.edits) == 1)
    assert fake_pagerduty.events("acknowledge")[0]["dedup_key"] == incident_id
    assert "acknowledged by <@U024BE7LH>" in str(message.blocks)
    assert "incident_acknowledge" not in str(message.blocks)
    described = await handle.describe()
    assert described.typed_search_attributes.get(sa.INCIDENT_STATUS) == "acknowledged"
    assert described.typed_search_attributes.get(sa.INCIDENT_LEVEL) == 1

    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli", "fixed"))
    result: IncidentResult = await handle.result()
    assert result.status == IncidentStatus.RESOLVED
    assert result.resolved_by == "alice"
    assert fake_pagerduty.alerts[incident_id] == "resolved"
    assert "incident_resolve" not in str(message.blocks)
    assert len(fake_slack.posts()) == 1
    kinds = [entry.kind for entry in result.timeline]
    assert kinds[:2] == ["opened", "breach"]
    assert {"notified", "paged", "acknowledged", "resolved"} <= set(kinds)


async def test_a_second_acknowledge_says_who_acked_and_when(stack: Stack) -> None:
    _, handle = await stack.open()
    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U1", "slack"))
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U2", "slack"))
    message = str(refused.value.cause)
    assert "already acknowledged by U1 at " in message
    assert (await state_of(handle)).acknowledged_by == "U1"


async def test_a_storm_of_breaches_is_one_incident(
    stack: Stack, fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty
) -> None:
    incident_id, handle = await stack.open()
    for _ in range(5):
        await stack.open(incident_id)
    assert (await state_of(handle)).breach_count == 6
    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)
    await eventually(lambda: len(fake_slack.messages) == 1)


async def test_a_resolved_incident_takes_no_more_breaches(
    stack: Stack, fake_pagerduty: FakePagerDuty
) -> None:
    incident_id, handle = await stack.open()
    await eventually(lambda: fake_pagerduty.alerts.get(incident_id) == "triggered")
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))
    await handle.result()
    again = await stack.report(incident_id)
    assert again.incident_id is None


async def test_slack_refusing_does_not_hold_back_the_page(
    stack: Stack, fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty
) -> None:
    fake_slack.missing_channels.add("llm-oncall")
    _, handle = await stack.open()
    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)

    async def failure_recorded() -> bool:
        timeline = (await state_of(handle)).timeline
        return any(
            e.kind == "notification_failed" and "channel_not_found" in e.text for e in timeline
        )

    await eventually(failure_recorded)
    assert fake_slack.messages == {}


async def test_rate_limited_slack_is_retried_and_posts_once(
    stack: Stack, fake_slack: FakeSlack
) -> None:
    fake_slack.fail_next("chat.postMessage", "ratelimited", status=429, retry_after=1)
    fake_slack.fail_next("chat.postMessage", "ratelimited", status=429, retry_after=1)
    _, handle = await stack.open()
    await eventually(lambda: len(fake_slack.messages) == 1, timeout=30)
    assert len(fake_slack.posts()) == 3
    state = await state_of(handle)
    assert state.slack_message is not None


async def test_pagerduty_throttling_is_retried_until_the_page_lands(
    stack: Stack, fake_pagerduty: FakePagerDuty
) -> None:
    for _ in range(4):
        fake_pagerduty.fail_next(429, retry_after=1)
    incident_id, _ = await stack.open()
    await eventually(lambda: fake_pagerduty.alerts.get(incident_id) == "triggered", timeout=30)


@pytest.mark.parametrize(
    "plan", [NotificationPlan(slack_channel="#llm-oncall", allowed_slack_users=["U1"])]
)
async def test_slack_users_outside_the_allow_list_are_refused(stack: Stack) -> None:
    _, handle = await stack.open()
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U2", "slack"))
    assert "not allowed" in str(refused.value.cause)
    allowed = await handle.execute_update(
        IncidentWorkflow.acknowledge, ActionRequest("U1", "slack")
    )
    assert allowed.acknowledged_by == "U1"


async def test_a_long_incident_continues_as_new_without_losing_anything(
    stack: Stack, task_queue: str, fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty
) -> None:
    incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
    handle = await stack.client.start_workflow(
        IncidentWorkflow.run,
        IncidentInput(
            incident_id=incident_id,
            trigger=Trigger.ERROR_RATE,
            scope="global",
            severity=Severity.SEV2,
            opened_at=datetime(2026, 11, 26, 12, tzinfo=UTC),
            notify=NotificationPlan(slack_channel="#llm-oncall", pagerduty=True),
            updates_per_run=3,
        ),
        id=incident_id,
        task_queue=task_queue,
    )
    first_run = handle.result_run_id
    await eventually(lambda: len(fake_slack.messages) == 1)
    for _ in range(7):
        await handle.execute_update(IncidentWorkflow.report_breach, breach())
    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U1", "slack"))

    described = await stack.client.get_workflow_handle(incident_id).describe()
    assert described.run_id != first_run  # it moved on to fresh runs...
    state = await stack.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id).query(
        IncidentWorkflow.state
    )
    assert state.breach_count == 7  # ...carrying its state
    assert state.acknowledged_by == "U1"
    assert state.slack_message is not None

    latest = stack.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
    await latest.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))
    result = await latest.result()
    assert result.status == IncidentStatus.RESOLVED
    assert [e.kind for e in result.timeline].count("opened") == 1
    [message] = fake_slack.messages.values()  # the one message, updated in place all along
    assert "resolved by alice" in str(message.blocks)
    assert len(fake_slack.posts()) == 1
    assert len(fake_pagerduty.events("trigger")) == 1
    assert fake_pagerduty.alerts[incident_id] == "resolved"


# The time-skipping server does not skip time while an activity is being retried: the grace
# after a resolve passes in real time here.
SHORT_GRACE = NotificationPlan(slack_channel="#llm-oncall", pagerduty=True, page_grace_seconds=3)


@pytest.mark.parametrize("plan", [SHORT_GRACE])
async def test_no_page_for_an_incident_resolved_while_pagerduty_was_failing(
    stack: Stack, fake_pagerduty: FakePagerDuty
) -> None:
    for _ in range(500):
        fake_pagerduty.fail_next(503)
    incident_id, handle = await stack.open()
    await eventually(lambda: len(fake_pagerduty.events("trigger")) >= 2)  # retrying
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))
    result = await handle.result()
    kinds = [entry.kind for entry in result.timeline]
    assert "not_paged" in kinds
    assert "paged" not in kinds
    assert fake_pagerduty.alerts.get(incident_id) is None  # nobody was woken up


@pytest.mark.parametrize("plan", [SHORT_GRACE])
async def test_a_page_landing_just_after_the_resolve_is_resolved_too(
    stack: Stack, fake_pagerduty: FakePagerDuty
) -> None:
    for _ in range(500):
        fake_pagerduty.fail_next(503)
    incident_id, handle = await stack.open()
    await eventually(lambda: len(fake_pagerduty.events("trigger")) >= 2)
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))
    fake_pagerduty.faults.clear()  # PagerDuty is back within the grace period
    result = await handle.result()
    kinds = [entry.kind for entry in result.timeline]
    assert kinds.index("resolved") < kinds.index("paged")
    assert fake_pagerduty.alerts[incident_id] == "resolved"  # the queued resolve followed it


async def test_an_unknown_slack_error_is_not_retried_for_a_day(
    stack: Stack, fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty
) -> None:
    fake_slack.fail_next("chat.postMessage", "not_allowed_token_type")
    _, handle = await stack.open()

    async def failed() -> bool:
        timeline = (await state_of(handle)).timeline
        return any("not_allowed_token_type" in entry.text for entry in timeline)

    await eventually(failed)
    assert len(fake_slack.posts()) == 1


async def test_a_worse_breach_raises_the_severity_and_a_recovery_is_recorded(
    stack: Stack, fake_slack: FakeSlack
) -> None:
    _, handle = await stack.open()
    await eventually(lambda: len(fake_slack.messages) == 1)
    worse = replace(breach(), severity=Severity.SEV1, summary="error rate 80.0% > 5.0%")
    await handle.execute_update(IncidentWorkflow.report_breach, worse)
    state = await state_of(handle)
    assert state.severity == Severity.SEV1
    described = await handle.describe()
    assert described.typed_search_attributes.get(sa.INCIDENT_SEVERITY) == "SEV1"
    [message] = fake_slack.messages.values()
    await eventually(lambda: "SEV1" in str(message.blocks))

    milder = replace(breach(), severity=Severity.SEV3)  # never lowered by the detector
    await handle.execute_update(IncidentWorkflow.report_breach, milder)
    assert (await state_of(handle)).severity == Severity.SEV1

    recovery = Recovery(Trigger.ERROR_RATE, "global", datetime(2026, 11, 26, 12, 30, tzinfo=UTC))
    await handle.execute_update(IncidentWorkflow.report_recovery, recovery)
    await handle.execute_update(IncidentWorkflow.report_recovery, recovery)  # told twice: once
    state = await state_of(handle)
    assert state.recovered_at == recovery.observed_at
    kinds = [entry.kind for entry in state.timeline]
    assert kinds.count("recovered") == 1
    assert kinds.count("severity_raised") == 1
    assert state.status == IncidentStatus.DETECTED  # recovery alone resolves nothing
