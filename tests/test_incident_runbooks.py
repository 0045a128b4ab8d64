"""Incidents running their runbook as a child workflow (time-skipping server): mitigate,
verify, escalate when it did not help, auto-resolve when it did, revert on resolve.
The diagnosis comes from the test kit's snapshot; controls go to a real store; Slack is the
real client against the local fake."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

import runbooks
from activities.incidents import IncidentActivities, OpenIncidentRequest
from activities.slack import RESOLVE_KEEP_ACTION, SlackActivities
from config.settings import Settings
from domain.incident import (
    ActionRequest,
    ApprovalDecision,
    Breach,
    IncidentInput,
    IncidentState,
    IncidentStatus,
    NotificationPlan,
    RunbookPlan,
    Severity,
    Trigger,
)
from runbooks.testing import (
    CanaryJudge,
    Judge,
    RunbookKit,
    Snapshot,
    canary_verdict,
    never_recovers,
    recovered_if,
    too_little_traffic,
)
from stores import controls
from tests.conftest import SIGNING_SECRET
from tests.fakes.slack import FakeSlack, Message, button_click
from tests.helpers import close_incidents, eventually
from tests.test_runbooks import RATE_LIMITED, feature, quality
from workflows.incident import IncidentWorkflow

import worker  # isort: skip


# gpt-4.1 moved to a worse snapshot three hours ago.
MODEL_UPDATE = Snapshot(
    quality=[
        quality("gpt-4.1", "gpt-4.1-2025-04-14", 0.86, hours_ago=3),
        quality("gpt-4.1", "gpt-4.1-2025-09-01", 0.41, hours_ago=0),
    ],
    features=[feature("chat")],
)


@dataclass
class Incident:
    id: str
    handle: WorkflowHandle
    kit: RunbookKit

    async def state(self) -> IncidentState:
        return await self.handle.query(IncidentWorkflow.state)

    async def has(self, kind: str) -> bool:
        return any(entry.kind == kind for entry in (await self.state()).timeline)

    async def at_level(self, level: int) -> bool:
        return (await self.state()).level == level

    async def in_force(self) -> list[str]:
        return sorted(ref.kind for ref in (await self.kit.controls.list_for(self.id)).controls)


class Stage:
    def __init__(self, env: WorkflowEnvironment, settings: Settings, engine: Engine) -> None:
        self.env, self.settings, self.engine = env, settings, engine
        self.slack = SlackActivities(worker.make_slack_client(settings))

    @contextlib.asynccontextmanager
    async def open(
        self,
        trigger: Trigger,
        severity: Severity,
        snapshot: Snapshot,
        after: Judge,
        updates_per_run: int = 1000,
        canary: CanaryJudge = too_little_traffic,
    ) -> AsyncIterator[Incident]:
        kit = RunbookKit(self.env.client, self.engine, snapshot, after, canary)
        notify = NotificationPlan(
            slack_channel="#llm-oncall",
            runbook=RunbookPlan(
                verify_after_seconds=120,
                feature_priorities={"chat": "critical", "summaries": "low"},
            ),
        )
        incident_id = f"incident-{trigger}-global-{uuid.uuid4().hex[:8]}"
        kit.incident_id = incident_id
        queue = self.settings.task_queue
        opener = IncidentActivities(self.env.client, queue, notify, self.engine)
        async with Worker(
            self.env.client,
            task_queue=queue,
            workflows=[IncidentWorkflow, *runbooks.workflows()],
            activities=[
                *kit.activities(),
                self.slack.post_incident,
                self.slack.update_incident,
                self.slack.reply,
                self.slack.notify,
                self.slack.ask_approval,
                self.slack.show_approval,
            ],
        ):
            breach = Breach(
                trigger=trigger,
                scope="global",
                severity=severity,
                observed_at=datetime.now(UTC),
                summary=f"synthetic {trigger}",
                metrics={"calls": 1000},
            )
            if updates_per_run == 1000:
                await opener.open_or_update(
                    [OpenIncidentRequest(breach, proposed_id=incident_id, known_id=incident_id)]
                )
            else:  # what the opener starts, with a short run before continuing as new
                await self.env.client.start_workflow(
                    IncidentWorkflow.run,
                    IncidentInput(
                        incident_id,
                        trigger,
                        "global",
                        severity,
                        breach.observed_at,
                        notify=notify,
                        updates_per_run=updates_per_run,
                    ),
                    id=incident_id,
                    task_queue=queue,
                )
            handle = self.env.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
            try:
                yield Incident(incident_id, handle, kit)
            finally:
                await close_incidents([handle])


@pytest.fixture
def stage(time_skipping_env: WorkflowEnvironment, settings: Settings, engine: Engine) -> Stage:
    return Stage(time_skipping_env, settings, engine)


def replies(slack: FakeSlack) -> str:
    return "\n".join(reply for message in slack.top_level() for reply in message.replies)


async def test_a_mitigation_that_does_not_help_is_rolled_back_and_escalates(
    stage: Stage, fake_slack: FakeSlack
) -> None:
    async with stage.open(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV2, RATE_LIMITED, never_recovers
    ) as incident:
        await eventually(lambda: incident.has("mitigation"))
        state = await incident.state()
        assert state.status == IncidentStatus.MITIGATING  # before anyone acknowledged
        assert state.runbook == "rate_limit_exhaustion"
        # search throttled, summaries (low) queued, chat (critical) left at its pace.
        assert await incident.in_force() == ["backoff", "queue", "rpm"]

        await stage.env.sleep(timedelta(minutes=4))  # past the verification
        await eventually(lambda: incident.at_level(2))
        state = await incident.state()
        assert await incident.in_force() == []
        assert state.status == IncidentStatus.DETECTED
        assert state.verification == "not_recovered"
        [escalated] = [e for e in state.timeline if e.kind == "escalated"]
        assert "mitigation did not help" in escalated.text
        assert "Platform team: request an emergency quota increase" in escalated.text
        told = replies(fake_slack)
        assert "*diagnosis*" in told
        assert "30.0% of 1000 calls rate-limited" in told
        assert "*rolled back*" in told


async def test_a_verified_mitigation_auto_resolves_after_a_quiet_period_keeping_controls(
    stage: Stage, fake_slack: FakeSlack
) -> None:
    helps = recovered_if(lambda controls: any(c.kind == "backoff" for c in controls))
    async with stage.open(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV3, RATE_LIMITED, helps
    ) as incident:
        await eventually(lambda: incident.has("mitigation"))
        await stage.env.sleep(timedelta(minutes=4))
        await eventually(lambda: incident.has("verified"))
        state = await incident.state()
        assert state.status == IncidentStatus.MITIGATING
        assert state.verification == "recovered"
        assert state.controls  # kept while the incident is open
        assert await incident.in_force() != []

        await stage.env.sleep(timedelta(minutes=16))  # SEV3: auto-resolve after 15 min quiet
        result = await incident.handle.result()
        assert result.status == IncidentStatus.RESOLVED
        assert result.resolved_by == "pagerloop"
        # What keeps the signal quiet stays in force (until it expires): reverting it would
        # bring the breach straight back.
        assert await incident.in_force() == ["backoff", "queue", "rpm"]
        kinds = [entry.kind for entry in result.timeline]
        assert kinds.index("verified") < kinds.index("resolved") < kinds.index("controls_kept")
        assert "controls_reverted" not in kinds
        assert "auto-resolved" in replies(fake_slack)


async def test_a_runbook_that_needs_an_ack_diagnoses_first_and_resolve_can_keep_controls(
    stage: Stage,
) -> None:
    helps = recovered_if(lambda controls: any(c.kind == "pin" for c in controls))
    async with stage.open(
        Trigger.QUALITY_DEGRADATION, Severity.SEV2, MODEL_UPDATE, helps
    ) as incident:
        await eventually(lambda: incident.has("diagnosis"))
        state = await incident.state()
        assert state.status == IncidentStatus.DETECTED
        assert "gpt-4.1-2025-04-14 scored 0.86" in state.diagnosis
        assert await incident.in_force() == []  # nothing changes before an acknowledgement

        await incident.handle.execute_update(
            IncidentWorkflow.acknowledge, ActionRequest("U024BE7LH", "slack")
        )
        await eventually(lambda: incident.has("mitigation"))
        assert (await incident.state()).status == IncidentStatus.MITIGATING
        assert await incident.in_force() == ["pin"]
        await stage.env.sleep(timedelta(minutes=4))
        await eventually(lambda: incident.has("verified"))
        # SEV2 never resolves by itself: it proposes.
        assert await incident.has("proposed")

        await incident.handle.execute_update(
            IncidentWorkflow.resolve, ActionRequest("U024BE7LH", "slack", keep_controls=True)
        )
        result = await incident.handle.result()
        assert result.status == IncidentStatus.RESOLVED
        assert await incident.in_force() == ["pin"]
        assert "controls_kept" in [entry.kind for entry in result.timeline]


async def test_resolving_while_the_runbook_verifies_cancels_it_and_reverts(stage: Stage) -> None:
    async with stage.open(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV2, RATE_LIMITED, never_recovers
    ) as incident:
        await eventually(lambda: incident.has("mitigation"))
        assert await incident.in_force() != []
        await incident.handle.execute_update(
            IncidentWorkflow.resolve, ActionRequest("U024BE7LH", "cli")
        )
        result = await incident.handle.result()
        assert result.status == IncidentStatus.RESOLVED
        assert await incident.in_force() == []
        kinds = [entry.kind for entry in result.timeline]
        assert "controls_reverted" in kinds
        after_resolve = kinds[kinds.index("resolved") :]
        assert not {"escalated", "verification", "verified", "rolled_back"} & set(after_resolve)
        child = stage.env.client.get_workflow_handle(f"{incident.id}-runbook-1")
        assert (await child.describe()).status == WorkflowExecutionStatus.CANCELED


async def test_an_ack_that_ends_a_run_still_mitigates_in_the_next_and_resolve_reverts(
    stage: Stage,
) -> None:
    async with stage.open(
        Trigger.QUALITY_DEGRADATION, Severity.SEV2, MODEL_UPDATE, never_recovers, updates_per_run=2
    ) as incident:
        await eventually(lambda: incident.has("diagnosis"))
        await incident.handle.execute_update(
            IncidentWorkflow.add_note, ActionRequest("U024BE7LH", "cli", "looking")
        )
        # The second update: this run is due to continue as new the moment it is acknowledged.
        await incident.handle.execute_update(
            IncidentWorkflow.acknowledge, ActionRequest("U024BE7LH", "cli")
        )
        await eventually(lambda: incident.has("mitigation"))
        assert await incident.in_force() == ["pin"]
        assert (await incident.handle.describe()).run_id != incident.handle.first_execution_run_id

        await incident.handle.execute_update(
            IncidentWorkflow.resolve, ActionRequest("U024BE7LH", "cli")
        )
        result = await incident.handle.result()
        assert result.status == IncidentStatus.RESOLVED
        assert await incident.in_force() == []
        assert "controls_reverted" in [entry.kind for entry in result.timeline]


async def test_an_open_incident_keeps_its_controls_from_expiring(
    stage: Stage, engine: Engine
) -> None:
    helps = recovered_if(lambda controls: any(c.kind == "backoff" for c in controls))
    async with stage.open(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV2, RATE_LIMITED, helps
    ) as incident:
        await eventually(lambda: incident.has("mitigation"))
        await stage.env.sleep(timedelta(minutes=4))
        await eventually(lambda: incident.has("proposed"))  # SEV2: left open for a person
        before = {
            c.key: c.expires_at for c in controls.active(engine, datetime.now(UTC), incident.id)
        }

        await stage.env.sleep(timedelta(minutes=61))

        def extended() -> bool:
            now = datetime.now(UTC)
            after = {c.key: c.expires_at for c in controls.active(engine, now, incident.id)}
            return after.keys() == before.keys() and all(after[k] > before[k] for k in before)

        await eventually(extended)


async def test_resolve_and_keep_controls_from_slack(
    stage: Stage, fake_slack: FakeSlack, settings: Settings, engine: Engine
) -> None:
    def keep_button() -> Message | None:
        for message in fake_slack.top_level():
            actions = [b for b in message.blocks if b["type"] == "actions"]
            ids = [e["action_id"] for block in actions for e in block["elements"]]
            if RESOLVE_KEEP_ACTION in ids:
                return message
        return None

    async with stage.open(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV2, RATE_LIMITED, never_recovers
    ) as incident:
        message = await eventually(keep_button)  # offered once controls are in force
        body, headers = button_click(message, RESOLVE_KEEP_ACTION, "U024BE7LH", SIGNING_SECRET)
        app = worker.build_api(settings, stage.env.client, engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            clicked = await api.post("/slack/interactions", content=body, headers=headers)
        assert clicked.status_code == 200
        result = await incident.handle.result()
        assert result.status == IncidentStatus.RESOLVED
        assert result.resolved_by == "U024BE7LH"
        assert await incident.in_force() == ["backoff", "queue", "rpm"]
        kinds = [entry.kind for entry in result.timeline]
        assert "controls_kept" in kinds
        assert "controls_reverted" not in kinds


async def test_a_cost_incident_canaries_its_reroute_and_promotes_it_once_approved(
    stage: Stage, fake_slack: FakeSlack
) -> None:
    spending = Snapshot(features=[feature("summaries", cost=41.0, share=0.82, concurrency=8.0)])
    cheaper = recovered_if(lambda controls: any(c.kind == "reroute" for c in controls))
    async with stage.open(
        Trigger.COST_SPIKE, Severity.SEV2, spending, cheaper, canary=canary_verdict("promote")
    ) as incident:
        await eventually(lambda: incident.has("canary"))
        # The reroute on a slice, alone: a cache would take calls out of the comparison.
        refs = (await incident.kit.controls.list_for(incident.id)).controls
        assert {(r.kind, r.feature, r.fraction) for r in refs} == {
            ("reroute", None, 0.1),
            ("reroute", "chat", 0.1),
        }

        await stage.env.sleep(timedelta(minutes=4))  # the canary's window
        await eventually(lambda: incident.has("approval_asked"))
        [ask] = (await incident.state()).pending_approvals()
        # chat is critical: it keeps mini.
        assert ask.action == (
            "Promote to all traffic: reroute gpt-4.1 -> gpt-4.1-nano; "
            "reroute gpt-4.1 -> gpt-4.1-mini (feature chat)"
        )
        decision = ApprovalDecision(ask.approval_id, True, "U024BE7LH", channel="slack")
        await incident.handle.execute_update(IncidentWorkflow.decide_approval, decision)

        # summaries is low priority: shedding it is asked too, and denied.
        await eventually(lambda: has_pending(incident))
        [shed] = (await incident.state()).pending_approvals()
        assert shed.action == "Disable the low-priority features summaries"
        decision = ApprovalDecision(shed.approval_id, False, "U024BE7LH", channel="slack")
        await incident.handle.execute_update(IncidentWorkflow.decide_approval, decision)

        await eventually(lambda: incident.has("mitigation"))
        refs = (await incident.kit.controls.list_for(incident.id)).controls
        assert "disable" not in {r.kind for r in refs}
        promoted = {(r.feature, r.value, r.fraction) for r in refs if r.kind == "reroute"}
        assert promoted == {(None, "gpt-4.1-nano", None), ("chat", "gpt-4.1-mini", None)}
        await stage.env.sleep(timedelta(minutes=4))  # the verification
        await eventually(lambda: incident.has("verified"))
        told = replies(fake_slack)
        assert "canary on 10% of the traffic: reroute gpt-4.1 -> gpt-4.1-nano" in told
        assert "canary promoted: promote (synthetic)" in told
        # Each ask in the thread now says who decided.
        asks = [m.text for top in fake_slack.top_level() for m in top.thread]
        assert (
            ":white_check_mark: Approved by <@U024BE7LH>: Promote to all traffic: "
            "reroute gpt-4.1 -> gpt-4.1-nano; reroute gpt-4.1 -> gpt-4.1-mini (feature chat)"
        ) in asks
        assert ":no_entry: Denied by <@U024BE7LH>: Disable the low-priority features summaries" in (
            asks
        )


async def has_pending(incident: Incident) -> bool:
    return bool((await incident.state()).pending_approvals())
