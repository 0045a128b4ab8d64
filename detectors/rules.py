"""Pure rule evaluation: thresholds, minimum samples and consecutive-breach counting.

A rule fires only after `for_evaluations` consecutive breaching evaluations (Prometheus' `for:`),
so one bad minute does not wake anybody.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from workflows.incident_types import Severity, Trigger


class Verdict(StrEnum):
    INSUFFICIENT_DATA = "insufficient_data"
    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"


@dataclass(frozen=True)
class ThresholdRule:
    trigger: Trigger
    signal: str
    threshold: float
    severity: Severity
    min_samples: int
    for_evaluations: int

    def breached(self, value: float) -> bool:
        return value > self.threshold


ERROR_RATE_RULE = ThresholdRule(
    trigger=Trigger.ERROR_RATE,
    signal="error_rate",
    threshold=0.05,
    severity=Severity.SEV2,
    min_samples=20,
    for_evaluations=2,
)


@dataclass(frozen=True)
class RuleState:
    consecutive_breaches: int = 0
    incident_id: str | None = None
    reported_at: datetime | None = None


def evaluate(
    rule: ThresholdRule, state: RuleState, value: float, samples: int
) -> tuple[RuleState, Verdict]:
    """The rule's state after one more evaluation, and what that evaluation means."""
    if samples < rule.min_samples:
        return replace(state, consecutive_breaches=0), Verdict.INSUFFICIENT_DATA
    if not rule.breached(value):
        return replace(state, consecutive_breaches=0), Verdict.OK
    state = replace(state, consecutive_breaches=state.consecutive_breaches + 1)
    if state.consecutive_breaches >= rule.for_evaluations:
        return state, Verdict.FIRING
    return state, Verdict.PENDING
