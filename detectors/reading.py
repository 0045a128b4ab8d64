"""The re-read of a breached signal (pure): the trigger's rules on one scope's signals now, as
one detector evaluation would judge them, for the runbooks' verification
(`diagnosis.check_signal`, which the worker gives a `SignalJudge`).

Every rule is judged over the check's one window, not its own: the runbook asks about the
traffic since its mitigation reached the clients, and a rule's window reaching back before
that would mix the traffic it is judging with the traffic that made it act. A runway is dated
from the check's end; the tokens' runway, a trend between two windows, is not measured here
(the quota's share is).
"""

from __future__ import annotations

from dataclasses import dataclass

from activities.diagnosis import SignalCheck, SignalReading
from detectors.config import DetectorRules
from detectors.evaluation import describe, label, measurable, reading, show
from detectors.rules import Rule
from detectors.signals import TREND_SIGNALS, values
from domain.aggregates import WindowAggregates
from domain.escalation import span
from domain.scopes import kind_of


@dataclass(frozen=True)
class SignalJudge:
    """The detector's rules and budget, judging the diagnosis activity's re-reads."""

    rules: DetectorRules
    daily_budget_usd: float

    def __call__(self, check: SignalCheck, aggregates: WindowAggregates) -> SignalReading:
        return read_signal(check, aggregates, self.rules, self.daily_budget_usd)


def _against_clear_line(rule: Rule, value: float, aggregates: WindowAggregates) -> str:
    shown = reading(rule, value, aggregates.end)
    return f"{shown} (clear line {show(rule, rule.clear_line())})"


def read_signal(
    check: SignalCheck,
    aggregates: WindowAggregates,
    config: DetectorRules,
    daily_budget_usd: float,
) -> SignalReading:
    """The trigger's rules on the scope's signals, as one detector evaluation would judge them,
    without the for-duration: a runbook asks "is it still bad / is it over now"."""
    found = values(
        aggregates.scope(check.scope),
        aggregates.window_seconds,
        scope=check.scope,
        daily_budget_usd=daily_budget_usd,
        cost_today_usd=aggregates.cost_today_usd,
        tpm_quota=config.quota_for(check.scope),
        rpm_quota=config.request_quota_for(check.scope),
        baseline=aggregates.baselines.get(check.scope),
        now=aggregates.end,
    )
    rules = [
        rule
        for rule in config.rules
        if rule.enabled
        and rule.trigger == check.trigger
        and kind_of(check.scope) in rule.scopes
        and measurable(rule, config, check.scope)
    ]
    calls = int(found.get("calls") or 0)
    names = ["calls", *(rule.signal for rule in rules), *(rule.sample_signal for rule in rules)]
    readings = {name: float(v) for name in names if (v := found.get(name)) is not None}
    if not rules:
        return SignalReading(
            check.trigger, check.scope, readings, calls, breached=False, recovered=False,
            summary=f"no enabled rule watches {check.trigger} on {check.scope}; {calls} calls",
        )  # fmt: skip

    breached, recovered, judged, parts = False, True, 0, []
    for rule in rules:
        value = found.get(rule.signal)
        samples = found.get(rule.sample_signal) or 0.0
        if rule.signal in TREND_SIGNALS:
            # A trend needs two windows; the check has one. Neither a breach nor held back.
            parts.append(f"{label(rule)} not measured (a trend, not one window)")
            continue
        if samples < rule.min_samples:
            # Quiet traffic proves nothing, as in the detector: neither breach nor recovery.
            recovered = False
            sample_name = rule.sample_signal.replace("_", " ")
            head = label(rule) if value is None else reading(rule, value, aggregates.end)
            parts.append(
                f"{head}: too few samples ({int(samples)} of {rule.min_samples} {sample_name})"
            )
            continue
        if value is None:
            # Enough samples, yet nothing to measure (quality drift without a baseline, tokens
            # per minute without a quota): the rule cannot be over its line, nor hold a
            # recovery back, as it could not have fired in the detector either.
            parts.append(f"{label(rule)} not measured")
            continue
        judged += 1
        level = rule.level(value)
        if level is not None:
            breached, recovered = True, False
            parts.append(describe(rule, value, level, at=aggregates.end))
        else:
            recovered = recovered and rule.cleared(value)
            parts.append(_against_clear_line(rule, value, aggregates))
    counts = [f"{calls} calls"] + [
        f"{int(found.get(name) or 0)} {name.replace('_', ' ')}"
        for name in dict.fromkeys(rule.sample_signal for rule in rules)
        if name != "calls"
    ]
    return SignalReading(
        trigger=check.trigger,
        scope=check.scope,
        values=readings,
        calls=calls,
        breached=breached,
        recovered=recovered and judged > 0,
        summary=f"{'; '.join(parts)}, {', '.join(counts)} in {span(aggregates.window_seconds)}",
    )
