"""The incident as a pure state machine: `decide(state, event, policy, now) -> (state, effects)`.

Every change to an incident goes through `decide`: a responder's update, a detector's report, a
deadline passing, the runbook's progress, a channel's outcome. It returns the next state and the
effects the workflow must carry out, in order (tell a level's targets, refresh what the channels
show, restart the escalation clock, revert the runbook's controls...). It does no I/O and reads no
clock, so every path is a plain unit test; `IncidentWorkflow` only receives events and performs
effects. The input state is never modified.

Effects are channel-neutral: what a `Notify` or a `Tell` means for Slack, PagerDuty or Jira is
the channel's business (see `workflows/incident.py`).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from domain.escalation import (
    DEFAULT_POLICIES,
    Deadlines,
    EscalationLevel,
    EscalationPolicy,
    enter_level,
    snooze,
    span,
)
from domain.incident import (
    ActionRequest,
    Approval,
    ApprovalDecision,
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
    TimelineEntry,
    severity_rank,
)

MAX_SNOOZE_MINUTES = 24 * 60
# Timeline kinds told where people follow the incident (the Slack thread, the Jira ticket).
TOLD = {"acknowledged", "escalated", "reminder", "snoozed", "note", "severity_raised",
        "recovered", "resolved", "diagnosis", "mitigation", "verified", "verification",
        "rolled_back", "controls_reverted", "controls_kept", "runbook_failed",
        "proposed", "merged", "absorbed", "related", "users_notified", "canary"}  # fmt: skip


@dataclass(frozen=True)
class Policy:
    """What an incident's decisions depend on beyond its state: the escalation policy of each
    severity (with the runbook's own applied) and who may act from Slack."""

    escalation: Mapping[str, EscalationPolicy] = field(default_factory=lambda: DEFAULT_POLICIES)
    allowed_slack_users: tuple[str, ...] = ()

    def of(self, state: IncidentState) -> EscalationPolicy:
        severity = str(state.severity)
        return self.escalation.get(severity) or DEFAULT_POLICIES[severity]

    def level(self, state: IncidentState) -> EscalationLevel:
        return self.of(state).level(state.level)


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    pass


@dataclass(frozen=True)
class BreachReported:
    breach: Breach


@dataclass(frozen=True)
class RecoveryReported:
    recovery: Recovery


@dataclass(frozen=True)
class Acknowledge:
    request: ActionRequest


@dataclass(frozen=True)
class Resolve:
    request: ActionRequest


@dataclass(frozen=True)
class Escalate:
    request: ActionRequest


@dataclass(frozen=True)
class Snooze:
    request: SnoozeRequest


@dataclass(frozen=True)
class AddNote:
    request: ActionRequest


@dataclass(frozen=True)
class DeadlinePassed:
    what: str  # "acknowledged" | "resolved" | "reminder"


@dataclass(frozen=True)
class RunbookProgressed:
    kind: str  # diagnosis | mitigating | mitigation | verified | rolled_back | ...
    text: str
    runbook: str


@dataclass(frozen=True)
class RunbookStarted:
    may_mitigate: bool


@dataclass(frozen=True)
class RunbookFailed:
    runbook: str
    cause: str


@dataclass(frozen=True)
class RunbookFinished:
    """A runbook child ended: the controls it left in force; `verification` is None for a
    diagnosis-only run (it waits for an acknowledgement before mitigating)."""

    controls: tuple[str, ...]
    verification: str | None = None
    reading: str = ""


@dataclass(frozen=True)
class QuietElapsed:
    """A verified mitigation kept the signal quiet for the policy's quiet period."""

    quiet_seconds: int


@dataclass(frozen=True)
class VerifiedAwaitingResolve:
    """A verified mitigation and no auto-resolve: a person decides."""


@dataclass(frozen=True)
class ControlsExtended:
    pass


@dataclass(frozen=True)
class ControlsReverted:
    descriptions: tuple[str, ...]


@dataclass(frozen=True)
class Paged:
    target: PagedTarget
    level: str


@dataclass(frozen=True)
class PageCalledOff:
    pass


@dataclass(frozen=True)
class SlackPosted:
    message: SlackMessageRef
    channel: str  # as configured (the message's own channel may be an id)


@dataclass(frozen=True)
class TicketOpened:
    key: str


@dataclass(frozen=True)
class Delivered:
    """A channel told its targets (`text` says what and to whom, for the timeline)."""

    channel: str
    text: str


@dataclass(frozen=True)
class ChannelFailed:
    channel: str
    kind: str
    reason: str


@dataclass(frozen=True)
class MergedInto:
    """The wider problem's incident takes this one in (detectors/correlation.py)."""

    request: MergeRequest


@dataclass(frozen=True)
class Absorbed:
    """An incident of the same problem was merged into this one."""

    handover: Handover


@dataclass(frozen=True)
class RelatedBreach:
    """A trigger this incident covers fires while it is open: noted here, nothing new opens."""

    breach: Breach


@dataclass(frozen=True)
class ApprovalRequested:
    """The runbook asks a person before a step (`Steps.approve`)."""

    approval: Approval
    runbook: str


@dataclass(frozen=True)
class ApprovalPosted:
    """The ask's Approve / Deny buttons are in Slack: that message shows the answer later."""

    approval_id: str
    message: SlackMessageRef


@dataclass(frozen=True)
class ApprovalDecided:
    decision: ApprovalDecision


@dataclass(frozen=True)
class Reopened:
    """A resolved incident's trigger breached again within its rule's cooldown: the incident
    comes back (in a new run) instead of a new one opening and paging everyone afresh."""

    breach: Breach


@dataclass(frozen=True)
class ApprovalExpired:
    """Nobody answered in time: the runbook went on as the ask's `on_timeout` said."""

    approval_id: str


Event = (
    Opened | BreachReported | RecoveryReported | Acknowledge | Resolve | Escalate | Snooze
    | AddNote | DeadlinePassed | RunbookProgressed | RunbookStarted | RunbookFailed
    | RunbookFinished | QuietElapsed | VerifiedAwaitingResolve | ControlsExtended
    | ControlsReverted | Paged | PageCalledOff | SlackPosted | TicketOpened | Delivered
    | ChannelFailed | MergedInto | Absorbed | RelatedBreach | ApprovalRequested | ApprovalPosted
    | ApprovalDecided | ApprovalExpired | Reopened
)  # fmt: skip


# --- effects ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notify:
    """Tell a level's targets about the incident: it `opened`, `escalated` to them, or they are
    `reminded`; `reason` is why, empty when it just opened."""

    level: EscalationLevel
    reason: str
    kind: str = "opened"


@dataclass(frozen=True)
class Refresh:
    """What the channels show of the incident's state is out of date."""


@dataclass(frozen=True)
class Tell:
    """A timeline entry worth telling where people follow the incident."""

    entry: TimelineEntry


@dataclass(frozen=True)
class Acknowledged:
    via: str  # the channel it came from is not told again


@dataclass(frozen=True)
class Resolved:
    via: str


@dataclass(frozen=True)
class SeverityRaised:
    """A worse severity: its level may page where the milder one did not."""

    level: EscalationLevel


@dataclass(frozen=True)
class Show:
    """Show the state as it was at this point of the event (search attributes, the UI's
    details): a status that steps back is its own change, seen apart from an escalation that
    follows. The workflow also shows the state after every event."""

    state: IncidentState


@dataclass(frozen=True)
class RestartClock:
    """The escalation deadlines may have moved: wait for the new earliest one."""


@dataclass(frozen=True)
class CancelRunbook:
    pass


@dataclass(frozen=True)
class RevertRunbookControls:
    reason: str


@dataclass(frozen=True)
class ExtendRunbookControls:
    pass


@dataclass(frozen=True)
class Merged:
    """Merged into `into`: over, like a resolve, but what was `handed_over` (the Slack message,
    PagerDuty alert and Jira ticket) is the other incident's now."""

    into: str
    handed_over: bool


@dataclass(frozen=True)
class AskApproval:
    """Put the ask in front of people (the Slack thread's Approve / Deny buttons)."""

    approval_id: str


@dataclass(frozen=True)
class ShowApproval:
    """The ask was answered, expired or withdrawn: show that where it was asked."""

    approval_id: str


@dataclass(frozen=True)
class ForwardApproval:
    """Hand a person's answer to the runbook that waits for it."""

    decision: ApprovalDecision


Effect = (
    Notify | Refresh | Tell | Acknowledged | Resolved | SeverityRaised | Show | RestartClock
    | CancelRunbook | RevertRunbookControls | ExtendRunbookControls | Merged | AskApproval
    | ShowApproval | ForwardApproval
)  # fmt: skip


# --- refusals (the updates' validators) ------------------------------------------------------


def refusal(state: IncidentState, event: Event, policy: Policy) -> str | None:
    """Why a responder's request cannot be taken, or None: a resolved incident takes nothing,
    Slack users must be allowed, an incident is acknowledged once, a note needs text; a merge
    asked again (a retry) is taken, into another incident refused."""
    if isinstance(event, MergedInto) and state.merged_into is not None:
        if state.merged_into == event.request.into:
            return None
        return f"{state.incident_id} was already merged into {state.merged_into}"
    if state.merged_into is not None:
        return f"{state.incident_id} was merged into {state.merged_into}: act on that one"
    if state.status == IncidentStatus.RESOLVED and state.resolved_at is not None:
        return (
            f"{state.incident_id} is already resolved (by {state.resolved_by} "
            f"at {state.resolved_at:%Y-%m-%d %H:%M:%S} UTC)"
        )
    if isinstance(event, ApprovalDecided):
        return _approval_refusal(state, event.decision, policy)
    if isinstance(event, Snooze):
        request = ActionRequest(event.request.user, event.request.channel)
    elif isinstance(event, Acknowledge | Resolve | Escalate | AddNote):
        request = event.request
    else:
        return None
    if (
        refused := slack_user_refusal(request.user, request.channel, policy.allowed_slack_users)
    ) is not None:
        return refused
    acked = state.acknowledged_by is not None and state.acknowledged_at is not None
    if isinstance(event, Acknowledge) and acked:
        return (
            f"{state.incident_id} was already acknowledged by {state.acknowledged_by} "
            f"at {state.acknowledged_at:%Y-%m-%d %H:%M:%S} UTC"
        )
    if isinstance(event, Snooze) and not 1 <= event.request.minutes <= MAX_SNOOZE_MINUTES:
        return f"snooze between 1 and {MAX_SNOOZE_MINUTES} minutes"
    if isinstance(event, AddNote) and not event.request.note.strip():
        return "a note needs some text"
    return None


def reopen_refusal(
    state: IncidentState, breach: Breach, cooldown_seconds: int, now: datetime
) -> str | None:
    """Why this incident cannot be reopened by `breach`, or None: only a resolved incident (not
    one merged into another) of the same trigger and scope, within the cooldown."""
    if state.merged_into is not None:
        return f"{state.incident_id} was merged into {state.merged_into}: act on that one"
    if state.status != IncidentStatus.RESOLVED or state.resolved_at is None:
        return f"{state.incident_id} is not resolved ({state.status})"
    if (breach.trigger, breach.scope) != (state.trigger, state.scope):
        return (
            f"{state.incident_id} is {state.trigger} on {state.scope}, "
            f"not {breach.trigger} on {breach.scope}"
        )
    since = (now - state.resolved_at).total_seconds()
    if since > cooldown_seconds:
        return (
            f"{state.incident_id} was resolved {span(since)} ago, "
            f"beyond the cooldown of {span(cooldown_seconds)}"
        )
    return None


def last_resolve(state: IncidentState) -> TimelineEntry | None:
    """The timeline's last resolve: who resolved the incident, and from where."""
    return next((e for e in reversed(state.timeline) if e.kind == "resolved"), None)


def slack_user_refusal(user: str, channel: str, allowed: Collection[str]) -> str | None:
    """Why `user` may not act on incidents, or None: with PAGERLOOP_SLACK_ALLOWED_USERS set, only
    those Slack users may (other channels are gated by their own keys). The Slack endpoint asks
    it too, to answer the clicker before the workflow is reached."""
    if channel == "slack" and allowed and user not in allowed:
        return f"<@{user}> is not allowed to act on incidents (PAGERLOOP_SLACK_ALLOWED_USERS)"
    return None


def _approval_refusal(
    state: IncidentState, decision: ApprovalDecision, policy: Policy
) -> str | None:
    """An answer needs someone allowed to give it, and an ask still waiting for one."""
    if not decision.decided_by.strip():
        return "an approval needs the name of who decides"
    if (
        refused := slack_user_refusal(
            decision.decided_by, decision.channel, policy.allowed_slack_users
        )
    ) is not None:
        return refused
    approval = state.approval(decision.approval_id)
    if approval is None:
        waiting = ", ".join(a.approval_id for a in state.pending_approvals()) or "none"
        return (
            f"{state.incident_id} has no approval {decision.approval_id!r} "
            f"(waiting for an answer: {waiting})"
        )
    if not approval.pending:
        return f"{approval.action!r} was already {_settled(approval)}"
    return None


def _settled(approval: Approval) -> str:
    """What became of an ask that is no longer waiting, as people read it."""
    at = f"{approval.decided_at:%Y-%m-%d %H:%M:%S} UTC" if approval.decided_at else ""
    if approval.outcome in ("approved", "denied"):
        return f"{approval.outcome} by {approval.decided_by} at {at}"
    if approval.outcome == "expired":
        went = "proceeded" if approval.approved else "denied"
        return f"left unanswered for {_waited(approval)}: {went} at {at}"
    return f"withdrawn at {at}: {approval.reason or 'no longer asked'}"


def _waited(approval: Approval) -> str:
    return span((approval.expires_at - approval.asked_at).total_seconds())


# --- decide ----------------------------------------------------------------------------------


def decide(
    state: IncidentState, event: Event, policy: Policy, now: datetime
) -> tuple[IncidentState, list[Effect]]:
    """The incident after `event`, and what must happen because of it, in order."""
    step = _Step(_copy(state), policy, now)
    step.apply(event)
    return step.state, step.effects


def next_deadline(state: IncidentState) -> tuple[datetime, str] | None:
    """The earliest escalation deadline still pending, and what it is for."""
    return _deadlines(state).next()


def next_deadline_text(state: IncidentState) -> str:
    upcoming = next_deadline(state)
    if upcoming is None:
        return "none"
    at, what = upcoming
    return f"{what} by {at:%H:%M} UTC"


def adopt(state: IncidentState, handover: Handover) -> None:
    """Take over where people were told of a merged incident, where this one has nothing of
    its own yet (so that opening it updates that message, pages that alert, comments on that
    ticket, instead of telling everyone anew)."""
    state.slack_message = state.slack_message or handover.slack_message
    state.jira_issue = state.jira_issue or handover.jira_issue
    known = {target.dedup_key for target in state.paged}
    state.paged += [target for target in handover.paged if target.dedup_key not in known]


def _copy(state: IncidentState) -> IncidentState:
    fresh = copy.copy(state)
    fresh.timeline = list(state.timeline)
    fresh.paged = list(state.paged)
    fresh.controls = list(state.controls)
    fresh.metrics = dict(state.metrics)
    fresh.absorbed = list(state.absorbed)
    fresh.related = list(state.related)
    fresh.approvals = list(state.approvals)
    return fresh


def _deadlines(state: IncidentState) -> Deadlines:
    return Deadlines(state.opened_at, state.ack_by, state.resolve_by, state.remind_at)


class _Step:
    """One event's worth of changes to a private copy of the state."""

    def __init__(self, state: IncidentState, policy: Policy, now: datetime) -> None:
        self.state = state
        self.policy = policy
        self.now = now
        self.effects: list[Effect] = []

    def apply(self, event: Event) -> None:
        s = self.state
        match event:
            case Opened():
                self.record("opened", f"{s.severity} {s.trigger} on {s.scope}")
                self.enter_level(1, reason="")
            case BreachReported(breach):
                self.breach(breach)
            case RecoveryReported(recovery):
                if s.recovered_at is None:
                    s.recovered_at = recovery.observed_at
                    text = (
                        recovery.summary or f"{recovery.trigger} back to normal on {recovery.scope}"
                    )
                    self.record("recovered", text, actor="detector", channel="detector")
                    self.effects.append(Refresh())
            case Acknowledge(request):
                self.acknowledge(request)
            case Resolve(request):
                self.resolve(request)
            case Escalate(request):
                reason = f"escalated by {request.user}" + (
                    f": {request.note}" if request.note else ""
                )
                self.escalate(reason, request.user, request.channel)
            case Snooze(request):
                pushed = snooze(_deadlines(s), self.now, request.minutes)
                s.ack_by, s.resolve_by = pushed.ack_by, pushed.resolve_by
                s.remind_at = pushed.remind_at
                text = f"snoozed {request.minutes} min: next deadline {next_deadline_text(s)}"
                self.record("snoozed", text, request.user, request.channel)
                self.effects += [Refresh(), RestartClock()]
            case AddNote(request):
                self.record("note", request.note, request.user, request.channel)
            case DeadlinePassed(what):
                self.deadline_passed(what)
            case RunbookProgressed(kind, text, runbook):
                self.progress(kind, text, runbook)
            case RunbookStarted(may_mitigate):
                s.runbook_runs += 1
                s.runbook_phase = "running"
                if may_mitigate:
                    s.status = IncidentStatus.MITIGATING
                    s.mitigation_started_at = self.now
                    self.effects.append(Refresh())
            case RunbookFailed(runbook, cause):
                s.runbook_phase = "done"
                self.withdraw_approvals(f"{runbook} stopped")
                self.step_back()
                if s.status != IncidentStatus.RESOLVED:
                    self.record("runbook_failed", f"{runbook}: {cause}")
                    # Whatever it had put in force before failing is taken out again.
                    self.effects.append(RevertRunbookControls(f"{runbook} failed"))
            case RunbookFinished(controls, verification, reading):
                self.withdraw_approvals("the runbook ended")
                s.controls = list(controls)
                s.controls_kept_at = self.now
                if verification is None:
                    s.runbook_phase = "diagnosed"
                else:
                    self.conclude(verification, reading, bool(controls))
            case QuietElapsed(quiet_seconds):
                if s.status != IncidentStatus.RESOLVED:
                    # The controls are what keeps the signal quiet: reverting them now would
                    # bring the breach straight back. They stay until they expire or someone
                    # reverts them.
                    note = (
                        f"auto-resolved: mitigation verified, quiet for {span(quiet_seconds)}; "
                        "controls kept until they expire (pagerloop controls revert ID)"
                    )
                    self.resolve(ActionRequest("pagerloop", "workflow", note, keep_controls=True))
            case VerifiedAwaitingResolve():
                if not any(entry.kind == "proposed" for entry in s.timeline):
                    self.record("proposed", "mitigation verified: resolve when satisfied")
            case ControlsExtended():
                s.controls_kept_at = self.now
                self.effects.append(ExtendRunbookControls())
            case ControlsReverted(descriptions):
                s.controls = []
                if descriptions:
                    self.record("controls_reverted", ", ".join(descriptions), channel="controls")
            case Paged(target, level):
                if all(known.dedup_key != target.dedup_key for known in s.paged):
                    s.paged.append(target)
                self.record("paged", f"PagerDuty triggered at {level}", channel="pagerduty")
            case PageCalledOff():
                self.record("not_paged", "resolved before PagerDuty accepted the page")
            case SlackPosted(message, channel):
                s.slack_message = message
                self.record("notified", f"Slack message posted to {channel}", channel="slack")
            case TicketOpened(key):
                s.jira_issue = key
                self.record("ticket", f"Jira ticket {key}", channel="jira")
            case Delivered(channel, text):
                self.record("notified", text, channel=channel)
            case ChannelFailed(channel, kind, reason):
                failed = f"{channel} {kind} failed: {reason}"
                self.record("notification_failed", failed, channel=channel)
            case MergedInto(request) if s.merged_into is None:
                self.merge(request)
            case Absorbed(handover):
                self.absorb(handover)
            case RelatedBreach(breach):
                self.related(breach)
            case ApprovalRequested(approval, runbook):
                self.ask(approval, runbook)
            case ApprovalPosted(approval_id, message):
                self.approval_posted(approval_id, message)
            case ApprovalDecided(decision):
                self.decided(decision)
            case ApprovalExpired(approval_id):
                self.expired(approval_id)
            case Reopened(breach):
                self.reopen(breach)

    # --- the pieces several events share -----------------------------------------------------

    def record(
        self,
        kind: str,
        text: str,
        actor: str = "pagerloop",
        channel: str = "workflow",
        tell: bool = True,
    ) -> None:
        entry = TimelineEntry(at=self.now, kind=kind, text=text, actor=actor, channel=channel)
        self.state.timeline.append(entry)
        if tell and kind in TOLD:
            self.effects.append(Tell(entry))

    def breach(self, breach: Breach) -> None:
        s = self.state
        s.breach_count += 1
        s.last_breach_at = breach.observed_at
        s.metrics = dict(breach.metrics)
        s.summary = breach.summary
        if breach.runbook_url:  # the rule's own page comes before the runbook's
            s.runbook_url = breach.runbook_url
        if s.breach_count == 1:
            self.record("breach", breach.summary, actor="detector", channel="detector")
        elif s.recovered_at is not None:
            self.record("breach", f"breaching again: {breach.summary}", "detector", "detector")
        s.recovered_at = None
        self.raise_severity(breach.severity, breach.summary)

    def reopen(self, breach: Breach) -> None:
        """Back to detected at the level that resolved it, which is paged again (Slack names
        whoever resolved it); the runbook runs again; the escalation clock starts over."""
        s = self.state
        if s.status != IncidentStatus.RESOLVED or s.merged_into is not None:
            return  # the validator refused it; an update replayed on a later state
        resolved = last_resolve(s)
        after = span((self.now - s.resolved_at).total_seconds()) if s.resolved_at else "just"
        who = resolved.actor if resolved is not None else s.resolved_by or "someone"
        s.status = IncidentStatus.DETECTED
        s.reopened += 1
        s.reopened_at = self.now
        s.resolved_by = s.resolved_at = None
        s.acknowledged_by = s.acknowledged_at = None
        s.recovered_at = s.verified_at = s.mitigation_started_at = None
        s.verification = None
        s.runbook_phase = ""
        s.breach_count += 1
        s.last_breach_at = breach.observed_at
        s.metrics = dict(breach.metrics)
        s.summary = breach.summary
        text = f"breaching again {after} after {who} resolved it: {breach.summary}"
        self.record("reopened", text, actor="detector", channel="detector")
        if severity_rank(breach.severity) > severity_rank(s.severity):
            self.record(
                "severity_raised", f"{s.severity} -> {breach.severity}: {breach.summary}",
                "detector", "detector",
            )  # fmt: skip
            s.severity = breach.severity
        level = self.policy.level(s)
        s.level_name = level.name
        deadlines = enter_level(level, self.now, acknowledged=False)
        s.ack_by, s.resolve_by, s.remind_at = deadlines.ack_by, deadlines.resolve_by, None
        s.remind_for = ""
        self.effects += [Refresh(), Notify(level, text, "reopened"), RestartClock()]

    def raise_severity(self, severity: Severity, why: str) -> None:
        s = self.state
        if severity_rank(severity) > severity_rank(s.severity):
            self.record(
                "severity_raised", f"{s.severity} -> {severity}: {why}", "detector", "detector"
            )
            s.severity = severity
            self.effects += [Refresh(), SeverityRaised(self.policy.level(s)), RestartClock()]

    def merge(self, request: MergeRequest) -> None:
        """Over, like a resolve; the other incident goes on with the problem (and, handed over,
        with this one's message, alert and ticket: nothing is told of it here)."""
        s = self.state
        s.merged_into = request.into
        if request.hand_over:
            s.handed_over = s.handover(hand_over=True)
            s.slack_message, s.paged, s.jira_issue = None, [], None
        s.status = IncidentStatus.RESOLVED
        s.resolved_by, s.resolved_at = "pagerloop", self.now
        s.ack_by = s.resolve_by = s.remind_at = None
        text = (
            f"merged into {request.into}: {request.trigger} on {request.scope} is the same problem"
        )
        self.record("merged", text, tell=not request.hand_over)
        self.withdraw_approvals(f"merged into {request.into}")
        self.effects += [Merged(request.into, request.hand_over), CancelRunbook()]
        if s.runbook is not None:
            self.effects.append(RevertRunbookControls(f"merged into {request.into}"))
        self.effects.append(RestartClock())

    def absorb(self, handover: Handover) -> None:
        s = self.state
        name = f"{handover.incident_id} ({handover.trigger} on {handover.scope})"
        if name in s.absorbed:
            return  # told twice (a retry)
        s.absorbed.append(name)
        adopt(s, handover)
        since = f"{handover.severity} since {handover.opened_at:%H:%M:%S} UTC"
        self.record("absorbed", f"took in {name}, {since}: {handover.summary}".rstrip(": "))
        self.raise_severity(handover.severity, f"as {handover.incident_id}")
        if handover.acknowledged_by and s.acknowledged_by is None:
            note = f"acknowledged {handover.incident_id} before it was merged here"
            self.acknowledge(ActionRequest(handover.acknowledged_by, "workflow", note))
        self.effects.append(Refresh())

    def related(self, breach: Breach) -> None:
        s = self.state
        s.last_breach_at = breach.observed_at  # keeps an auto-resolve waiting
        key = f"{breach.trigger}|{breach.scope}"
        if key not in s.related:
            s.related.append(key)
            text = f"{breach.trigger} on {breach.scope} fires too ({breach.severity}): "
            self.record("related", text + breach.summary, actor="detector", channel="detector")
        self.raise_severity(breach.severity, f"{breach.trigger} on {breach.scope}")

    def acknowledge(self, request: ActionRequest) -> None:
        s = self.state
        if s.status == IncidentStatus.DETECTED:
            s.status = IncidentStatus.ACKNOWLEDGED
        s.acknowledged_by = request.user
        s.acknowledged_at = self.now
        s.ack_by = None
        if s.remind_for == "acknowledged":
            s.remind_at, s.remind_for = None, ""
        self.record("acknowledged", request.note or "acknowledged", request.user, request.channel)
        self.effects += [Refresh(), Acknowledged(request.channel), RestartClock()]

    def resolve(self, request: ActionRequest) -> None:
        s = self.state
        s.status = IncidentStatus.RESOLVED
        s.resolved_by = request.user
        s.resolved_at = self.now
        s.ack_by = s.resolve_by = s.remind_at = None
        self.record("resolved", request.note or "resolved", request.user, request.channel)
        self.withdraw_approvals(f"resolved by {request.user}")
        self.effects += [Refresh(), Resolved(request.channel), CancelRunbook()]
        if request.keep_controls and s.controls:
            self.record("controls_kept", ", ".join(s.controls), request.user, request.channel)
        elif s.runbook is not None:
            self.effects.append(RevertRunbookControls(f"resolved by {request.user}"))
        self.effects.append(RestartClock())

    def enter_level(self, number: int, reason: str) -> None:
        s = self.state
        level = self.policy.of(s).level(number)
        s.level, s.level_name = number, level.name
        deadlines = enter_level(level, self.now, acknowledged=s.acknowledged_by is not None)
        s.ack_by, s.resolve_by, s.remind_at = deadlines.ack_by, deadlines.resolve_by, None
        s.remind_for = ""
        if reason:
            self.record("escalated", f"to {level.name} ({level.description}): {reason}")
        self.effects.append(Notify(level, reason, "escalated" if reason else "opened"))

    def escalate(self, reason: str, actor: str = "pagerloop", channel: str = "workflow") -> None:
        if self.state.level < self.policy.of(self.state).top:
            self.enter_level(self.state.level + 1, reason)
        else:
            self.remind(reason, actor, channel)
        self.effects.append(RestartClock())

    def remind(self, reason: str, actor: str = "pagerloop", channel: str = "workflow") -> None:
        """At the top level: tell its targets again, and again after the repeat interval."""
        s = self.state
        policy = self.policy.of(s)
        s.remind_for = "acknowledged" if s.acknowledged_by is None else "resolved"
        s.ack_by = s.resolve_by = None
        s.remind_at = self.now + timedelta(seconds=policy.repeat_interval_seconds)
        self.record(
            "reminder", f"still not {s.remind_for} at {s.level_name}: {reason}", actor, channel
        )
        self.effects.append(Notify(policy.level(s.level), reason, "reminded"))

    def deadline_passed(self, what: str) -> None:
        s = self.state
        if what == "reminder":
            self.remind("reminder interval elapsed")
            return
        level = self.policy.level(s)
        timeout = (
            level.ack_timeout_seconds if what == "acknowledged" else level.resolve_timeout_seconds
        )
        self.escalate(f"not {what} within {span(timeout)} at {s.level_name}")

    def progress(self, kind: str, text: str, runbook: str) -> None:
        s = self.state
        if kind == "diagnosis":
            s.diagnosis = text
        elif kind == "mitigation":  # one "• control" per line
            s.controls = [line.removeprefix("• ") for line in text.splitlines()]
            self.effects.append(Refresh())
        elif kind == "rolled_back":
            s.controls = []
            self.effects.append(Refresh())
        self.record(kind, text, actor=f"runbook:{runbook}", channel="runbook")

    # --- approvals ------------------------------------------------------------------------------

    def ask(self, approval: Approval, runbook: str) -> None:
        s = self.state
        if s.status == IncidentStatus.RESOLVED or s.approval(approval.approval_id) is not None:
            return  # its runbook is being stopped; or told twice
        s.approvals.append(approval)
        then = "it goes ahead" if approval.on_timeout == "proceed" else "it is denied"
        text = (
            f"{approval.action}: waiting for approval until {approval.expires_at:%H:%M:%S} UTC "
            f"(no answer in {_waited(approval)}: {then})"
        )
        self.record("approval_asked", text, actor=f"runbook:{runbook}", channel="runbook")
        self.effects.append(AskApproval(approval.approval_id))

    def approval_posted(self, approval_id: str, message: SlackMessageRef) -> None:
        approval = self.state.approval(approval_id)
        if approval is None:
            return
        # Answered while its buttons were being posted: the ShowApproval queued behind the post
        # in the same lane shows the answer on this message.
        self.settle(replace(approval, message=message))

    def decided(self, decision: ApprovalDecision) -> None:
        approval = self.state.approval(decision.approval_id)
        if approval is None or not approval.pending:
            return  # the validator refused it; an update replayed on a later state
        outcome = "approved" if decision.approved else "denied"
        self.settle(
            replace(
                approval,
                outcome=outcome,
                approved=decision.approved,
                decided_by=decision.decided_by,
                decided_at=self.now,
                reason=decision.reason,
            )
        )
        text = f"{outcome} by {decision.decided_by}: {approval.action}"
        if decision.reason:
            text += f" ({decision.reason})"
        self.record(outcome, text, decision.decided_by, decision.channel)
        self.effects += [ForwardApproval(decision), ShowApproval(approval.approval_id)]

    def expired(self, approval_id: str) -> None:
        approval = self.state.approval(approval_id)
        if approval is None:
            return
        proceed = approval.on_timeout == "proceed"
        went = "proceeding" if proceed else "denied"
        text = f"no answer in {_waited(approval)}: {went}: {approval.action}"
        if approval.outcome in ("approved", "denied"):
            # The runbook's timer fired before the answer reached it: the timeout is what it did.
            text += f" ({approval.outcome} by {approval.decided_by} too late)"
        elif not approval.pending:
            return
        self.settle(replace(approval, outcome="expired", approved=proceed, decided_at=self.now))
        self.record("approval_expired", text)
        self.effects.append(ShowApproval(approval_id))

    def withdraw_approvals(self, why: str) -> None:
        """Asks nobody answered are moot once their runbook stops."""
        for approval in self.state.pending_approvals():
            self.settle(replace(approval, outcome="withdrawn", decided_at=self.now, reason=why))
            self.record("approval_withdrawn", f"no longer asked ({why}): {approval.action}")
            self.effects.append(ShowApproval(approval.approval_id))

    def settle(self, approval: Approval) -> None:
        """Replace the approval of that id (the state's list is this step's own copy)."""
        s = self.state
        s.approvals = [
            approval if a.approval_id == approval.approval_id else a for a in s.approvals
        ]

    def conclude(self, verification: str, reading: str, controls_left: bool) -> None:
        s = self.state
        s.runbook_phase = "done"
        s.verification = verification
        if verification != "recovered" and not controls_left:
            self.step_back()  # nothing in force any more: no longer mitigating
        if s.status == IncidentStatus.RESOLVED:
            return
        if verification == "not_recovered":
            summary = reading or "signal still breached"
            self.escalate(f"the runbook's mitigation did not help ({summary})")
            return
        if verification == "recovered":
            s.verified_at = self.now
        self.effects.append(Refresh())

    def step_back(self) -> None:
        """Mitigation is over without a verified recovery: back to where the incident was."""
        s = self.state
        if s.status == IncidentStatus.MITIGATING:
            acked = s.acknowledged_by is not None
            s.status = IncidentStatus.ACKNOWLEDGED if acked else IncidentStatus.DETECTED
            self.effects.append(Show(copy.copy(s)))
