"""The incident's decisions without Temporal: `decide(state, event, policy, now)` for every
event, and every escalation path of the built-in SEV1-4 policies.

The expected paths are written out from the seed's escalation table (who is told at each level,
how long each level has), not read back from the policies under test."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter

from domain.escalation import DEFAULT_POLICIES, ChannelTarget, EscalationLevel
from domain.incident import (
    ActionRequest,
    Breach,
    Handover,
    IncidentState,
    IncidentStatus,
    MergeRequest,
    PagedTarget,
    Recovery,
    Severity,
    SlackMessageRef,
    SnoozeRequest,
    Trigger,
)
from domain.incident_machine import (
    Absorbed,
    Acknowledge,
    Acknowledged,
    AddNote,
    BreachReported,
    CancelRunbook,
    ChannelFailed,
    ControlsExtended,
    ControlsReverted,
    DeadlinePassed,
    Effect,
    Escalate,
    Event,
    Merged,
    MergedInto,
    Notify,
    Opened,
    PageCalledOff,
    Paged,
    Policy,
    QuietElapsed,
    RecoveryReported,
    RelatedBreach,
    Resolve,
    Resolved,
    RestartClock,
    RunbookFailed,
    RunbookFinished,
    RunbookProgressed,
    RunbookStarted,
    SeverityRaised,
    Show,
    SlackPosted,
    Snooze,
    Tell,
    TicketOpened,
    VerifiedAwaitingResolve,
    decide,
    next_deadline,
    refusal,
)

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
POLICY = Policy()
ALICE = ActionRequest("alice", "slack")


def fresh(severity: Severity = Severity.SEV2, runbook: str | None = None) -> IncidentState:
    return IncidentState(
        incident_id="incident-error_rate-global-1",
        trigger=Trigger.ERROR_RATE,
        scope="global",
        severity=severity,
        status=IncidentStatus.DETECTED,
        opened_at=T0,
        runbook=runbook,
    )


def opened(severity: Severity = Severity.SEV2, runbook: str | None = None) -> IncidentState:
    state, _ = decide(fresh(severity, runbook), Opened(), POLICY, T0)
    return state


def kinds(effects: list[Effect]) -> list[str]:
    return [type(effect).__name__ for effect in effects]


def told(effects: list[Effect]) -> list[str]:
    return [effect.entry.kind for effect in effects if isinstance(effect, Tell)]


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# --- every escalation path of the built-in policies -----------------------------------------


@dataclass(frozen=True)
class Step:
    level: str
    ack_minutes: int  # how long the level has to acknowledge
    channels: str  # who is told, in the registry's names


# The seed: SEV1/2 page at once, SEV3 starts in Slack and pages from L2, SEV4 starts as a ticket
# and an email; every level posts to the webhook receivers (Alertmanager's repeated firing).
PATHS = {
    Severity.SEV1: (
        [Step("L1", 5, "slack pagerduty webhook"), Step("L2", 10, "slack pagerduty jira webhook"),
         Step("L3", 15, "slack pagerduty jira webhook")], 15),
    Severity.SEV2: (
        [Step("L1", 10, "slack pagerduty webhook"), Step("L2", 15, "slack pagerduty jira webhook"),
         Step("L3", 30, "slack pagerduty jira webhook")], 30),
    Severity.SEV3: (
        [Step("L1", 30, "slack webhook"), Step("L2", 30, "slack pagerduty webhook"),
         Step("L3", 60, "slack pagerduty jira webhook")], 60),
    Severity.SEV4: (
        [Step("L1", 1440, "jira email webhook"), Step("L2", 1440, "slack jira webhook"),
         Step("L3", 1440, "slack pagerduty jira webhook")], 1440),
}  # fmt: skip


@pytest.mark.parametrize("severity", list(PATHS), ids=str)
def test_an_unacknowledged_incident_climbs_its_severitys_levels_then_reminds_the_top(
    severity: Severity,
) -> None:
    steps, repeat_minutes = PATHS[severity]
    state, effects = decide(fresh(severity), Opened(), POLICY, T0)
    now = T0
    for number, step in enumerate(steps, start=1):
        notify = [e for e in effects if isinstance(e, Notify)]
        assert len(notify) == 1, f"{severity} {step.level}: {kinds(effects)}"
        level = notify[0].level
        assert notify[0].kind == ("opened" if number == 1 else "escalated")
        assert " ".join(t.channel for t in level.channels) == step.channels, severity
        assert (state.level, state.level_name) == (number, step.level)
        assert state.ack_by == now + timedelta(minutes=step.ack_minutes)
        deadline = next_deadline(state)
        assert deadline is not None
        assert deadline[1] == "acknowledged"
        now = deadline[0]
        state, effects = decide(state, DeadlinePassed("acknowledged"), POLICY, now)
        if number < len(steps):
            assert told(effects) == ["escalated"]
            assert "not acknowledged within" in state.timeline[-1].text
            assert RestartClock() in effects
    # Past the top: the top's targets are told again, and again after the repeat interval.
    assert told(effects) == ["reminder"]
    assert state.level_name == steps[-1].level
    assert state.remind_at == now + timedelta(minutes=repeat_minutes)
    assert state.ack_by is None
    assert state.resolve_by is None
    reminded = [(e.level.name, e.kind) for e in effects if isinstance(e, Notify)]
    assert reminded == [(steps[-1].level, "reminded")]
    later = state.remind_at
    state, effects = decide(state, DeadlinePassed("reminder"), POLICY, later)
    assert told(effects) == ["reminder"]
    assert state.remind_at == later + timedelta(minutes=repeat_minutes)
    assert state.timeline[-1].text.startswith(f"still not acknowledged at {steps[-1].level}")


@pytest.mark.parametrize("severity", list(PATHS), ids=str)
def test_an_acknowledged_level_escalates_when_it_does_not_resolve_in_time(
    severity: Severity,
) -> None:
    resolve_minutes = {Severity.SEV1: 30, Severity.SEV2: 60, Severity.SEV3: 240}
    state = opened(severity)
    state, _ = decide(state, Acknowledge(ALICE), POLICY, at(1))
    assert state.ack_by is None
    deadline = next_deadline(state)
    assert deadline is not None
    assert deadline == (T0 + timedelta(minutes=resolve_minutes.get(severity, 4320)), "resolved")
    state, effects = decide(state, DeadlinePassed("resolved"), POLICY, deadline[0])
    assert state.level_name == "L2"
    assert state.ack_by is None  # an acknowledged incident is not asked to acknowledge again
    assert "not resolved within" in state.timeline[-1].text
    assert any(isinstance(e, Notify) and e.level.name == "L2" for e in effects)


def test_a_level_recorded_before_channels_existed_tells_whom_it_said() -> None:
    """An open incident's input, recorded with the old per-vendor booleans, decodes (as
    Temporal's pydantic converter does) into the channels they meant."""
    recorded = {
        "name": "L2", "description": "Platform team", "ack_timeout_seconds": 900,
        "resolve_timeout_seconds": 7200, "slack": True, "slack_channel": "#llm-platform",
        "page": True, "jira": False, "jira_project": None,
    }  # fmt: skip
    level = TypeAdapter(EscalationLevel).validate_python(recorded)
    assert level.channels == (
        ChannelTarget("slack", ("#llm-platform",)),
        ChannelTarget("pagerduty"),
    )
    quiet = TypeAdapter(EscalationLevel).validate_python(
        {**recorded, "slack": False, "page": False}
    )
    assert quiet.channels == ()


def test_the_runbooks_escalation_path_names_who_each_level_is() -> None:
    described = DEFAULT_POLICIES["SEV2"].described(("API on-call", "Vendor liaison"))
    policy = Policy({"SEV2": described})
    state, _ = decide(fresh(), Opened(), policy, T0)
    state, _ = decide(state, DeadlinePassed("acknowledged"), policy, at(10))
    assert state.timeline[-1].text.startswith("to L2 (Vendor liaison)")


# --- each event from a given state ------------------------------------------------------------


def breach(severity: Severity = Severity.SEV2, minute: float = 1, summary: str = "5xx") -> Event:
    return BreachReported(
        Breach(Trigger.ERROR_RATE, "global", severity, at(minute), summary, {"error_rate": 0.2})
    )


def after(state: IncidentState, event: Event, minute: float = 1) -> IncidentState:
    return decide(state, event, POLICY, at(minute))[0]


def recovered(state: IncidentState, minute: float = 2) -> IncidentState:
    return after(
        state, RecoveryReported(Recovery(Trigger.ERROR_RATE, "global", at(minute))), minute
    )


def acked(state: IncidentState) -> IncidentState:
    return after(state, Acknowledge(ALICE))


def mitigating(state: IncidentState) -> IncidentState:
    return after(state, RunbookStarted(may_mitigate=True))


def with_controls(state: IncidentState) -> IncidentState:
    return after(state, RunbookProgressed("mitigation", "• throttle chat\n• reroute", "rb"), 2)


@dataclass(frozen=True)
class Case:
    name: str
    given: IncidentState
    event: Event
    status: IncidentStatus
    told: list[str]
    effects: list[str]
    timeline: list[str] | None = None  # kinds appended; None: the same as `told`


SEV2 = opened()
RUNBOOK = opened(runbook="error_rate_runbook")
CASES = [
    Case("first breach", SEV2, breach(), IncidentStatus.DETECTED, [], [], ["breach"]),
    Case("repeated breach adds nothing to the timeline", decide(SEV2, breach(), POLICY, at(1))[0],
         breach(minute=2), IncidentStatus.DETECTED, [], [], []),
    Case("breach after a recovery", recovered(decide(SEV2, breach(), POLICY, at(1))[0]),
         breach(minute=3), IncidentStatus.DETECTED, [], [], ["breach"]),
    Case("worse severity", SEV2, breach(Severity.SEV1), IncidentStatus.DETECTED,
         ["severity_raised"], ["Tell", "Refresh", "SeverityRaised", "RestartClock"],
         ["breach", "severity_raised"]),
    Case("milder severity changes nothing", SEV2, breach(Severity.SEV4), IncidentStatus.DETECTED,
         [], [], ["breach"]),
    Case("recovery", SEV2, RecoveryReported(Recovery(Trigger.ERROR_RATE, "global", at(2))),
         IncidentStatus.DETECTED, ["recovered"], ["Tell", "Refresh"]),
    Case("second recovery is not news", recovered(SEV2),
         RecoveryReported(Recovery(Trigger.ERROR_RATE, "global", at(3))), IncidentStatus.DETECTED,
         [], []),
    Case("acknowledge", SEV2, Acknowledge(ALICE), IncidentStatus.ACKNOWLEDGED, ["acknowledged"],
         ["Tell", "Refresh", "Acknowledged", "RestartClock"]),
    Case("acknowledge while mitigating keeps mitigating", mitigating(RUNBOOK), Acknowledge(ALICE),
         IncidentStatus.MITIGATING, ["acknowledged"],
         ["Tell", "Refresh", "Acknowledged", "RestartClock"]),
    Case("resolve", SEV2, Resolve(ALICE), IncidentStatus.RESOLVED, ["resolved"],
         ["Tell", "Refresh", "Resolved", "CancelRunbook", "RestartClock"]),
    Case("resolve with a runbook reverts its controls", with_controls(RUNBOOK), Resolve(ALICE),
         IncidentStatus.RESOLVED, ["resolved"],
         ["Tell", "Refresh", "Resolved", "CancelRunbook", "RevertRunbookControls",
          "RestartClock"]),
    Case("resolve keeping the controls", with_controls(RUNBOOK),
         Resolve(ActionRequest("alice", "slack", keep_controls=True)), IncidentStatus.RESOLVED,
         ["resolved", "controls_kept"],
         ["Tell", "Refresh", "Resolved", "CancelRunbook", "Tell", "RestartClock"]),
    Case("escalate by hand", SEV2, Escalate(ActionRequest("bob", "api", "need the DBA")),
         IncidentStatus.DETECTED, ["escalated"], ["Tell", "Notify", "RestartClock"]),
    Case("snooze", SEV2, Snooze(SnoozeRequest("alice", 45, "slack")), IncidentStatus.DETECTED,
         ["snoozed"], ["Tell", "Refresh", "RestartClock"]),
    Case("note", SEV2, AddNote(ActionRequest("alice", "api", "looking at the dashboards")),
         IncidentStatus.DETECTED, ["note"], ["Tell"]),
    Case("ack deadline", SEV2, DeadlinePassed("acknowledged"), IncidentStatus.DETECTED,
         ["escalated"], ["Tell", "Notify", "RestartClock"]),
    Case("runbook diagnosis", RUNBOOK, RunbookProgressed("diagnosis", "top feature: chat", "rb"),
         IncidentStatus.DETECTED, ["diagnosis"], ["Tell"]),
    Case("runbook mitigation", mitigating(RUNBOOK),
         RunbookProgressed("mitigation", "• throttle chat", "rb"), IncidentStatus.MITIGATING,
         ["mitigation"], ["Refresh", "Tell"]),
    Case("runbook rolled back", with_controls(mitigating(RUNBOOK)),
         RunbookProgressed("rolled_back", "throttle removed", "rb"), IncidentStatus.MITIGATING,
         ["rolled_back"], ["Refresh", "Tell"]),
    Case("runbook may mitigate", RUNBOOK, RunbookStarted(may_mitigate=True),
         IncidentStatus.MITIGATING, [], ["Refresh"]),
    Case("runbook only diagnoses", RUNBOOK, RunbookStarted(may_mitigate=False),
         IncidentStatus.DETECTED, [], []),
    Case("runbook failed", mitigating(RUNBOOK), RunbookFailed("rb", "boom"),
         IncidentStatus.DETECTED, ["runbook_failed"], ["Show", "Tell", "RevertRunbookControls"]),
    Case("runbook diagnosed, waits for an ack", RUNBOOK, RunbookFinished((), None),
         IncidentStatus.DETECTED, [], []),
    Case("runbook recovered the signal", with_controls(mitigating(RUNBOOK)),
         RunbookFinished(("throttle chat",), "recovered"), IncidentStatus.MITIGATING, [],
         ["Refresh"]),
    Case("runbook did not help", mitigating(RUNBOOK),
         RunbookFinished((), "not_recovered", "error rate 0.3"), IncidentStatus.DETECTED,
         ["escalated"], ["Show", "Tell", "Notify", "RestartClock"]),
    Case("runbook inconclusive, controls stay", with_controls(mitigating(RUNBOOK)),
         RunbookFinished(("throttle chat",), "inconclusive"), IncidentStatus.MITIGATING, [],
         ["Refresh"]),
    Case("quiet after a verified mitigation", with_controls(mitigating(RUNBOOK)),
         QuietElapsed(900), IncidentStatus.RESOLVED, ["resolved", "controls_kept"],
         ["Tell", "Refresh", "Resolved", "CancelRunbook", "Tell", "RestartClock"]),
    Case("verified, a person resolves", RUNBOOK, VerifiedAwaitingResolve(),
         IncidentStatus.DETECTED, ["proposed"], ["Tell"]),
    Case("controls extended", with_controls(RUNBOOK), ControlsExtended(), IncidentStatus.DETECTED,
         [], ["ExtendRunbookControls"]),
    Case("controls reverted", with_controls(RUNBOOK), ControlsReverted(("throttle chat",)),
         IncidentStatus.DETECTED, ["controls_reverted"], ["Tell"]),
    Case("nothing was in force to revert", RUNBOOK, ControlsReverted(()),
         IncidentStatus.DETECTED, [], []),
    Case("paged", SEV2, Paged(PagedTarget("k1", "SEV2", "L1"), "L1"), IncidentStatus.DETECTED,
         [], [], ["paged"]),
    Case("page called off", SEV2, PageCalledOff(), IncidentStatus.DETECTED, [], [],
         ["not_paged"]),
    Case("slack posted", SEV2, SlackPosted(SlackMessageRef("C1", "1.2"), "#llm-oncall"),
         IncidentStatus.DETECTED, [], [], ["notified"]),
    Case("ticket opened", SEV2, TicketOpened("OPS-7"), IncidentStatus.DETECTED, [], [],
         ["ticket"]),
    Case("channel failed", SEV2, ChannelFailed("slack", "post", "channel_not_found"),
         IncidentStatus.DETECTED, [], [], ["notification_failed"]),
    Case("merged into an incident opening now: it has our message, nothing to tell", SEV2,
         MergedInto(MergeRequest("incident-outage", Trigger.API_OUTAGE, "global", True)),
         IncidentStatus.RESOLVED, [], ["Merged", "CancelRunbook", "RestartClock"], ["merged"]),
    Case("merged into one already open: our thread and ticket say where it went", SEV2,
         MergedInto(MergeRequest("incident-outage", Trigger.API_OUTAGE, "global")),
         IncidentStatus.RESOLVED, ["merged"], ["Tell", "Merged", "CancelRunbook", "RestartClock"]),
    Case("merged with a runbook reverts its controls", with_controls(RUNBOOK),
         MergedInto(MergeRequest("incident-outage", Trigger.API_OUTAGE, "global", True)),
         IncidentStatus.RESOLVED, [],
         ["Merged", "CancelRunbook", "RevertRunbookControls", "RestartClock"], ["merged"]),
    Case("a merge asked again changes nothing",
         decide(SEV2, MergedInto(MergeRequest("x", Trigger.API_OUTAGE, "global")), POLICY,
                at(1))[0],
         MergedInto(MergeRequest("x", Trigger.API_OUTAGE, "global")), IncidentStatus.RESOLVED,
         [], []),
    Case("absorbs a milder incident", SEV2, Absorbed(Handover(
             "incident-latency", Trigger.ELEVATED_LATENCY, "global", Severity.SEV3, at(-2))),
         IncidentStatus.DETECTED, ["absorbed"], ["Tell", "Refresh"]),
    Case("absorbs a worse one: its severity", SEV2, Absorbed(Handover(
             "incident-x", Trigger.ELEVATED_LATENCY, "global", Severity.SEV1, at(-2))),
         IncidentStatus.DETECTED, ["absorbed", "severity_raised"],
         ["Tell", "Tell", "Refresh", "SeverityRaised", "RestartClock", "Refresh"]),
    Case("absorbs one acknowledged: so is this", SEV2, Absorbed(Handover(
             "incident-x", Trigger.ELEVATED_LATENCY, "global", Severity.SEV3, at(-2),
             acknowledged_by="bob")),
         IncidentStatus.ACKNOWLEDGED, ["absorbed", "acknowledged"],
         ["Tell", "Tell", "Refresh", "Acknowledged", "RestartClock", "Refresh"]),
    Case("absorbed twice (a retry) is once",
         decide(SEV2, Absorbed(Handover("incident-x", Trigger.ELEVATED_LATENCY, "global",
                                        Severity.SEV3, at(-2))), POLICY, at(1))[0],
         Absorbed(Handover("incident-x", Trigger.ELEVATED_LATENCY, "global", Severity.SEV3,
                           at(-2))), IncidentStatus.DETECTED, [], []),
    Case("a related trigger fires", SEV2,
         RelatedBreach(Breach(Trigger.ELEVATED_LATENCY, "model:o3", Severity.SEV3, at(5), "slow")),
         IncidentStatus.DETECTED, ["related"], ["Tell"]),
    Case("it fires again: not news",
         decide(SEV2, RelatedBreach(Breach(Trigger.ELEVATED_LATENCY, "model:o3", Severity.SEV3,
                                           at(1), "slow")), POLICY, at(1))[0],
         RelatedBreach(Breach(Trigger.ELEVATED_LATENCY, "model:o3", Severity.SEV3, at(5), "slow")),
         IncidentStatus.DETECTED, [], []),
    Case("a related trigger fires worse: the severity is raised", SEV2,
         RelatedBreach(Breach(Trigger.ELEVATED_LATENCY, "model:o3", Severity.SEV1, at(5), "slow")),
         IncidentStatus.DETECTED, ["related", "severity_raised"],
         ["Tell", "Tell", "Refresh", "SeverityRaised", "RestartClock"]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_event(case: Case) -> None:
    before = copy.deepcopy(case.given)
    state, effects = decide(case.given, case.event, POLICY, at(5))
    assert case.given == before, "decide changed the state it was given"
    assert state.status == case.status
    assert told(effects) == case.told
    assert kinds(effects) == case.effects
    appended = [entry.kind for entry in state.timeline[len(before.timeline) :]]
    assert appended == (case.timeline if case.timeline is not None else case.told)
    assert all(entry.at == at(5) for entry in state.timeline[len(before.timeline) :])


# --- what the events leave behind ---------------------------------------------------------------


def test_a_worse_severity_pages_by_the_new_severitys_level() -> None:
    state = opened(Severity.SEV3)
    state, effects = decide(state, breach(Severity.SEV1), POLICY, at(1))
    raised = [e for e in effects if isinstance(e, SeverityRaised)]
    assert state.severity == Severity.SEV1
    assert [e.level.name for e in raised] == ["L1"]
    assert raised[0].level.target("pagerduty") is not None


def test_acknowledging_stops_a_reminder_to_acknowledge_but_not_one_to_resolve() -> None:
    state = opened(Severity.SEV1)
    for minute in (5, 15, 30):
        state, _ = decide(state, DeadlinePassed("acknowledged"), POLICY, at(minute))
    assert state.remind_for == "acknowledged"
    assert state.remind_at is not None
    state, _ = decide(state, Acknowledge(ALICE), POLICY, at(31))
    assert state.remind_at is None
    assert state.remind_for == ""
    state, _ = decide(state, Escalate(ALICE), POLICY, at(32))  # at the top: a reminder
    assert state.remind_for == "resolved"
    assert state.remind_at == at(32 + 15)
    assert state.timeline[-1].actor == "alice"


def test_snooze_pushes_every_pending_deadline_to_at_least_its_length() -> None:
    state = opened()  # SEV2 L1: ack by +10, resolve by +60
    state, _ = decide(state, Snooze(SnoozeRequest("alice", 30)), POLICY, at(2))
    assert (state.ack_by, state.resolve_by) == (at(32), at(60))
    assert "next deadline acknowledged by 09:32 UTC" in state.timeline[-1].text


def test_resolving_ends_every_deadline_and_names_who_resolved() -> None:
    state, effects = decide(opened(), Resolve(ActionRequest("bob", "pagerduty")), POLICY, at(3))
    assert (state.ack_by, state.resolve_by, state.remind_at) == (None, None, None)
    assert next_deadline(state) is None
    assert (state.resolved_by, state.resolved_at) == ("bob", at(3))
    assert Resolved("pagerduty") in effects  # PagerDuty's own resolve is not echoed back
    assert CancelRunbook() in effects


def test_the_acknowledgement_names_its_channel_so_it_is_not_echoed_back() -> None:
    _, effects = decide(opened(), Acknowledge(ActionRequest("pd-user", "pagerduty")), POLICY, T0)
    assert Acknowledged("pagerduty") in effects


def test_a_page_is_kept_once_per_dedup_key() -> None:
    target = PagedTarget("key", "SEV2", "L1")
    state, _ = decide(opened(), Paged(target, "L1"), POLICY, at(1))
    state, _ = decide(state, Paged(target, "L1"), POLICY, at(2))
    assert state.paged == [target]


def test_a_runbook_that_did_not_help_steps_back_then_escalates_shown_in_that_order() -> None:
    state = acked(mitigating(RUNBOOK))
    finished = RunbookFinished((), "not_recovered", "still 30 %")
    state, effects = decide(state, finished, POLICY, at(9))
    shown = [e.state for e in effects if isinstance(e, Show)]
    assert [(s.status, s.level) for s in shown] == [(IncidentStatus.ACKNOWLEDGED, 1)]
    assert (state.status, state.level, state.verification) == (
        IncidentStatus.ACKNOWLEDGED, 2, "not_recovered",
    )  # fmt: skip
    assert "did not help (still 30 %)" in state.timeline[-1].text


def test_a_verified_recovery_is_stamped_and_keeps_its_controls() -> None:
    state = with_controls(mitigating(RUNBOOK))
    state, _ = decide(state, RunbookFinished(("throttle chat",), "recovered"), POLICY, at(9))
    assert (state.verified_at, state.controls, state.runbook_phase) == (
        at(9), ["throttle chat"], "done",
    )  # fmt: skip


def test_quiet_after_a_resolve_changes_nothing() -> None:
    state, _ = decide(RUNBOOK, Resolve(ALICE), POLICY, at(3))
    again, effects = decide(state, QuietElapsed(900), POLICY, at(20))
    assert effects == []
    assert again == state


def test_a_proposal_to_resolve_is_made_once() -> None:
    state, _ = decide(RUNBOOK, VerifiedAwaitingResolve(), POLICY, at(3))
    again, effects = decide(state, VerifiedAwaitingResolve(), POLICY, at(4))
    assert effects == []
    assert len(again.timeline) == len(state.timeline)


def test_runbook_mitigation_lists_its_controls_and_a_roll_back_clears_them() -> None:
    state = with_controls(RUNBOOK)
    assert state.controls == ["throttle chat", "reroute"]
    state, _ = decide(state, RunbookProgressed("rolled_back", "undone", "rb"), POLICY, at(4))
    assert state.controls == []
    assert state.timeline[-1].actor == "runbook:rb"


def test_a_failing_runbook_after_a_resolve_is_not_news() -> None:
    state, _ = decide(mitigating(RUNBOOK), Resolve(ALICE), POLICY, at(3))
    state, effects = decide(state, RunbookFailed("rb", "cancelled"), POLICY, at(4))
    assert effects == []
    assert state.status == IncidentStatus.RESOLVED


def test_every_event_stamps_its_entries_with_the_time_given() -> None:
    state, _ = decide(opened(), AddNote(ActionRequest("a", "api", "n")), POLICY, at(7))
    assert state.timeline[-1].at == at(7)
    assert [e.kind for e in state.timeline] == ["opened", "note"]


# --- refusals -----------------------------------------------------------------------------------

RESOLVED = decide(opened(), Resolve(ALICE), POLICY, at(3))[0]
MERGED = decide(opened(), MergedInto(MergeRequest("x", Trigger.API_OUTAGE, "global")), POLICY,
                at(3))[0]  # fmt: skip
ACKED = acked(opened())
ONLY_ALICE = Policy(allowed_slack_users=("alice",))


@pytest.mark.parametrize(
    ("state", "event", "policy", "expected"),
    [
        (RESOLVED, Acknowledge(ALICE), POLICY, "already resolved (by alice"),
        (RESOLVED, breach(), POLICY, "already resolved"),
        (RESOLVED, AddNote(ActionRequest("a", "api", "late")), POLICY, "already resolved"),
        (ACKED, Acknowledge(ActionRequest("bob", "api")), POLICY, "already acknowledged by alice"),
        (opened(), Resolve(ActionRequest("mallory", "slack")), ONLY_ALICE, "<@mallory> is not"),
        (opened(), Snooze(SnoozeRequest("mallory", 10, "slack")), ONLY_ALICE, "is not allowed"),
        (opened(), Snooze(SnoozeRequest("alice", 0)), POLICY, "between 1 and 1440"),
        (opened(), Snooze(SnoozeRequest("alice", 1441)), POLICY, "between 1 and 1440"),
        (opened(), AddNote(ActionRequest("alice", "api", "  ")), POLICY, "needs some text"),
        (
            RESOLVED,
            MergedInto(MergeRequest("x", Trigger.API_OUTAGE, "global")),
            POLICY,
            "already resolved",
        ),
        (
            MERGED,
            MergedInto(MergeRequest("y", Trigger.API_OUTAGE, "global")),
            POLICY,
            "already merged into x",
        ),
        (
            MERGED,
            Absorbed(Handover("z", Trigger.ERROR_RATE, "global", Severity.SEV2, T0)),
            POLICY,
            "was merged into x: act on that one",
        ),
        (MERGED, RelatedBreach(breach()), POLICY, "was merged into x: act on that one"),
    ],
)
def test_refusals(state: IncidentState, event: Event, policy: Policy, expected: str) -> None:
    reason = refusal(state, event, policy)
    assert reason is not None
    assert expected in reason


@pytest.mark.parametrize(
    ("event", "policy"),
    [
        (Acknowledge(ALICE), ONLY_ALICE),
        (Resolve(ActionRequest("mallory", "api")), ONLY_ALICE),  # the allow-list is Slack's
        (Snooze(SnoozeRequest("alice", 1440)), POLICY),
        (breach(), POLICY),
    ],
)
def test_what_is_taken(event: Event, policy: Policy) -> None:
    assert refusal(opened(), event, policy) is None


def test_a_merge_asked_again_is_taken_and_the_merge_says_where_it_went() -> None:
    again = MergedInto(MergeRequest("x", Trigger.API_OUTAGE, "global"))
    assert refusal(MERGED, again, POLICY) is None
    assert MERGED.merged_into == "x"
    assert MERGED.resolved_by == "pagerloop"
    assert (MERGED.ack_by, MERGED.resolve_by, MERGED.remind_at) == (None, None, None)
    assert MERGED.timeline[-1].text.startswith("merged into x: api_outage on global")
    _, effects = decide(opened(), again, POLICY, at(3))
    assert Merged("x", handed_over=False) in effects


def test_what_a_merged_incident_hands_over_and_what_the_other_takes() -> None:
    told = decide(opened(), SlackPosted(SlackMessageRef("C1", "1.2"), "#oncall"), POLICY, at(1))[0]
    told = decide(told, Paged(PagedTarget("incident-error_rate-global-1", "SEV2", "L1"), "L1"),
                  POLICY, at(1))[0]  # fmt: skip
    told = decide(told, TicketOpened("OPS-7"), POLICY, at(1))[0]
    kept = told.handover(hand_over=False)
    assert (kept.slack_message, kept.paged, kept.jira_issue) == (None, [], None)
    handed = told.handover(hand_over=True)
    assert handed.slack_message == SlackMessageRef("C1", "1.2")
    assert handed.jira_issue == "OPS-7"
    # Once handed over, they are the other incident's: nothing here touches them again, and a
    # merge asked again (a retry) gets what was handed over then.
    merge = MergedInto(MergeRequest("incident-api_outage-global-2", Trigger.API_OUTAGE, "global",
                                    hand_over=True))  # fmt: skip
    gone, _ = decide(told, merge, POLICY, at(2))
    assert (gone.slack_message, gone.paged, gone.jira_issue) == (None, [], None)
    assert gone.handover(hand_over=True) == handed
    assert gone.handover(hand_over=False) == handed

    outage = fresh(Severity.SEV1)
    outage.incident_id = "incident-api_outage-global-2"
    outage = decide(outage, Opened(), POLICY, at(2))[0]
    state, _ = decide(outage, Absorbed(handed), POLICY, at(2))
    assert state.slack_message == SlackMessageRef("C1", "1.2")
    assert state.jira_issue == "OPS-7"
    assert [t.dedup_key for t in state.paged] == ["incident-error_rate-global-1"]
    assert state.absorbed == ["incident-error_rate-global-1 (error_rate on global)"]
    assert state.severity == Severity.SEV1  # the milder one does not lower it
    # Its own, when it has them, stay its own.
    mine = decide(outage, SlackPosted(SlackMessageRef("C1", "9.9"), "#oncall"), POLICY, at(2))[0]
    assert decide(mine, Absorbed(handed), POLICY, at(3))[0].slack_message.ts == "9.9"  # type: ignore[union-attr]


def test_a_related_breach_keeps_an_auto_resolve_waiting() -> None:
    state, _ = decide(
        opened(),
        RelatedBreach(Breach(Trigger.ELEVATED_LATENCY, "global", Severity.SEV3, at(7), "slow")),
        POLICY,
        at(7),
    )
    assert state.last_breach_at == at(7)
    assert state.breach_count == 0  # its own trigger's count is its own
    assert state.related == ["elevated_latency|global"]
