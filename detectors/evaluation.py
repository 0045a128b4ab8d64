"""One evaluation of every rule on every scope (pure): which triggers fire where, at which
severity, which recovered, and which are inhibited.

Inhibitions keep one problem to one incident:
- a trigger's relations (detectors/correlation.py) hide its targets firing with it, e.g. an
  api_outage hides the error_rate of its scope and of the scopes it covers;
- when a trigger fires on global and on some models (or features), global minus those scopes
  decides: healthy traffic left means the problem is theirs (global is hidden); no traffic left,
  or the rest breaching too, means it is everyone's (the narrower ones are hidden).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from detectors.config import DetectorRules
from detectors.correlation import Relation, hidden
from detectors.rules import Event, Rule, RuleState, step
from detectors.signals import values
from domain.aggregates import Aggregate, WindowAggregates
from domain.incident import Severity, Trigger, severity_rank
from domain.scopes import GLOBAL, kind_of


@dataclass
class Finding:
    """A trigger firing on a scope."""

    trigger: Trigger
    scope: str
    severity: Severity
    summary: str
    metrics: dict[str, float]
    rules: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    rule_states: dict[str, RuleState]
    verdicts: dict[str, str]  # "rule|scope" -> what this evaluation said
    firing: list[Finding]
    recovered: list[tuple[Trigger, str]]
    inhibited: list[str]  # "trigger|scope"


def rule_key(rule: Rule, scope: str) -> str:
    return f"{rule.name}|{scope}"


def trigger_key(trigger: Trigger | str, scope: str) -> str:
    return f"{trigger}|{scope}"


_LABELS = {
    "latency_p50_ms": ("p50 latency", "ms"),
    "latency_p95_ms": ("p95 latency", "ms"),
    "error_rate": ("error rate", "%"),
    "rate_limit_rate": ("429 rate", "%"),
    "server_error_rate": ("5xx rate", "%"),
    "tpm_quota_ratio": ("tokens/min of quota", "%"),
    "cost_rate_ratio": ("cost rate of hourly budget", "x"),
    "budget_consumed_ratio": ("daily budget used", "%"),
    "quality_mean": ("quality", ""),
    "quality_drift_z": ("quality drift", "sd"),
}


def describe(rule: Rule, value: float, level: str) -> str:
    label, unit = _LABELS.get(rule.signal, (rule.signal, ""))
    threshold = rule.critical if level == "critical" and rule.critical is not None else rule.warning
    sign = ">" if rule.above else "<"

    def show(number: float | None) -> str:
        if number is None:
            return "?"
        if unit == "%":
            return f"{number:.1%}"
        if unit == "ms":
            return f"{number / 1000:.1f}s"
        if unit == "x":
            return f"{number:.2f}x"
        return f"{number:.2f}"

    return f"{label} {show(value)} {sign} {show(threshold)}"


def evaluate(
    config: DetectorRules,
    aggregates: WindowAggregates,
    states: dict[str, RuleState],
    daily_budget_usd: float,
    relations: tuple[Relation, ...] | None = None,
    hold_for_pending: bool = True,
) -> Evaluation:
    """`relations`: the rules' own unless given. `hold_for_pending`: a target waits while its
    source is pending, and a source hidden as another scope's problem hides nothing (a run
    begun before relations replays with the legacy ones and without this)."""
    scopes = aggregates.scopes(config.scopes)
    scope_values = {
        name: values(
            aggregate,
            aggregates.window_seconds,
            scope=name,
            daily_budget_usd=daily_budget_usd,
            cost_today_usd=aggregates.cost_today_usd,
            tpm_quota=config.quota_for(name),
        )
        for name, aggregate in scopes.items()
    }
    # Scopes that went quiet keep their state (a firing rule stays firing until data says so).
    for key in states:
        scope = key.partition("|")[2]
        scope_values.setdefault(scope, {})

    new_states: dict[str, RuleState] = {}
    verdicts: dict[str, str] = {}
    firing_rules: dict[str, list[tuple[Rule, float | None]]] = {}
    pending: set[tuple[Trigger, str]] = set()
    recovered_rules: set[str] = set()
    for rule in config.rules:
        if not rule.enabled:
            continue
        for scope, found in scope_values.items():
            if kind_of(scope) not in rule.scopes:
                continue
            key = rule_key(rule, scope)
            value = found.get(rule.signal)
            samples = found.get(rule.sample_signal) or 0.0
            state, event = step(rule, states.get(key, RuleState()), value, samples)
            if state != RuleState():
                new_states[key] = state
            verdicts[key] = str(event)
            tkey = trigger_key(rule.trigger, scope)
            if state.firing:
                firing_rules.setdefault(tkey, []).append((rule, value))
            elif event == Event.PENDING and hold_for_pending:
                pending.add((rule.trigger, scope))
            elif event == Event.RECOVERED:
                recovered_rules.add(tkey)

    findings = {
        tkey: _finding(tkey, rules, scope_values[tkey.partition("|")[2]], new_states)
        for tkey, rules in firing_rules.items()
    }
    if relations is None:
        relations = config.relations
    pending -= {(f.trigger, f.scope) for f in findings.values()}
    inhibited = _inhibited(
        findings, config, aggregates, daily_budget_usd, relations, pending, hold_for_pending
    )
    return Evaluation(
        rule_states=new_states,
        verdicts=verdicts,
        firing=[f for key, f in findings.items() if key not in inhibited],
        recovered=[
            (Trigger(key.partition("|")[0]), key.partition("|")[2])
            for key in sorted(recovered_rules - firing_rules.keys())
        ],
        inhibited=sorted(inhibited),
    )


def _finding(
    tkey: str,
    rules: list[tuple[Rule, float | None]],
    found: dict[str, float | None],
    states: dict[str, RuleState],
) -> Finding:
    trigger_name, _, scope = tkey.partition("|")
    parts, severity, names = [], Severity.SEV4, []
    for rule, value in rules:
        level = states[rule_key(rule, scope)].level
        if level is None:
            continue
        names.append(rule.name)
        if severity_rank(rule.severity(level)) > severity_rank(severity):
            severity = rule.severity(level)
        if value is not None:
            parts.append(describe(rule, value, level))
    calls = found.get("calls")
    summary = "; ".join(parts) or "still firing (no data this evaluation)"
    if calls:
        summary += f" ({int(calls)} calls)"
    shown = {"calls", *(rule.signal for rule, _ in rules)}
    metrics = {name: float(v) for name, v in found.items() if name in shown and v is not None}
    return Finding(Trigger(trigger_name), scope, severity, summary, metrics, names)


def _inhibited(
    findings: dict[str, Finding],
    config: DetectorRules,
    aggregates: WindowAggregates,
    daily_budget_usd: float,
    relations: tuple[Relation, ...],
    pending: set[tuple[Trigger, str]],
    pending_holds: bool,
) -> set[str]:
    inhibited: set[str] = set()
    for key, finding in findings.items():
        if finding.scope != GLOBAL:
            continue
        for kind in ("model", "feature"):
            narrower = [
                other.scope
                for other in findings.values()
                if other.trigger == finding.trigger and kind_of(other.scope) == kind
            ]
            if not narrower:
                continue
            rest = aggregates.global_without(narrower)
            if _healthy(finding, rest, config, aggregates, daily_budget_usd):
                inhibited.add(key)  # theirs alone
            else:
                inhibited.update(trigger_key(finding.trigger, scope) for scope in narrower)
    firing = [(f.trigger, f.scope) for f in findings.values()]
    # A source hidden as another scope's problem hides nothing (a run begun before relations
    # replays as it ran: every firing source hid its targets).
    sources = [k for k in firing if trigger_key(*k) not in inhibited] if pending_holds else firing
    inhibited |= {trigger_key(*key) for key in hidden(relations, firing, pending, sources)}
    return inhibited


def _healthy(
    finding: Finding,
    rest: Aggregate,
    config: DetectorRules,
    aggregates: WindowAggregates,
    daily_budget_usd: float,
) -> bool:
    """Whether the rest of the traffic has enough samples and breaches none of the finding's
    rules."""
    found = values(
        rest,
        aggregates.window_seconds,
        scope=GLOBAL,
        daily_budget_usd=daily_budget_usd,
        cost_today_usd=aggregates.cost_today_usd,
        tpm_quota=config.quota_for(GLOBAL),
    )
    for rule in config.rules:
        if rule.name in finding.rules:
            value = found.get(rule.signal)
            samples = found.get(rule.sample_signal) or 0.0
            if value is None or samples < max(rule.min_samples, 1) or rule.level(value):
                return False
    return True
