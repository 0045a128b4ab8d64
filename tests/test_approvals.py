"""Approval for risky runbook steps (`Steps.approve`): the incident's decisions about an ask
(pure), a runbook in the test kit approved, denied and left unanswered (time-skipping server),
and whole incidents where a Deny clicked in Slack stops the step and `pagerloop incidents
approve` lets it go ahead."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from typer.testing import CliRunner

import runbooks
import worker
from activities.incidents import IncidentActivities, OpenIncidentRequest
from activities.slack import (
    APPROVE_ACTION,
    DENY_ACTION,
    SlackActivities,
    approval_blocks,
    parse_approval_value,
)
from cli.main import app as cli_app
from config.settings import Settings
from domain.incident import (
    ActionRequest,
    Approval,
    ApprovalDecision,
    Breach,
    IncidentState,
    IncidentStatus,
    NotificationPlan,
    RunbookPlan,
    Severity,
    SlackMessageRef,
    Trigger,
)
from domain.incident_machine import (
    ApprovalDecided,
    ApprovalExpired,
    ApprovalPosted,
    ApprovalRequested,
    AskApproval,
    ForwardApproval,
    Opened,
    Policy,
    Resolve,
    RunbookFinished,
    ShowApproval,
    decide,
    refusal,
)
from runbooks.base import RunbookSpec
from runbooks.testing import (
    KIT_APPROVER,
    Judge,
    RunbookKit,
    Snapshot,
    never_recovers,
    recovered_if,
)
from tests import approval_runbook
from tests.approval_runbook import REROUTE_ALL
from tests.conftest import SIGNING_SECRET
from tests.fakes.slack import FakeSlack, Message, button_click
from tests.helpers import close_incidents, eventually
from workflows.incident import IncidentWorkflow

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
ASK_ID = "incident-error_rate-global-1-runbook-1/approval-1"
ALLOWED = "U024BE7LH"
POLICY = Policy(allowed_slack_users=(ALLOWED,))


# --- the incident's decisions (pure) ---------------------------------------------------------


def opened() -> IncidentState:
    state = IncidentState(
        incident_id="incident-error_rate-global-1",
        trigger=Trigger.ERROR_RATE,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.DETECTED,
        opened_at=T0,
        runbook="asking",
    )
    state, _ = decide(state, Opened(), POLICY, T0)
    return state


def ask(on_timeout: str = "deny", approval_id: str = ASK_ID) -> Approval:
    return Approval(
        approval_id,
        REROUTE_ALL,
        asked_at=T0,
        expires_at=T0 + timedelta(minutes=15),
        step="reroute_all",
        on_timeout=on_timeout,
    )


def asked(on_timeout: str = "deny") -> IncidentState:
    state, _ = decide(opened(), ApprovalRequested(ask(on_timeout), "asking"), POLICY, T0)
    return state


def denial(user: str = ALLOWED, channel: str = "slack") -> ApprovalDecided:
    return ApprovalDecided(ApprovalDecision(ASK_ID, False, user, channel=channel))


def test_an_ask_waits_on_the_timeline_and_is_put_in_front_of_people() -> None:
    state, effects = decide(opened(), ApprovalRequested(ask(), "asking"), POLICY, T0)
    [approval] = state.pending_approvals()
    assert approval.action == REROUTE_ALL
    assert effects == [AskApproval(ASK_ID)]
    entry = state.timeline[-1]
    assert entry.kind == "approval_asked"
    assert entry.actor == "runbook:asking"
    assert "until 09:15:00 UTC (no answer in 15 min: it is denied)" in entry.text
    again, effects = decide(state, ApprovalRequested(ask(), "asking"), POLICY, T0)
    assert effects == []
    assert len(again.approvals) == 1


def test_a_decision_says_who_decided_reaches_the_runbook_and_updates_the_ask() -> None:
    state = asked()
    posted, _ = decide(state, ApprovalPosted(ASK_ID, SlackMessageRef("C1", "1.2")), POLICY, T0)
    decided, effects = decide(posted, denial(), POLICY, T0 + timedelta(minutes=3))
    [approval] = decided.approvals
    assert (approval.outcome, approval.approved, approval.decided_by) == ("denied", False, ALLOWED)
    assert approval.decided_at == T0 + timedelta(minutes=3)
    assert approval.message == SlackMessageRef("C1", "1.2")
    assert effects == [ForwardApproval(denial().decision), ShowApproval(ASK_ID)]
    entry = decided.timeline[-1]
    assert (entry.kind, entry.actor, entry.channel) == ("denied", ALLOWED, "slack")
    assert entry.text == f"denied by {ALLOWED}: {REROUTE_ALL}"
    assert state.pending_approvals()  # the input state is never modified


def test_decisions_that_cannot_be_taken_are_refused_readably() -> None:
    state = asked()
    assert refusal(state, denial(), POLICY) is None
    assert refusal(state, denial("alice", "cli"), POLICY) is None  # the allow-list is Slack's
    stranger = refusal(state, denial("U0STRANGER"), POLICY)
    assert stranger == (
        "<@U0STRANGER> is not allowed to act on incidents (PAGERLOOP_SLACK_ALLOWED_USERS)"
    )
    unknown = ApprovalDecided(ApprovalDecision("nope", True, ALLOWED, channel="slack"))
    assert refusal(state, unknown, POLICY) == (
        f"incident-error_rate-global-1 has no approval 'nope' (waiting for an answer: {ASK_ID})"
    )
    assert refusal(state, denial(""), POLICY) == "an approval needs the name of who decides"

    decided, _ = decide(state, denial(), POLICY, T0 + timedelta(minutes=2))
    assert refusal(decided, ApprovalDecided(ApprovalDecision(ASK_ID, True, "bob")), POLICY) == (
        f"'{REROUTE_ALL}' was already denied by {ALLOWED} at 2026-12-06 09:02:00 UTC"
    )
    resolved, _ = decide(state, Resolve(ActionRequest("bob", "cli")), POLICY, T0)
    assert "already resolved (by bob" in str(refusal(resolved, denial(), POLICY))


@pytest.mark.parametrize(
    ("on_timeout", "went", "approved"), [("deny", "denied", False), ("proceed", "proceeding", True)]
)
def test_no_answer_in_time_is_what_the_ask_said(on_timeout: str, went: str, approved: bool) -> None:
    state, effects = decide(
        asked(on_timeout), ApprovalExpired(ASK_ID), POLICY, T0 + timedelta(minutes=15)
    )
    [approval] = state.approvals
    assert (approval.outcome, approval.approved) == ("expired", approved)
    assert state.timeline[-1].text == f"no answer in 15 min: {went}: {REROUTE_ALL}"
    assert effects == [ShowApproval(ASK_ID)]
    assert "left unanswered for 15 min" in str(refusal(state, denial(), POLICY))
    again, effects = decide(state, ApprovalExpired(ASK_ID), POLICY, T0)
    assert effects == []
    assert again.timeline == state.timeline


def test_a_decision_that_reaches_the_runbook_after_its_timeout_is_recorded_as_too_late() -> None:
    decided, _ = decide(asked(), ApprovalDecided(ApprovalDecision(ASK_ID, True, "bob")), POLICY, T0)
    expired, _ = decide(decided, ApprovalExpired(ASK_ID), POLICY, T0)
    [approval] = expired.approvals
    assert (approval.outcome, approval.approved) == ("expired", False)  # what the runbook did
    assert expired.timeline[-1].text.endswith("(approved by bob too late)")


def test_asks_nobody_answered_are_withdrawn_when_the_runbook_ends_or_the_incident_resolves() -> (
    None
):
    ended, effects = decide(asked(), RunbookFinished(controls=()), POLICY, T0)
    assert ended.approvals[0].outcome == "withdrawn"
    assert ShowApproval(ASK_ID) in effects
    assert ended.timeline[-1].text == f"no longer asked (the runbook ended): {REROUTE_ALL}"
    resolved, _ = decide(asked(), Resolve(ActionRequest("bob", "cli")), POLICY, T0)
    assert resolved.approvals[0].reason == "resolved by bob"
    assert "withdrawn at" in str(refusal(ended, denial(), Policy()))
    late, effects = decide(
        resolved, ApprovalRequested(ask(approval_id="x/approval-2"), "a"), POLICY, T0
    )
    assert effects == []
    assert len(late.approvals) == 1


def test_the_spec_says_which_steps_ask_at_which_severity() -> None:
    spec = approval_runbook.SPEC
    assert spec.needs_approval("reroute_all", "SEV1")
    assert spec.needs_approval("reroute_all", "SEV2")
    assert not spec.needs_approval("reroute_all", "SEV3")
    assert not spec.needs_approval("disable_features", "SEV1")
    assert not RunbookSpec("x", object, (), True, 5).needs_approval("reroute_all", "SEV1")


def test_the_buttons_carry_the_incident_and_the_ask_and_go_once_answered() -> None:
    pending = ask()
    [_, _, actions] = approval_blocks("incident-1", pending)
    values = {e["action_id"]: e["value"] for e in actions["elements"]}
    assert set(values) == {APPROVE_ACTION, DENY_ACTION}
    assert parse_approval_value(values[DENY_ACTION]) == ("incident-1", ASK_ID)
    assert parse_approval_value("incident-1") is None
    assert parse_approval_value('{"incident_id": 3, "approval_id": "a"}') is None
    done = replace(pending, outcome="denied", decided_by=ALLOWED)
    blocks = approval_blocks("incident-1", done)
    assert [b["type"] for b in blocks] == ["section", "context"]
    assert blocks[0]["text"]["text"] == f":no_entry: Denied by <@{ALLOWED}>: {REROUTE_ALL}"


# --- the runbook on its own (the test kit, time-skipping server) ------------------------------

REROUTE_HELPS = recovered_if(lambda controls: any(c.kind == "reroute" for c in controls))


def kit(
    env: WorkflowEnvironment, engine: Engine, answer: bool | None, after: Judge = REROUTE_HELPS
) -> RunbookKit:
    return RunbookKit(env.client, engine, Snapshot(), after, approvals=lambda action: answer)


async def test_an_approved_step_runs(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    tested = kit(time_skipping_env, engine, True)
    run = await tested.run(approval_runbook.SPEC, severity="SEV2")
    assert [a.text for a in run.asked] == [REROUTE_ALL]
    [approval] = run.report.approvals
    assert approval.approval_id == f"{tested.incident_id}-runbook/approval-1"
    assert (approval.outcome, approval.approved, approval.decided_by) == (
        "approved",
        True,
        KIT_APPROVER,
    )
    assert run.report.verification == "recovered"
    assert run.control("reroute", model="gpt-4.1").value == "gpt-4.1-mini"


async def test_a_denied_step_is_skipped_and_the_report_says_who_denied_it(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    run = await kit(time_skipping_env, engine, False, never_recovers).run(
        approval_runbook.SPEC, severity="SEV2"
    )
    [approval] = run.report.approvals
    assert (approval.outcome, approval.approved, approval.decided_by) == (
        "denied",
        False,
        KIT_APPROVER,
    )
    # The runbook went on without the step: only the unasked cap was in force when verified.
    assert next([c.kind for c in checked] for checked in run.checks) == ["max_tokens"]
    assert "reroute" not in [ref.kind for ref in run.report.rolled_back]


@pytest.mark.parametrize(
    ("severity", "approved", "in_force"),
    [("SEV2", False, ["max_tokens"]), ("SEV1", True, ["max_tokens", "reroute"])],
)
async def test_no_answer_within_the_timeout_denies_or_proceeds_as_asked(
    time_skipping_env: WorkflowEnvironment,
    engine: Engine,
    severity: str,
    approved: bool,
    in_force: list[str],
) -> None:
    run = await kit(time_skipping_env, engine, None, never_recovers).run(
        approval_runbook.SPEC, severity=severity
    )
    [approval] = run.report.approvals
    assert (approval.outcome, approval.approved, approval.decided_by) == ("expired", approved, "")
    assert approval.expires_at - approval.asked_at == timedelta(minutes=15)
    assert approval.decided_at is not None  # when the runbook went on: after the whole wait
    assert approval.decided_at - approval.asked_at >= timedelta(minutes=15)
    assert sorted(c.kind for c in run.checks[0]) == in_force


async def test_a_step_the_spec_does_not_list_at_that_severity_goes_ahead_unasked(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    run = await kit(time_skipping_env, engine, False).run(approval_runbook.SPEC, severity="SEV3")
    assert run.asked == []
    assert run.report.approvals == []
    assert run.control("reroute", model="gpt-4.1").value == "gpt-4.1-mini"
    diagnosed = await kit(time_skipping_env, engine, True).run(
        approval_runbook.SPEC, severity="SEV2", may_mitigate=False
    )
    assert diagnosed.asked == []
    assert diagnosed.controls == []


# --- whole incidents: Slack and the CLI (time-skipping server) --------------------------------


@dataclass
class Incident:
    id: str
    handle: WorkflowHandle
    kit: RunbookKit

    async def state(self) -> IncidentState:
        return await self.handle.query(IncidentWorkflow.state)

    async def has(self, kind: str) -> bool:
        return any(entry.kind == kind for entry in (await self.state()).timeline)

    async def in_force(self) -> list[str]:
        return sorted(ref.kind for ref in (await self.kit.controls.list_for(self.id)).controls)


@contextlib.asynccontextmanager
async def incident_that_asks(
    env: WorkflowEnvironment,
    settings: Settings,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    severity: Severity = Severity.SEV2,
) -> AsyncIterator[Incident]:
    """An error_rate incident whose runbook (tests/approval_runbook.py) asks before rerouting;
    Slack is the real client against the fake, only ALLOWED may act from Slack."""
    shipped = runbooks.runbook_for

    def with_asking(trigger: str, *args: object) -> RunbookSpec | None:
        return approval_runbook.SPEC if trigger == "error_rate" else shipped(trigger)

    # The workflow's sandbox imports `runbook_for` from the (passed-through) package.
    monkeypatch.setattr(runbooks, "runbook_for", with_asking)
    tested = RunbookKit(env.client, engine, Snapshot(), REROUTE_HELPS)
    notify = NotificationPlan(
        slack_channel="#llm-oncall",
        allowed_slack_users=[ALLOWED],
        runbook=RunbookPlan(verify_after_seconds=120),
    )
    incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
    tested.incident_id = incident_id
    slack = SlackActivities(worker.make_slack_client(settings))
    opener = IncidentActivities(env.client, settings.task_queue, notify, engine)
    async with Worker(
        env.client,
        task_queue=settings.task_queue,
        workflows=[IncidentWorkflow, approval_runbook.AskingRunbook],
        activities=[
            *tested.activities(),
            slack.post_incident,
            slack.update_incident,
            slack.reply,
            slack.notify,
            slack.ask_approval,
            slack.show_approval,
        ],
    ):
        breach = Breach(
            trigger=Trigger.ERROR_RATE,
            scope="global",
            severity=severity,
            observed_at=datetime.now(UTC),
            summary="synthetic error_rate",
            metrics={"calls": 1000},
        )
        await opener.open_or_update(
            [OpenIncidentRequest(breach, proposed_id=incident_id, known_id=incident_id)]
        )
        handle = env.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        try:
            yield Incident(incident_id, handle, tested)
        finally:
            await close_incidents([handle])


def the_ask(slack: FakeSlack) -> Message | None:
    """The thread reply with the Approve / Deny buttons, as first posted."""
    for message in slack.top_level():
        for reply in message.thread:
            if any(b.get("block_id") == "approval_actions" for b in reply.blocks):
                return reply
    return None


async def test_a_deny_clicked_in_slack_stops_the_step_and_the_ask_says_who_denied_it(
    time_skipping_env: WorkflowEnvironment,
    settings: Settings,
    engine: Engine,
    fake_slack: FakeSlack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with incident_that_asks(time_skipping_env, settings, engine, monkeypatch) as incident:
        message = await eventually(lambda: the_ask(fake_slack))
        [incident_message] = fake_slack.top_level()
        assert message.thread_ts == incident_message.ts  # in the incident's thread
        assert REROUTE_ALL in message.text
        state = await incident.state()
        assert [a.action for a in state.pending_approvals()] == [REROUTE_ALL]
        assert await incident.in_force() == ["max_tokens"]  # the unasked step went ahead

        original = copy.deepcopy(message)
        app = worker.build_api(settings, time_skipping_env.client, engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:

            async def click(user: str) -> None:
                body, headers = button_click(original, DENY_ACTION, user, SIGNING_SECRET)
                response = await api.post("/slack/interactions", content=body, headers=headers)
                assert response.status_code == 200

            await click("U0STRANGER")  # signed, but not on the allow-list
            await eventually(lambda: len(fake_slack.ephemeral) == 1)
            assert "<@U0STRANGER> is not allowed" in fake_slack.ephemeral[0]["text"]
            assert (await incident.state()).pending_approvals()

            await click(ALLOWED)
            await eventually(lambda: incident.has("denied"))
            # The ask's message now says who decided, without buttons.
            await eventually(lambda: bool(message.edits))
            assert message.text == f":no_entry: Denied by <@{ALLOWED}>: {REROUTE_ALL}"
            assert all(b["type"] != "actions" for b in message.blocks)

            await click(ALLOWED)  # a stale message clicked again
            await eventually(lambda: len(fake_slack.ephemeral) == 2)
            assert f"was already denied by {ALLOWED}" in fake_slack.ephemeral[1]["text"]

        # The runbook went on without the step: it verifies what it did (the cap) alone.
        await eventually(lambda: incident.has("mitigation"))
        state = await incident.state()
        [denied] = [e for e in state.timeline if e.kind == "denied"]
        assert denied.text == f"denied by {ALLOWED}: {REROUTE_ALL}"
        assert (denied.actor, denied.channel) == (ALLOWED, "slack")
        assert [c for c in state.controls if "reroute" in c] == []
        assert await incident.in_force() == ["max_tokens"]


async def test_the_cli_approves_the_one_waiting_step_and_explains_what_it_cannot_do(
    time_skipping_env: WorkflowEnvironment,
    settings: Settings,
    engine: Engine,
    fake_slack: FakeSlack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = time_skipping_env.client
    env = {
        "PAGERLOOP_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "PAGERLOOP_TASK_QUEUE": settings.task_queue,
        "COLUMNS": "300",
    }

    async def cli(*args: str) -> tuple[int, str]:
        done = await asyncio.to_thread(CliRunner().invoke, cli_app, ["incidents", *args], env=env)
        return done.exit_code, done.output

    async with incident_that_asks(time_skipping_env, settings, engine, monkeypatch) as incident:
        await eventually(lambda: the_ask(fake_slack))
        code, shown = await cli("show", incident.id)
        assert code == 0
        assert f"awaiting approval {incident.id}-runbook-1/approval-1" in shown

        code, said = await cli("approve", incident.id, "--by", "alice", "--reason", "budget")
        assert code == 0, said
        assert f"approved by alice: {REROUTE_ALL} (budget)" in said
        await eventually(lambda: incident.has("mitigation"))
        assert await incident.in_force() == ["max_tokens", "reroute"]
        message = the_ask(fake_slack) or next(
            r for m in fake_slack.top_level() for r in m.thread if REROUTE_ALL in r.text
        )
        await eventually(lambda: message.text.startswith(":white_check_mark: Approved by alice"))

        code, said = await cli("deny", incident.id)
        assert code == 1
        assert "has no runbook step waiting for approval" in said
        code, said = await cli("deny", incident.id, "--approval", "nope", "--by", "alice")
        assert code == 1
        assert "refused:" in said
        assert "has no approval 'nope'" in said
    code, said = await cli("approve", "incident-nope")
    assert code == 1
    assert "no incident 'incident-nope'" in said
