"""Merging incidents of one problem on the local dev server: the real IncidentWorkflow and the
detector's activity, Slack, PagerDuty and Jira on their fakes. A wider problem opening while a
narrower one is open takes it in and takes over its message, page and ticket; one already open
keeps its own and the narrower one's say where it went; a narrower one firing while the wider
is open joins it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from activities.incidents import IncidentActivities, OpenIncidentRequest, OpenIncidentResult
from cli.main import app as cli_app
from config.settings import Settings
from domain import search_attributes as sa
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentResult,
    IncidentState,
    IncidentStatus,
    Severity,
    Trigger,
)
from tests.conftest import incident_opener
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow


@pytest.fixture
def merge_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"runbooks_enabled": False})


@pytest.fixture
async def activities(
    dev_env: WorkflowEnvironment, merge_settings: Settings
) -> AsyncIterator[IncidentActivities]:
    async with incident_opener(dev_env.client, merge_settings) as opener:
        yield opener


def breach(trigger: Trigger, severity: Severity) -> Breach:
    return Breach(trigger, "global", severity, datetime.now(UTC), f"{trigger} over its line")


def new_id(trigger: Trigger) -> str:
    return f"incident-{trigger}-global-{uuid.uuid4().hex[:8]}"


async def open_one(
    activities: IncidentActivities, trigger: Trigger, severity: Severity, **request: Any
) -> tuple[str, OpenIncidentResult]:
    [result] = await activities.open_or_update(
        [OpenIncidentRequest(breach(trigger, severity), new_id(trigger), **request)]
    )
    assert result.incident_id is not None
    return result.incident_id, result


async def state(client: Client, incident_id: str) -> IncidentState:
    found: IncidentState = await client.get_workflow_handle(incident_id).query(
        IncidentWorkflow.state
    )
    return found


def dedup_keys(pagerduty: FakePagerDuty, action: str = "trigger") -> set[str]:
    return {event["dedup_key"] for event in pagerduty.accepted_events(action)}


async def told_everyone(client: Client, incident_id: str) -> IncidentState:
    """Posted to Slack and paged (SEV1 and SEV2 do both at L1)."""

    async def probe() -> IncidentState | None:
        found = await state(client, incident_id)
        return found if found.slack_message and found.paged else None

    return await eventually(probe)


async def test_a_wider_problem_opening_takes_over_the_message_page_and_ticket(
    activities: IncidentActivities,
    dev_env: WorkflowEnvironment,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
    merge_settings: Settings,
) -> None:
    client = dev_env.client
    errors, _ = await open_one(activities, Trigger.ERROR_RATE, Severity.SEV2)
    told = await told_everyone(client, errors)
    await client.get_workflow_handle(errors).execute_update(
        IncidentWorkflow.acknowledge, ActionRequest("alice", "api")
    )

    outage, result = await open_one(activities, Trigger.API_OUTAGE, Severity.SEV1, absorbs=[errors])
    assert result.opened
    assert result.merged == [errors]

    merged = await client.get_workflow_handle(errors, result_type=IncidentResult).result()
    assert merged.status == IncidentStatus.RESOLVED
    assert merged.timeline[-1].kind == "merged"
    assert merged.timeline[-1].text.startswith(f"merged into {outage}")
    assert (await state(client, errors)).merged_into == outage

    taken = await told_everyone(client, outage)
    assert taken.slack_message == told.slack_message
    assert taken.severity == Severity.SEV1
    assert taken.absorbed == [f"{errors} (error_rate on global)"]
    assert taken.acknowledged_by == "alice"  # she answered the page: it is hers
    # One message, updated to show the outage; one PagerDuty alert, triggered again as critical.
    await eventually(lambda: _shows(fake_slack, "api_outage"))
    assert len(fake_slack.posts()) == 1
    await eventually(lambda: len(fake_pagerduty.accepted_events("trigger")) >= 2)
    assert dedup_keys(fake_pagerduty) == {told.paged[0].dedup_key}
    assert fake_pagerduty.accepted_events("trigger")[-1]["payload"]["severity"] == "critical"
    assert not fake_pagerduty.accepted_events("resolve")

    # Operators find what a merge closed, in the Temporal UI (a search attribute) and the CLI.
    query = f"{sa.INCIDENT_MERGED_INTO.name} = '{outage}'"
    found = await eventually(lambda: _ids(client, query))
    assert found == [errors]
    env = {
        "PAGERLOOP_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "PAGERLOOP_TASK_QUEUE": merge_settings.task_queue,
        "COLUMNS": "300",
    }
    assert f"took in {errors} (error_rate on global)" in await _cli(env, "show", outage)
    assert f"merged into {outage}: one problem" in await _cli(env, "show", errors)
    assert f"merged into {outage}" in await _cli(env, "list", "--all")

    # The detector's activity retried after a crash: the same answer, nothing told twice.
    [again] = await activities.open_or_update(
        [OpenIncidentRequest(breach(Trigger.API_OUTAGE, Severity.SEV1), outage, absorbs=[errors])]
    )
    assert again.incident_id == outage
    assert again.merged == [errors]
    assert (await state(client, outage)).absorbed == taken.absorbed
    assert len(fake_slack.posts()) == 1

    # The outage's resolve resolves the alert it took over.
    await client.get_workflow_handle(outage).execute_update(
        IncidentWorkflow.resolve, ActionRequest("alice", "api")
    )
    await eventually(lambda: dedup_keys(fake_pagerduty, "resolve") == {told.paged[0].dedup_key})


async def test_an_open_wider_problem_keeps_its_own_and_the_merged_one_says_where_it_went(
    activities: IncidentActivities,
    dev_env: WorkflowEnvironment,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
) -> None:
    client = dev_env.client
    outage, _ = await open_one(activities, Trigger.API_OUTAGE, Severity.SEV1)
    errors, _ = await open_one(activities, Trigger.ERROR_RATE, Severity.SEV2)
    mine = await told_everyone(client, outage)
    theirs = await told_everyone(client, errors)

    [result] = await activities.open_or_update(
        [
            OpenIncidentRequest(
                breach(Trigger.API_OUTAGE, Severity.SEV1), new_id(Trigger.API_OUTAGE), outage,
                absorbs=[errors],
            )
        ]
    )  # fmt: skip
    assert result.incident_id == outage
    assert result.merged == [errors]
    assert not result.opened

    await client.get_workflow_handle(errors).result()
    kept = await state(client, outage)
    assert kept.slack_message == mine.slack_message
    assert kept.absorbed == [f"{errors} (error_rate on global)"]
    # The merged one's alert is resolved, its message says where the problem went.
    await eventually(lambda: dedup_keys(fake_pagerduty, "resolve") == {theirs.paged[0].dedup_key})
    assert theirs.slack_message is not None
    await eventually(lambda: _shows(fake_slack, f"merged into {outage}", theirs.slack_message.ts))
    assert any("merged into" in text for text in _thread(fake_slack, theirs.slack_message.ts))
    assert mine.slack_message is not None
    assert any("took in" in text for text in _thread(fake_slack, mine.slack_message.ts))


async def test_a_narrower_problem_firing_while_the_wider_is_open_joins_it(
    activities: IncidentActivities, dev_env: WorkflowEnvironment, fake_slack: FakeSlack
) -> None:
    client = dev_env.client
    outage, _ = await open_one(activities, Trigger.API_OUTAGE, Severity.SEV2)
    await told_everyone(client, outage)

    joined, result = await open_one(activities, Trigger.ERROR_RATE, Severity.SEV1, joins=outage)
    assert joined == outage
    assert result.joined
    assert not result.opened
    found = await state(client, outage)
    assert found.related == ["error_rate|global"]
    assert found.severity == Severity.SEV1  # the worse of the two
    assert found.timeline[-2].kind == "related"
    assert len(fake_slack.posts()) == 1

    # Once the wider incident is over, the narrower problem is one of its own.
    await client.get_workflow_handle(outage).execute_update(
        IncidentWorkflow.resolve, ActionRequest("alice", "api")
    )
    own, result = await open_one(activities, Trigger.ERROR_RATE, Severity.SEV2, joins=outage)
    assert own != outage
    assert result.opened
    assert not result.joined


def _shows(slack: FakeSlack, text: str, ts: str | None = None) -> bool:
    for message in slack.top_level():
        if ts is not None and message.ts != ts:
            continue
        if text in str(message.blocks):  # as it reads now
            return True
    return False


def _thread(slack: FakeSlack, ts: str) -> list[str]:
    return next(m.replies for m in slack.top_level() if m.ts == ts)


async def _ids(client: Client, query: str) -> list[str]:
    return [execution.id async for execution in client.list_workflows(query)]


async def _cli(env: dict[str, str], *args: str) -> str:
    done = await asyncio.to_thread(CliRunner().invoke, cli_app, ["incidents", *args], env=env)
    assert done.exit_code == 0, done.output
    return done.output
