"""Escalation never waits on a vendor (time-skipping server): Slack is down for two hours
while 1,200 updates arrive and the incident continues as new four times; every deadline still
fires on time, and once Slack is back every change lands in it exactly once."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta

from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

import worker
from config import Settings
from domain.escalation import DEFAULT_POLICIES
from domain.incident import (
    ActionRequest,
    IncidentInput,
    IncidentState,
    LaneAction,
    RunbookPlan,
    Severity,
    Trigger,
)
from domain.lanes import compact
from tests.chaos import ledger
from tests.conftest import incident_worker
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import eventually
from tests.histories.record import all_runs
from workflows.incident import IncidentWorkflow

NOTES = 1200
PER_RUN = 300
NOTE = "via cli: note #"  # four runs continue as new while Slack is down


async def notes(handle: WorkflowHandle, first: int, count: int) -> None:
    for n in range(first, first + count):
        request = ActionRequest("U024BE7LH", "cli", f"note #{n:04d}")
        await handle.execute_update(IncidentWorkflow.add_note, request)


def lines(texts: list[str]) -> Counter[str]:
    """Each note's line, however the messages merged them."""
    return Counter(line for text in texts for line in text.splitlines() if NOTE in line)


async def test_slack_down_for_two_hours_delays_no_deadline_and_loses_no_change(
    time_skipping_env: WorkflowEnvironment,
    settings: Settings,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
    fake_jira: FakeJira,
) -> None:
    client: Client = time_skipping_env.client
    plan = worker.notification_plan(settings, worker.load_escalation(None))
    plan.runbook = RunbookPlan(enabled=False)
    incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
    async with incident_worker(client, settings):
        handle = await client.start_workflow(
            IncidentWorkflow.run,
            IncidentInput(
                incident_id,
                Trigger.ERROR_RATE,
                "global",
                Severity.SEV2,
                await time_skipping_env.get_current_time(),
                notify=plan,
                updates_per_run=PER_RUN,
            ),
            id=incident_id,
            task_queue=settings.task_queue,
        )
        await eventually(lambda: len(fake_slack.top_level()) == 1)
        # The clock starts with the run, on the test server's time (ahead of the wall clock).
        opened = (await handle.query(IncidentWorkflow.state)).timeline[0].at

        fake_slack.unavailable = True
        for step in range(12):  # two hours in ten-minute steps, 100 notes in each
            await notes(handle, step * 100, 100)
            await time_skipping_env.sleep(timedelta(minutes=10))
        during: IncidentState = await handle.query(IncidentWorkflow.state)
        fake_slack.unavailable = False
        await time_skipping_env.sleep(timedelta(minutes=10))  # retries back off up to 5 min

        await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("U024BE7LH", "cli"))
        result = await handle.result()
        runs = len(await all_runs(client, incident_id))

    # Every deadline fired on time while Slack was down: L2 at 10 min, L3 15 min later,
    # then a reminder every 30 min.
    policy = DEFAULT_POLICIES["SEV2"]
    due = [opened + timedelta(seconds=policy.levels[0].ack_timeout_seconds)]
    due.append(due[0] + timedelta(seconds=policy.levels[1].ack_timeout_seconds))
    due.append(due[1] + timedelta(seconds=policy.levels[2].ack_timeout_seconds))
    while due[-1] + timedelta(seconds=policy.repeat_interval_seconds) < during.timeline[-1].at:
        due.append(due[-1] + timedelta(seconds=policy.repeat_interval_seconds))
    fired = [e.at for e in result.timeline if e.kind in ("escalated", "reminder")]
    assert len(fired) >= len(due) >= 5
    delays = [(at - deadline).total_seconds() for at, deadline in zip(fired, due, strict=False)]
    assert max(delays) < 5, delays
    assert min(delays) >= 0, delays
    assert runs > NOTES // PER_RUN

    # Every change landed in Slack exactly once, the piled-up ones merged into few messages.
    [message] = fake_slack.top_level()
    told = lines(message.replies)
    assert set(told.values()) == {1}
    assert len(told) == NOTES
    assert len(message.replies) < NOTES / 10
    assert "resolved" in message.text
    # Jira stayed up the whole time: its comments went out as they came, each once, from the
    # moment L2 opened the ticket (the first hundred notes are in its description's timeline).
    [issue] = fake_jira.issues.values()
    commented = lines([c["body"] for c in issue["comments"]])
    assert set(commented.values()) == {1}
    assert len(commented) == NOTES - 100
    # PagerDuty was up: one page at L1, then one at each escalation and reminder.
    pages = fake_pagerduty.events("trigger")
    assert len(pages) == 1 + len(fired)
    ledger.record(
        f"Slack down 2 h, {NOTES} updates, {runs - 1} continue-as-new (time-skipped)",
        runs=1,
        duplicates=sum(told.values()) - len(told) + len(pages) - 1 - len(fired),
        worst_timer_delay_s=max(delays),
    )


def test_compacting_keeps_the_last_update_and_merges_replies_in_order() -> None:
    queued = [
        LaneAction("update"),
        LaneAction("reply", "a"),
        LaneAction("reply", "b"),
        LaneAction("notify", "x", "#l2"),
        LaneAction("update"),
        LaneAction("reply", "c" * 2999),
        LaneAction("reply", "d"),
    ]
    assert compact(queued) == [
        LaneAction("reply", "a\nb"),
        LaneAction("notify", "x", "#l2"),
        LaneAction("update"),
        LaneAction("reply", "c" * 2999),
        LaneAction("reply", "d"),
    ]
