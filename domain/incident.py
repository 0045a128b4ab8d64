"""The incident: severities and triggers, what it starts with, the events that reach it
(breaches, recoveries, responders' actions), its state and timeline, its result.

Data that crosses the incident workflow's boundary, shared by every layer that opens, tells,
shows or renders an incident. Temporal carries these dataclasses as JSON without their module,
so where they live is no part of any recorded history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from domain.escalation import DEFAULT_POLICIES, EscalationPolicy

# After an incident id, the episode of a reopened incident (IncidentState.episode_key).
EPISODE_MARK = "/reopened-"


class IncidentStatus(StrEnum):
    DETECTED = "detected"
    ACKNOWLEDGED = "acknowledged"
    MITIGATING = "mitigating"
    RESOLVED = "resolved"


class Severity(StrEnum):
    SEV1 = "SEV1"
    SEV2 = "SEV2"
    SEV3 = "SEV3"
    SEV4 = "SEV4"


def severity_rank(severity: Severity | str) -> int:
    """SEV1 is the most severe: the highest rank."""
    return 5 - int(str(severity)[-1])


class Trigger(StrEnum):
    RATE_LIMIT_EXHAUSTION = "rate_limit_exhaustion"
    ELEVATED_LATENCY = "elevated_latency"
    ERROR_RATE = "error_rate"
    API_OUTAGE = "api_outage"
    COST_SPIKE = "cost_spike"
    BUDGET_EXHAUSTION = "budget_exhaustion"
    TOKEN_QUOTA = "token_quota"
    QUALITY_DEGRADATION = "quality_degradation"


@dataclass
class Breach:
    """What a detector saw: a rule over its threshold for long enough."""

    trigger: Trigger
    scope: str
    severity: Severity
    observed_at: datetime
    summary: str
    metrics: dict[str, float] = field(default_factory=dict)
    # The firing rule's own runbook page (the rules file's `runbook_url`), if it names one.
    runbook_url: str | None = None


@dataclass
class ReopenRequest:
    """Reopen the resolved incident with `breach`, if it was resolved at most
    `cooldown_seconds` before (the firing rule's cooldown)."""

    breach: Breach
    cooldown_seconds: int


@dataclass
class Recovery:
    """The detector saw the breached signal back on the good side for long enough."""

    trigger: Trigger
    scope: str
    observed_at: datetime
    summary: str = ""


@dataclass
class RunbookPlan:
    """How runbooks run for this deployment (settings, fixed when the incident opens)."""

    enabled: bool = True
    verify_after_seconds: int = 180
    diagnosis_window_seconds: int = 900
    feature_priorities: dict[str, str] = field(default_factory=dict)
    # Model family -> what the latency runbook may reroute it to (PAGERLOOP_FALLBACK_TARGETS).
    fallbacks: dict[str, str] = field(default_factory=dict)
    # Feature -> the check the quality runbook puts on its output (PAGERLOOP_OUTPUT_CHECKS).
    output_checks: dict[str, str] = field(default_factory=dict)
    golden_set: bool = False  # PAGERLOOP_GOLDEN_SET_URL is set (the URL stays with the worker)


@dataclass
class NotificationPlan:
    """Which channels exist and how to escalate; decided when the incident opens."""

    slack_channel: str | None = None
    pagerduty: bool = False
    jira: bool = False
    jira_project: str = "OPS"
    email: bool = False
    email_to: list[str] = field(default_factory=list)  # a level's own `email_to` comes first
    # The names of PAGERLOOP_WEBHOOK_URLS' receivers, for levels without their own (the URLs
    # may hold tokens: they stay with the worker).
    webhook_receivers: list[str] = field(default_factory=list)
    allowed_slack_users: list[str] = field(default_factory=list)
    status_url: str = ""
    # The Temporal UI's page of a workflow, "{workflow_id}" standing for the incident's.
    temporal_ui_url: str = ""
    policies: dict[str, EscalationPolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    # After a resolve, how long a page still being retried may go on before it is called off.
    page_grace_seconds: int = 30
    runbook: RunbookPlan = field(default_factory=RunbookPlan)
    # Write the incident report at resolve (`reports.build`, which the worker registers), post
    # it as the Jira postmortem and its summary in the Slack thread.
    report: bool = False


@dataclass
class IncidentInput:
    incident_id: str
    trigger: Trigger
    scope: str
    severity: Severity
    opened_at: datetime
    notify: NotificationPlan = field(default_factory=NotificationPlan)
    # Told when this incident closes, so a breach that goes on opens a new incident at once.
    detector_workflow_id: str | None = None
    # Set by continue-as-new: where the previous run left off.
    carried: CarriedState | None = None
    # Updates handled per run before continuing as new (keeps week-long incidents' history
    # short; Temporal may also suggest it earlier).
    updates_per_run: int = 1000
    # A resolved incident's new run (`carried` holds its final state), started because its
    # trigger breached again within the rule's cooldown: it waits for the `reopen` update.
    reopen: bool = False
    # Open incidents of the same problem merged into this one as it opens (detectors/
    # correlation.py): it takes over the Slack message, PagerDuty alert and Jira ticket of the
    # one handed over, so nobody is paged twice for one problem.
    absorbs: list[Handover] = field(default_factory=list)


@dataclass
class LaneAction:
    """A side effect waiting its turn: kind, and what it needs."""

    kind: str
    text: str = ""
    level: str = ""
    # Whom it is for, when the channel decides that as it queues the action (the level's
    # addresses then, not those of whatever policy is in force when it is performed).
    to: list[str] = field(default_factory=list)


@dataclass
class CarriedState:
    state: IncidentState
    pending: dict[str, list[LaneAction]] = field(default_factory=dict)


@dataclass
class ActionRequest:
    """A responder acting on an incident (acknowledge, resolve, escalate, note), and how."""

    user: str
    channel: str = "api"
    note: str = ""
    # On resolve: leave the runbook's controls in force instead of reverting them.
    keep_controls: bool = False


@dataclass
class SnoozeRequest:
    user: str
    minutes: int = 30
    channel: str = "api"


@dataclass
class ApprovalDecision:
    """A person's answer to a runbook step that asked for approval (`Steps.approve`).
    `channel` is where it came from ("slack", "cli", "api"): Slack users must be allowed."""

    approval_id: str
    approved: bool
    decided_by: str
    reason: str = ""
    channel: str = "api"


@dataclass
class Approval:
    """A runbook step that asked a person before acting, and what became of the ask."""

    approval_id: str  # "<runbook workflow id>/approval-<n>"
    action: str  # what the step will do, as people read it
    asked_at: datetime
    expires_at: datetime
    step: str = ""
    on_timeout: str = "deny"  # what no answer by `expires_at` means: "deny" | "proceed"
    # "" while it waits; "approved" | "denied" (a person), "expired" (no answer in time),
    # "withdrawn" (the runbook ended or the incident resolved first).
    outcome: str = ""
    approved: bool = False  # whether the step goes ahead
    decided_by: str = ""
    decided_at: datetime | None = None
    reason: str = ""
    # The Slack message with its Approve / Deny buttons, once posted.
    message: SlackMessageRef | None = None

    @property
    def pending(self) -> bool:
        return self.outcome == ""


@dataclass
class TimelineEntry:
    at: datetime
    kind: str
    text: str
    actor: str = "pagerloop"
    channel: str = "workflow"


@dataclass
class PagedTarget:
    """A PagerDuty alert this incident raised: its dedup key and where it was routed."""

    dedup_key: str
    severity: str
    level: str


@dataclass
class SlackMessageRef:
    channel: str
    ts: str


@dataclass
class MergeRequest:
    """Merge this incident into `into`, the incident of the wider problem (its trigger and
    scope say which); `hand_over`: `into` is opening now and takes over this one's Slack
    message, PagerDuty alert and Jira ticket."""

    into: str
    trigger: Trigger
    scope: str
    hand_over: bool = False


@dataclass
class Handover:
    """What a merged incident hands the incident that takes it in."""

    incident_id: str
    trigger: Trigger
    scope: str
    severity: Severity
    opened_at: datetime
    summary: str = ""
    acknowledged_by: str | None = None
    # Set when handed over (MergeRequest.hand_over): where people were told of it.
    slack_message: SlackMessageRef | None = None
    paged: list[PagedTarget] = field(default_factory=list)
    jira_issue: str | None = None


@dataclass
class IncidentState:
    incident_id: str
    trigger: Trigger
    scope: str
    severity: Severity
    status: IncidentStatus
    opened_at: datetime
    level: int = 1
    level_name: str = "L1"
    ack_by: datetime | None = None
    resolve_by: datetime | None = None
    remind_at: datetime | None = None
    # What the top level is being reminded of ("acknowledged" / "resolved"), "" when nothing.
    remind_for: str = ""
    summary: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    breach_count: int = 0
    last_breach_at: datetime | None = None
    recovered_at: datetime | None = None
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    resolved_by: str | None = None
    resolved_at: datetime | None = None
    mitigation_started_at: datetime | None = None
    runbook: str | None = None
    # Where responders read what to do: the firing rule's page, else the runbook's own, else
    # the service's page of the runbook (runbooks.base.runbook_link); None: nowhere.
    runbook_url: str | None = None
    # "" (not run yet), "diagnosed" (waits for an acknowledgement to mitigate), "running", "done"
    runbook_phase: str = ""
    runbook_runs: int = 0
    diagnosis: str = ""
    controls: list[str] = field(default_factory=list)  # the runbook's controls in force
    controls_kept_at: datetime | None = None  # set or last extended (they expire unless kept)
    verification: str | None = None
    verified_at: datetime | None = None
    slack_message: SlackMessageRef | None = None
    paged: list[PagedTarget] = field(default_factory=list)
    jira_issue: str | None = None
    timeline: list[TimelineEntry] = field(default_factory=list)
    # One problem, one incident: the incident this one was merged into, the incidents merged
    # into this one ("<id> (<trigger> on <scope>)"), and the triggers that fired on a scope
    # this one covers while it was open ("<trigger>|<scope>").
    merged_into: str | None = None
    absorbed: list[str] = field(default_factory=list)
    related: list[str] = field(default_factory=list)
    # Merged with `hand_over`: what the other incident took (its own fields are cleared, so
    # nothing here touches that message, alert or ticket again).
    handed_over: Handover | None = None
    # Runbook steps that asked a person first (Steps.approve), oldest first.
    approvals: list[Approval] = field(default_factory=list)
    # Times its trigger breached again within the rule's cooldown after a resolve, each time
    # reopening this incident (a new run of its workflow) instead of opening a new one.
    reopened: int = 0
    reopened_at: datetime | None = None

    @property
    def episode_key(self) -> str:
        """The incident id, then one more suffix per reopening: what marks this episode's
        report, postmortem and close apart from the earlier ones."""
        return self.incident_id + (f"{EPISODE_MARK}{self.reopened}" if self.reopened else "")

    def approval(self, approval_id: str) -> Approval | None:
        return next((a for a in self.approvals if a.approval_id == approval_id), None)

    def pending_approvals(self) -> list[Approval]:
        return [a for a in self.approvals if a.pending]

    def correlation_lines(self) -> list[str]:
        """What merges made of this incident, a line each (UI details, CLI, Slack)."""
        lines = [f"merged into {self.merged_into}: one problem"] if self.merged_into else []
        lines += [f"took in {name}" for name in self.absorbed]
        if self.related:
            firing = ", ".join(key.replace("|", " on ") for key in self.related)
            lines.append(f"also firing: {firing}")
        return lines

    def handover(self, hand_over: bool) -> Handover:
        if self.handed_over is not None:  # asked again (a retry): what it handed over then
            return self.handed_over
        return Handover(
            incident_id=self.incident_id,
            trigger=self.trigger,
            scope=self.scope,
            severity=self.severity,
            opened_at=self.opened_at,
            summary=self.summary,
            acknowledged_by=self.acknowledged_by,
            slack_message=self.slack_message if hand_over else None,
            paged=list(self.paged) if hand_over else [],
            jira_issue=self.jira_issue if hand_over else None,
        )


def episode_of(key: str) -> tuple[str, int]:
    """An episode key's incident id and episode (0 for an incident never reopened)."""
    incident_id, mark, episode = key.rpartition(EPISODE_MARK)
    if mark and episode.isdigit():
        return incident_id, int(episode)
    return key, 0


@dataclass
class BreachReceipt:
    incident_id: str
    status: IncidentStatus
    breach_count: int
    reopened: int = 0  # the incident's episode that took it (IncidentState.reopened)


@dataclass
class IncidentResult:
    incident_id: str
    status: IncidentStatus
    opened_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    resolved_by: str | None
    timeline: list[TimelineEntry]
