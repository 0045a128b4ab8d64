"""What every runbook is: a declaration (`RunbookSpec`), a typed input, a typed report."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlRef
    from activities.diagnosis import SignalReading
    from domain.escalation import EscalationPolicy
    from domain.incident import Approval


class Priority(StrEnum):
    """How much a feature matters when something has to give (PAGERLOOP_FEATURE_PRIORITIES)."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class Verification(StrEnum):
    RECOVERED = "recovered"  # the breached signal is back past its clear line
    NOT_RECOVERED = "not_recovered"  # still breached: what was done is rolled back
    INCONCLUSIVE = "inconclusive"  # better but not past the clear line, or too little traffic
    NOT_CHECKED = "not_checked"  # nothing was done (no mitigation applied, or not allowed)


@dataclass
class RunbookInput:
    incident_id: str
    trigger: str
    scope: str
    severity: str
    opened_at: datetime
    metrics: dict[str, float] = field(default_factory=dict)  # the breach's snapshot
    summary: str = ""
    feature_priorities: dict[str, str] = field(default_factory=dict)
    # False: diagnose, then wait for the incident's acknowledgement before changing anything.
    may_mitigate: bool = True
    verify_after_seconds: int = 180
    diagnosis_window_seconds: int = 900
    # Model family -> fallback target, `model` or `model@endpoint` (PAGERLOOP_FALLBACK_TARGETS).
    fallbacks: dict[str, str] = field(default_factory=dict)
    # Feature -> the check of its output a validate control applies (PAGERLOOP_OUTPUT_CHECKS).
    output_checks: dict[str, str] = field(default_factory=dict)
    # Whether a golden-set eval is configured (PAGERLOOP_GOLDEN_SET_URL; the URL stays with the
    # worker): the quality runbook asks it before pinning.
    golden_set: bool = False


@dataclass
class RunbookReport:
    runbook: str
    findings: list[str] = field(default_factory=list)
    actions: list[ControlRef] = field(default_factory=list)  # the controls left in force
    rolled_back: list[ControlRef] = field(default_factory=list)
    verification: Verification = Verification.NOT_CHECKED
    reading: SignalReading | None = None  # the signal re-read after mitigating
    canaries: list[CanaryOutcome] = field(default_factory=list)
    approvals: list[Approval] = field(default_factory=list)  # the steps that asked a person


@dataclass
class CanaryOutcome:
    """A control tried on a slice of the traffic first (`Steps.canary`), and what became of it."""

    controls: list[str]  # the controls' descriptions
    fraction: float
    verdict: str  # promote | revert | inconclusive (domain.canary.Verdict)
    reason: str
    lines: list[str] = field(default_factory=list)  # the comparison, one line per measure
    promoted: bool = False  # now in force on all the traffic
    canary_calls: int = 0
    rest_calls: int = 0


@dataclass
class RunbookProgress:
    """A runbook telling its incident what it found or did (timeline, Slack thread, Jira)."""

    kind: str  # diagnosis | mitigating | mitigation | verified | rolled_back | approval | ...
    text: str
    # kind "approval" (a step asks a person; `text` is what it will do) and "approval_expired"
    # (no answer in time): which ask, how long it waits and what no answer means.
    approval_id: str = ""
    timeout_seconds: int = 0
    on_timeout: str = ""
    step: str = ""
    # When the runbook stops waiting, by its own clock: the incident refuses answers after it.
    expires_at: datetime | None = None


# The severities that page at once: their L1 resolves within the runbook's expected time.
RESOLVE_DEADLINE_SEVERITIES = ("SEV1", "SEV2")


@dataclass(frozen=True)
class RunbookSpec:
    """A runbook's declaration, read by the incident workflow (so: plain, deterministic data)."""

    name: str
    workflow: type[Any]  # the runbook's workflow class
    triggers: tuple[str, ...]
    # True: act before anyone acknowledges (safe, reversible actions); False: diagnose at once,
    # mitigate once acknowledged.
    mitigate_before_ack: bool
    expected_resolution_minutes: int
    # Who each level is for this failure mode (the seed's escalation path), L1 first.
    escalation_path: tuple[str, ...] = ()
    # Replaces the severity's escalation policy altogether; None keeps it.
    escalation: EscalationPolicy | None = None
    # False: keep the controls even when the signal does not recover (they soften the impact
    # of a cause outside our hands, such as an OpenAI outage); the incident escalates anyway.
    roll_back_on_failure: bool = True
    # Which trigger's signal tells whether it worked, when not the incident's own (a budget
    # consumed today never falls back: its cost rate does).
    verify_on: tuple[tuple[str, str], ...] = ()
    # The steps that ask a person first (`Steps.approve`), and at which severities: step name ->
    # severities, e.g. (("reroute_all", ("SEV1", "SEV2")),). Any other step goes ahead unasked.
    approvals: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The team's own page for this runbook (absolute http(s)); None: the service's page of it,
    # `GET /runbooks/<name>`, which says what the runbook does from this declaration.
    runbook_url: str | None = None

    def needs_approval(self, step: str, severity: str) -> bool:
        return severity in dict(self.approvals).get(step, ())

    def verified_by(self, trigger: str) -> str:
        return dict(self.verify_on).get(trigger, trigger)

    def policy(
        self, severity_policy: EscalationPolicy, severity: str | None = None
    ) -> EscalationPolicy:
        """The escalation policy of this runbook's incidents of `severity`: at a paging
        severity, L1 has the runbook's expected resolution time to resolve before it
        escalates; a ticket's days-long deadline stays (severity None: as runs begun before
        this had it)."""
        policy = (self.escalation or severity_policy).described(self.escalation_path)
        if severity in RESOLVE_DEADLINE_SEVERITIES:
            policy = policy.resolving_within(self.expected_resolution_minutes * 60)
        return policy


def runbook_page(status_url: str, name: str) -> str:
    """The service's own page of a runbook, beside its status page (`<api>/status` ->
    `<api>/runbooks/<name>`)."""
    base = status_url.rstrip("/").removesuffix("/status")
    return f"{base}/runbooks/{quote(name, safe='')}"


def runbook_link(rule_url: str | None, spec: RunbookSpec | None, status_url: str) -> str | None:
    """Where an incident's responders read what to do: the firing rule's page (the rules file),
    else the runbook's own, else the service's page of the runbook (when the service knows its
    own address), else nowhere."""
    if rule_url:
        return rule_url
    if spec is None:
        return None
    if spec.runbook_url:
        return spec.runbook_url
    return runbook_page(status_url, spec.name) if status_url else None
