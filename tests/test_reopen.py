"""Reopen, don't re-page: a trigger breaching again within its rule's cooldown after its
incident resolved brings that incident back (a new run of its workflow, the same id) at the
level that resolved it, naming whoever resolved it, instead of opening a new one. The pure
decision, then the detector's activity against the real IncidentWorkflow on the local dev
server with Slack, PagerDuty and Jira on their fakes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.incidents import (
    IncidentActivities,
    OpenIncidentRequest,
    OpenIncidentResult,
    RecoveryReport,
    RecoveryResults,
)
from activities.metrics import WindowQuery
from config.settings import Settings
from detectors.config import RulesFile, RulesFileError, apply
from detectors.detector import (
    DetectorConfig,
    DetectorInput,
    DetectorStatus,
    DetectorWorkflow,
    TriggerState,
    _reopenable,
)
from detectors.evaluation import Finding
from domain.aggregates import Aggregate, WindowAggregates
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentState,
    IncidentStatus,
    Severity,
    Trigger,
)
from domain.incident_machine import (
    Notify,
    Opened,
    Policy,
    Reopened,
    Resolve,
    decide,
    reopen_refusal,
)
from tests.conftest import incident_opener
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def breach_at(at: datetime, severity: Severity = Severity.SEV2) -> Breach:
    return Breach(Trigger.ERROR_RATE, "global", severity, at, "error rate 9.0% over 5.0%")


def resolved_by(user: str, channel: str, at: datetime) -> IncidentState:
    state = IncidentState(
        "incident-x", Trigger.ERROR_RATE, "global", Severity.SEV2, IncidentStatus.DETECTED, T0
    )
    state, _ = decide(state, Opened(), Policy(), T0)
    state.level, state.level_name = 2, "L2"  # escalated once before it was resolved
    state, _ = decide(state, Resolve(ActionRequest(user, channel)), Policy(), at)
    return state


# --- the decision ------------------------------------------------------------------------------


def test_a_reopened_incident_is_detected_again_at_the_level_that_resolved_it() -> None:
    state = resolved_by("U0ALICE", "slack", T0 + timedelta(minutes=10))
    again = T0 + timedelta(minutes=12)
    state.acknowledged_by, state.runbook_phase = "U0ALICE", "done"

    after, effects = decide(state, Reopened(breach_at(again, Severity.SEV1)), Policy(), again)

    assert after.status == IncidentStatus.DETECTED
    assert (after.reopened, after.reopened_at) == (1, again)
    assert after.resolved_by is None
    assert after.resolved_at is None
    assert after.acknowledged_by is None
    assert after.runbook_phase == ""
    assert (after.level, after.level_name) == (2, "L2")
    assert after.severity == Severity.SEV1  # the breach is worse than it was
    assert after.ack_by is not None
    assert after.ack_by > again
    assert after.episode_key == "incident-x/reopened-1"
    [notify] = [e for e in effects if isinstance(e, Notify)]
    assert (notify.kind, notify.level.name) == ("reopened", "L2")
    reopened = [e for e in after.timeline if e.kind == "reopened"]
    assert len(reopened) == 1
    assert "2 min after U0ALICE resolved it" in reopened[0].text
    assert state.status == IncidentStatus.RESOLVED  # the input is never modified


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("open", "is not resolved"),
        ("merged", "was merged into incident-wide"),
        ("late", "beyond the cooldown of 5 min"),
        ("other", "not rate_limit_exhaustion on global"),
    ],
)
def test_only_a_resolved_incident_of_the_same_trigger_within_the_cooldown_reopens(
    change: str, why: str
) -> None:
    resolved_at = T0 + timedelta(minutes=10)
    state = resolved_by("alice", "cli", resolved_at)
    breach = breach_at(resolved_at + timedelta(seconds=299))
    assert reopen_refusal(state, breach, 300, breach.observed_at) is None
    if change == "open":
        state.status, state.resolved_at = IncidentStatus.ACKNOWLEDGED, None
    elif change == "merged":
        state.merged_into = "incident-wide"
    elif change == "late":
        breach.observed_at = resolved_at + timedelta(seconds=301)
    else:
        breach.trigger = Trigger.RATE_LIMIT_EXHAUSTION
    refused = reopen_refusal(state, breach, 300, breach.observed_at)
    assert refused is not None
    assert why in refused


def test_the_detector_reopens_its_own_last_incident_within_the_longest_firing_cooldown() -> None:
    closed = TriggerState(closed_id="incident-a", closed_at=T0)
    finding = Finding(
        Trigger.ERROR_RATE, "global", Severity.SEV2, "bad", {}, ["error_rate"], None, 300
    )
    assert _reopenable(closed, finding, T0 + timedelta(seconds=300)) == "incident-a"
    assert _reopenable(closed, finding, T0 + timedelta(seconds=301)) is None
    assert _reopenable(TriggerState(), finding, T0) is None
    finding.cooldown_seconds = 0  # the rules file turned it off
    assert _reopenable(closed, finding, T0 + timedelta(seconds=1)) is None


def test_the_rules_file_sets_a_rules_cooldown_within_a_day() -> None:
    rules = apply(RulesFile.model_validate({"rules": {"error_rate": {"cooldown_seconds": 900}}}))
    by_name = {rule.name: rule for rule in rules.rules}
    assert by_name["error_rate"].cooldown_seconds == 900
    assert by_name["latency_p95"].cooldown_seconds == 300  # the seed's 300 s
    with pytest.raises(ValueError, match="cooldown_seconds"):
        RulesFile.model_validate({"rules": {"error_rate": {"cooldown_seconds": 86_401}}})
    with pytest.raises((ValueError, RulesFileError), match="cooldown_seconds"):
        RulesFile.model_validate({"rules": {"error_rate": {"cooldown_seconds": -1}}})


# --- on the dev server -------------------------------------------------------------------------


@pytest.fixture
def reopen_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"runbooks_enabled": False})


@pytest.fixture
async def activities(
    dev_env: WorkflowEnvironment, reopen_settings: Settings
) -> AsyncIterator[IncidentActivities]:
    async with incident_opener(dev_env.client, reopen_settings) as opener:
        yield opener


async def state_of(client: Client, incident_id: str) -> IncidentState:
    found: IncidentState = await client.get_workflow_handle(incident_id).query(
        IncidentWorkflow.state
    )
    return found


async def open_and_resolve(
    activities: IncidentActivities, client: Client, user: str, channel: str
) -> tuple[str, IncidentState]:
    proposed = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
    [opened] = await activities.open_or_update(
        [OpenIncidentRequest(breach_at(datetime.now(UTC)), proposed)]
    )
    assert opened.incident_id == proposed
    assert opened.opened
    handle = client.get_workflow_handle(proposed)
    # At L2, where SEV2 also opens a Jira ticket.
    await handle.execute_update(IncidentWorkflow.escalate, ActionRequest(user, channel))

    async def told() -> IncidentState | None:
        found = await state_of(client, proposed)
        return found if found.slack_message and found.paged and found.jira_issue else None

    await eventually(told)
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest(user, channel))
    await handle.result()
    return proposed, await state_of(client, proposed)


async def test_a_breach_within_the_cooldown_reopens_the_resolved_incident_and_pages_its_resolver(
    activities: IncidentActivities,
    dev_env: WorkflowEnvironment,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
    fake_jira: FakeJira,
) -> None:
    client = dev_env.client
    incident_id, resolved = await open_and_resolve(activities, client, "U0ALICE", "slack")
    assert resolved.jira_issue is not None
    await eventually(lambda: fake_jira.issues[resolved.jira_issue]["status"] == "Done")
    pages = len(fake_pagerduty.accepted_events("trigger"))
    posts = len(fake_slack.posts())

    [result] = await activities.open_or_update(
        [
            OpenIncidentRequest(
                breach_at(datetime.now(UTC)),
                f"incident-error_rate-global-{uuid.uuid4().hex[:8]}",
                reopen=incident_id,
                cooldown_seconds=300,
            )
        ]
    )

    assert (result.incident_id, result.reopened, result.opened) == (incident_id, True, False)
    back = await state_of(client, incident_id)
    assert back.status == IncidentStatus.DETECTED
    assert back.reopened == 1
    assert back.level_name == "L2"  # the level that resolved it, not L1 again
    assert [e.kind for e in back.timeline].count("opened") == 1  # the same incident, back
    # A new run of the same workflow: the resolved one closed, this one running.
    runs = [run.status async for run in client.list_workflows(f"WorkflowId = '{incident_id}'")]
    assert sorted(runs, key=lambda s: s.value) == sorted(
        [WorkflowExecutionStatus.COMPLETED, WorkflowExecutionStatus.RUNNING], key=lambda s: s.value
    )

    def reopened_replies() -> list[str]:
        return [
            c["text"]
            for c in fake_slack.calls("chat.postMessage")
            if c.get("thread_ts") and "*reopened*" in str(c.get("text"))
        ]

    [reply] = await eventually(reopened_replies)
    assert "<@U0ALICE>" in reply  # whoever resolved it hears first
    # Paged again under the incident's dedup key (PagerDuty opens a new alert for it)...
    await eventually(lambda: len(fake_pagerduty.accepted_events("trigger")) == pages + 1)
    assert fake_pagerduty.accepted_events("trigger")[-1]["dedup_key"] == incident_id
    # ... its ticket back out of Done with a comment, and no second Slack message or ticket.
    await eventually(lambda: fake_jira.issues[resolved.jira_issue]["status"] == "To Do")
    assert len(fake_jira.issues) == 1
    assert len(fake_slack.posts()) == posts  # its message updated, not a new one
    assert fake_slack.calls("chat.update")

    # Resolved again, it closes again: the detector may reopen it once more.
    handle = client.get_workflow_handle(incident_id)
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("bob", "cli"))
    await handle.result()
    await eventually(lambda: fake_jira.issues[resolved.jira_issue]["status"] == "Done")


async def test_past_the_cooldown_or_without_one_a_new_incident_opens(
    activities: IncidentActivities, dev_env: WorkflowEnvironment
) -> None:
    client = dev_env.client
    incident_id, resolved = await open_and_resolve(activities, client, "alice", "cli")
    assert resolved.resolved_at is not None
    late = breach_at(resolved.resolved_at + timedelta(seconds=301))
    fresh = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"

    [result] = await activities.open_or_update(
        [OpenIncidentRequest(late, fresh, reopen=incident_id, cooldown_seconds=300)]
    )

    assert (result.incident_id, result.opened, result.reopened) == (fresh, True, False)
    assert (await state_of(client, incident_id)).status == IncidentStatus.RESOLVED
    await client.get_workflow_handle(fresh).terminate("test over")


# --- what the email says ---------------------------------------------------------------------


def test_a_reopened_incident_emails_anew_in_the_same_thread() -> None:
    from activities.email import EmailRequest, build_message, root_message_id

    state = resolved_by("alice", "cli", T0 + timedelta(minutes=10))
    first_resolve = build_message(
        EmailRequest(state, "resolved", ["oncall@example.com"]), "p@example.com", T0
    )
    again = T0 + timedelta(minutes=12)
    state, _ = decide(state, Reopened(breach_at(again)), Policy(), again)
    reopened = build_message(
        EmailRequest(state, "reopened", ["oncall@example.com"], level="L2", reason="back"),
        "p@example.com",
        again,
    )
    state, _ = decide(state, Resolve(ActionRequest("bob", "cli")), Policy(), again)
    second_resolve = build_message(
        EmailRequest(state, "resolved", ["oncall@example.com"]), "p@example.com", again
    )

    assert "Reopened at L2: back" in reopened.get_body().get_content()  # type: ignore[union-attr]
    ids = {m["Message-ID"] for m in (first_resolve, reopened, second_resolve)}
    assert len(ids) == 3  # the second resolve is not taken for the first one already sent
    assert reopened["In-Reply-To"] == root_message_id(state.incident_id)


def test_the_slack_message_and_thread_say_it_was_reopened_and_to_whom() -> None:
    from activities.slack import incident_blocks, reopened_reply

    state = resolved_by("U0ALICE", "slack", T0 + timedelta(minutes=10))
    again = T0 + timedelta(minutes=12)
    state, _ = decide(state, Reopened(breach_at(again)), Policy(), again)

    assert "reopened <!date^" in str(incident_blocks(state))
    reply = reopened_reply(state, "breaching again")
    assert reply.startswith("*reopened* <@U0ALICE>: breaching again")
    assert "at L2" in reply
    by_cli = resolved_by("alice", "cli", T0 + timedelta(minutes=10))
    by_cli, _ = decide(by_cli, Reopened(breach_at(again)), Policy(), again)
    assert "*reopened* alice: " in reopened_reply(by_cli, "x")


def new_id() -> str:
    return f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"


async def test_a_retried_reopen_lands_on_the_reopened_incident_and_opens_nothing(
    activities: IncidentActivities, dev_env: WorkflowEnvironment, fake_pagerduty: FakePagerDuty
) -> None:
    """The detector's activity is retried as a whole batch: a reopen asked again finds the
    incident open again and reports the breach to it, instead of opening a second one."""
    client = dev_env.client
    incident_id, _ = await open_and_resolve(activities, client, "alice", "cli")
    request = OpenIncidentRequest(
        breach_at(datetime.now(UTC)), new_id(), reopen=incident_id, cooldown_seconds=300
    )
    [first] = await activities.open_or_update([request])
    [again] = await activities.open_or_update([request])

    assert (first.incident_id, again.incident_id) == (incident_id, incident_id)
    # Found open again (by visibility, or by the reopen asked once more): its episode 1.
    assert (again.episode, again.opened) == (1, False)
    query = "WorkflowType = 'IncidentWorkflow' AND ExecutionStatus = 'Running'"
    running = {w.id async for w in client.list_workflows(query)}
    assert incident_id in running
    assert request.proposed_id not in running
    assert (await state_of(client, incident_id)).breach_count >= 2


async def test_the_incident_on_record_found_resolved_is_reopened_once_its_run_has_ended(
    activities: IncidentActivities,
    dev_env: WorkflowEnvironment,
    fake_slack: FakeSlack,
) -> None:
    """The detector hears of a close only when the resolved run ends (after its vendors, its
    report): meanwhile it reports to the incident on record, which refuses. That asks again
    (pending, nothing opens) while the run finishes, then reopens it."""
    client = dev_env.client
    proposed = new_id()
    [opened] = await activities.open_or_update(
        [OpenIncidentRequest(breach_at(datetime.now(UTC)), proposed)]
    )
    assert opened.incident_id == proposed

    async def posted() -> bool:
        return (await state_of(client, proposed)).slack_message is not None

    await eventually(posted)
    fake_slack.delay_next("chat.update", 4)  # the resolve's update keeps the run going a while
    handle = client.get_workflow_handle(proposed)
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))

    def on_record() -> OpenIncidentRequest:
        return OpenIncidentRequest(
            breach_at(datetime.now(UTC)), new_id(), known_id=proposed, cooldown_seconds=300
        )

    [pending] = await activities.open_or_update([on_record()])
    assert (pending.incident_id, pending.reopen_pending, pending.opened) == (None, True, False)
    await handle.result()
    [reopened] = await activities.open_or_update([on_record()])
    assert (reopened.incident_id, reopened.reopened) == (proposed, True)
    assert (await state_of(client, proposed)).reopened == 1


def test_an_episode_key_names_the_incident_and_its_reopening() -> None:
    from domain.incident import episode_of

    assert episode_of("incident-error_rate-global-20261206T120000Z") == (
        "incident-error_rate-global-20261206T120000Z",
        0,
    )
    assert episode_of("incident-x/reopened-2") == ("incident-x", 2)
    assert episode_of("incident-x/reopened-") == ("incident-x/reopened-", 0)


# --- the detector's bookkeeping, against stand-in activities on the time-skipping server --------


async def test_the_detector_asks_to_reopen_its_closed_incident_and_tells_episodes_apart(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    asked: list[OpenIncidentRequest] = []
    episode = 0  # of incident-1, as the stand-in incident answers

    @activity.defn(name="metrics.window_aggregates")
    async def window_aggregates(query: WindowQuery) -> WindowAggregates:
        failing = Aggregate(calls=200, successes=100, errors=100, latency_histogram={120: 200})
        return WindowAggregates.of_scopes(query.end, 300, {"global": failing})

    @activity.defn(name="incidents.open_or_update")
    async def open_or_update(requests: list[OpenIncidentRequest]) -> list[OpenIncidentResult]:
        nonlocal episode
        asked.extend(requests)
        results = []
        for r in requests:
            if r.reopen == "incident-1":
                episode += 1
                results.append(OpenIncidentResult("incident-1", reopened=True, episode=episode))
            else:
                results.append(OpenIncidentResult("incident-1", episode=episode))
        return results

    @activity.defn(name="incidents.report_recovery")
    async def report_recovery(reports: list[RecoveryReport]) -> RecoveryResults:
        return RecoveryResults()

    async def status() -> DetectorStatus:
        found: DetectorStatus = await handle.query(DetectorWorkflow.status)
        return found

    client = time_skipping_env.client
    config = DetectorConfig(interval_seconds=30, window_seconds=300)
    activities: list[Callable[..., Any]] = [window_aggregates, open_or_update, report_recovery]
    async with Worker(
        client, task_queue=task_queue, workflows=[DetectorWorkflow], activities=activities
    ):
        handle = await client.start_workflow(
            DetectorWorkflow.run, DetectorInput(config), id=task_queue, task_queue=task_queue
        )
        try:
            await time_skipping_env.sleep(70)
            opened = (await status()).trigger_states["error_rate|global"]
            assert (opened.incident_id, opened.episode) == ("incident-1", 0)
            assert all(r.cooldown_seconds == 300 and r.reopen is None for r in asked)

            await handle.signal(DetectorWorkflow.incident_closed, "incident-1")
            await time_skipping_env.sleep(40)
            back = (await status()).trigger_states["error_rate|global"]
            [reopen] = [r for r in asked if r.reopen]
            assert (reopen.reopen, reopen.known_id, reopen.cooldown_seconds) == (
                "incident-1",
                None,
                300,
            )
            assert (back.incident_id, back.episode, back.closed_id) == ("incident-1", 1, None)

            # Its first episode's close heard late changes nothing; its own close is heard.
            await handle.signal(DetectorWorkflow.incident_closed, "incident-1")
            assert (await status()).trigger_states["error_rate|global"].episode == 1
            await handle.signal(DetectorWorkflow.incident_closed, "incident-1/reopened-1")
            await time_skipping_env.sleep(40)
            again = (await status()).trigger_states["error_rate|global"]
            assert (again.incident_id, again.episode) == ("incident-1", 2)
            assert [r.reopen for r in asked if r.reopen] == ["incident-1", "incident-1"]
        finally:
            await handle.terminate("test over")
