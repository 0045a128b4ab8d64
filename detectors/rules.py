"""Alert rules and their anti-flap state machine (pure functions).

A rule watches one signal of one scope. It fires after `for_evaluations` consecutive breaching
evaluations (Prometheus' `for:`), with at least `min_samples` behind each; once firing it
recovers only after `recover_evaluations` consecutive evaluations on the good side of the
hysteresis line (`hysteresis` of the way back from the warning threshold), so a value hovering
at the threshold does not open and close incidents. An evaluation without enough samples
changes nothing: quiet traffic neither fires nor recovers a rule.

Each rule reads its signal over a window of its own (`window_seconds`: the seed's 2 minutes for
errors and 429s, 5 for latency, 10 for spend and quality), or over the detector's window
(`PAGERLOOP_DETECTOR_WINDOW_SECONDS`) when it has none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from domain.incident import Severity, Trigger


class Level(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


class Event(StrEnum):
    INSUFFICIENT_DATA = "insufficient_data"
    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"
    RECOVERING = "recovering"
    RECOVERED = "recovered"


@dataclass(frozen=True)
class Rule:
    name: str
    signal: str
    trigger: Trigger
    above: bool  # True: breaches above the thresholds; False: below them
    warning: float | None
    critical: float | None
    warning_severity: Severity = Severity.SEV3
    critical_severity: Severity = Severity.SEV2
    sample_signal: str = "calls"
    min_samples: int = 20
    for_evaluations: int = 2
    recover_evaluations: int = 3
    hysteresis: float = 0.2
    scopes: tuple[str, ...] = ("global", "model", "feature")
    enabled: bool = True
    # Seconds of traffic the signal is read over; None: the detector's window.
    window_seconds: int | None = None
    # The team's own page for this rule (an absolute http(s) URL, from the rules file): the
    # incident links it before its runbook's. The built-in rules name none.
    runbook_url: str | None = None
    # After its incident resolves, a breach within this many seconds reopens that incident
    # (paging whoever resolved it) instead of opening a new one; 0: always a new one.
    cooldown_seconds: int = 300

    def level(self, value: float) -> Level | None:
        def beyond(threshold: float | None) -> bool:
            if threshold is None:
                return False
            return value > threshold if self.above else value < threshold

        if beyond(self.critical):
            return Level.CRITICAL
        if beyond(self.warning):
            return Level.WARNING
        return None

    def clear_line(self) -> float:
        """The value a firing rule must get back past (not just to) before it recovers."""
        threshold = self.warning if self.warning is not None else self.critical
        assert threshold is not None
        if self.above:
            return threshold * (1 - self.hysteresis)
        return threshold + abs(threshold) * self.hysteresis

    def cleared(self, value: float) -> bool:
        line = self.clear_line()
        return value < line if self.above else value > line

    def severity(self, level: Level) -> Severity:
        return self.critical_severity if level == Level.CRITICAL else self.warning_severity


@dataclass(frozen=True)
class RuleState:
    breaches: int = 0  # consecutive breaching evaluations
    good: int = 0  # consecutive evaluations past the clear line, while firing
    firing: bool = False
    level: Level | None = None


def step(
    rule: Rule, state: RuleState, value: float | None, samples: float
) -> tuple[RuleState, Event]:
    """The rule's state after one more evaluation, and what that evaluation means."""
    if value is None or samples < rule.min_samples:
        # Quiet traffic proves nothing: a firing rule stays firing, a pending one starts over
        # (from the empty state, which the detector does not keep: scopes that went quiet
        # cost nothing, however many came and went).
        return (state if state.firing else RuleState()), Event.INSUFFICIENT_DATA
    level = rule.level(value)
    if level is not None:
        breaches = state.breaches + 1
        if state.firing or breaches >= rule.for_evaluations:
            return RuleState(breaches, 0, True, level), Event.FIRING
        return RuleState(breaches, 0, False, level), Event.PENDING
    if not state.firing:
        return RuleState(), Event.OK
    if not rule.cleared(value):  # inside the hysteresis band: still firing
        return replace(state, breaches=0, good=0), Event.FIRING
    good = state.good + 1
    if good >= rule.recover_evaluations:
        return RuleState(), Event.RECOVERED
    return replace(state, breaches=0, good=good), Event.RECOVERING


S = Severity
T = Trigger
M2, M5, M10 = 120, 300, 600  # the seed's windows, in seconds

# The seed's thresholds and windows. Latency in milliseconds, rates as fractions, ratios of
# quota / budget, runways in hours (budget) and minutes (tokens and requests per minute).
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("latency_p50", "latency_p50_ms", T.ELEVATED_LATENCY, True, 2000, 5000, window_seconds=M5),
    Rule("latency_p95", "latency_p95_ms", T.ELEVATED_LATENCY, True, 8000, 15000, window_seconds=M5),
    Rule("error_rate", "error_rate", T.ERROR_RATE, True, 0.02, 0.05, window_seconds=M2),
    Rule(
        "rate_limit", "rate_limit_rate", T.RATE_LIMIT_EXHAUSTION, True, 0.01, 0.05,
        window_seconds=M2,
    ),
    Rule(
        "api_outage", "server_error_rate", T.API_OUTAGE, True, None, 0.5,
        critical_severity=S.SEV1, min_samples=10,
    ),
    Rule("token_quota", "tpm_quota_ratio", T.TOKEN_QUOTA, True, 0.80, 0.95, min_samples=1),
    # Minutes until the tokens per minute reach the quota, on their trend from the longest
    # window to this one: only where a quota is set; a trend of a handful of calls is noise.
    Rule(
        "tpm_runway", "tpm_runway_minutes", T.TOKEN_QUOTA, False, 30.0, 5.0,
        window_seconds=M2,
    ),
    # The account's other limit, requests per minute (`rpm_quota`): the same lines and trend,
    # the same incident as the tokens'.
    Rule("rpm_quota", "rpm_quota_ratio", T.TOKEN_QUOTA, True, 0.80, 0.95, min_samples=1),
    Rule(
        "rpm_runway", "rpm_runway_minutes", T.TOKEN_QUOTA, False, 30.0, 5.0,
        window_seconds=M2,
    ),
    Rule("cost_rate", "cost_rate_ratio", T.COST_SPIKE, True, 1.2, 1.5, min_samples=1),
    Rule(
        "budget", "budget_consumed_ratio", T.BUDGET_EXHAUSTION, True, 0.80, 0.95,
        min_samples=0, scopes=("global",), window_seconds=M10,
    ),
    # Hours until the daily budget runs out at this window's burn, counting the reset at
    # midnight UTC. No minimum of calls: spend stopped is a runway out of sight, which
    # recovers the rule.
    Rule(
        "budget_runway", "budget_runway_hours", T.BUDGET_EXHAUSTION, False, 6.0, 1.0,
        warning_severity=S.SEV2, critical_severity=S.SEV1, min_samples=0, scopes=("global",),
        window_seconds=M10,
    ),
    Rule(
        "quality", "quality_mean", T.QUALITY_DEGRADATION, False, 0.7, 0.5,
        sample_signal="quality_scores", hysteresis=0.1, window_seconds=M10,
    ),
    Rule(
        "quality_drift", "quality_drift_z", T.QUALITY_DEGRADATION, False, -2.0, None,
        sample_signal="quality_scores", hysteresis=0.5, window_seconds=M10,
    ),
)  # fmt: skip
