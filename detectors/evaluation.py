"""One evaluation of every rule on every scope (pure): which triggers fire where, at which
severity, which recovered, and which are inhibited.

Each rule reads its own window (`Rule.window_seconds`, else the detector's), all of them
ending now and read together (`WindowAggregates.over`).

Inhibitions keep one problem to one incident:
- a trigger's relations (detectors/correlation.py) hide its targets firing with it, e.g. an
  api_outage hides the error_rate of its scope and of the scopes it covers;
- when a trigger fires on global and on some models (or features), global minus those scopes
  decides: healthy traffic left means the problem is theirs (global is hidden); no traffic left,
  or the rest breaching too, means it is everyone's (the narrower ones are hidden).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from detectors.config import DetectorRules
from detectors.correlation import Relation, hidden
from detectors.rules import Event, Rule, RuleState, step
from detectors.signals import HISTOGRAM_SIGNALS, Earlier, values
from domain import runway
from domain.aggregates import Aggregate, WindowAggregates
from domain.baselines import QualityBaseline
from domain.escalation import span  # a window for people: "2 min", "1 h"
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
    # The runbook page of the most severe firing rule that names one (the rules file's).
    runbook_url: str | None = None
    # How long after its incident resolves a breach reopens it: the longest of the firing
    # rules' cooldowns.
    cooldown_seconds: int = 0


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
    "non_200_rate": ("non-200 rate", "%"),
    "rate_limit_rate": ("429 rate", "%"),
    "server_error_rate": ("5xx rate", "%"),
    "tpm_quota_ratio": ("tokens/min of quota", "%"),
    "rpm_quota_ratio": ("requests/min of quota", "%"),
    "cost_rate_ratio": ("cost rate of hourly budget", "x"),
    "budget_consumed_ratio": ("daily budget used", "%"),
    "quality_mean": ("quality", ""),
    "quality_drift_z": ("quality drift", "sd"),
    "budget_runway_hours": ("daily budget runs out", "h"),
    "tpm_runway_minutes": ("tokens/min reach the quota", "min"),
    "rpm_runway_minutes": ("requests/min reach the quota", "min"),
}
# Today's spend: the same whatever the window (the window only counts the rule's samples).
_WINDOWLESS = frozenset({"budget_consumed_ratio"})
# What a runway is projected from: shown beside it in the metrics, its window in the summary.
_RUNWAY_BASIS = {
    "budget_runway_hours": (
        ("budget_consumed_ratio", "cost_usd_per_hour"),
        "at the burn of the last",
    ),
    "tpm_runway_minutes": (("tpm_quota_ratio", "tokens_per_minute"), "at the trend of the last"),
    "rpm_runway_minutes": (
        ("rpm_quota_ratio", "requests_per_minute"),
        "at the trend of the last",
    ),
}
_RUN_OUT = {
    "budget_runway_hours": "daily budget used up",
    "tpm_runway_minutes": "tokens/min at the quota",
    "rpm_runway_minutes": "requests/min at the quota",
}
DRIFT_SIGNAL = "quality_drift_z"


def label(rule: Rule) -> str:
    return _LABELS.get(rule.signal, (rule.signal, ""))[0]


def show(rule: Rule, number: float | None) -> str:
    """A value or threshold of the rule's signal, in its unit."""
    unit = _LABELS.get(rule.signal, (rule.signal, ""))[1]
    if number is None:
        return "?"
    if unit == "%":
        return f"{number:.1%}"
    if unit == "ms":
        return f"{number / 1000:.1f}s"
    if unit == "x":
        return f"{number:.2f}x"
    if unit == "h":
        return runway.describe(number * 3600)
    if unit == "min":
        return runway.describe(number * 60)
    return f"{number:.2f}"


def reading(rule: Rule, value: float, at: datetime | None = None) -> str:
    """The rule's signal and its value: "error rate 7.0%"; a runway dated from `at` (the
    window's end): "daily budget runs out in 40 min (at 14:32 UTC)"."""
    if rule.signal not in _RUNWAY_BASIS:
        return f"{label(rule)} {show(rule, value)}"
    seconds = value * (3600 if rule.signal == "budget_runway_hours" else 60)
    if seconds <= 0:
        return _RUN_OUT[rule.signal]
    if seconds >= runway.HORIZON_SECONDS:
        return f"{label(rule)}: not in sight"
    text = f"{label(rule)} in {show(rule, value)}"
    if at is None:
        return text
    when = at + timedelta(seconds=seconds)
    reset = rule.signal == "budget_runway_hours" and when > runway.next_reset(at)
    return f"{text} (at {when:%H:%M} UTC{', after the midnight reset' if reset else ''})"


def describe(
    rule: Rule,
    value: float,
    level: str,
    *,
    window: float | None = None,
    at: datetime | None = None,
) -> str:
    """The value against the line it crossed, and the window it was read over (`window`
    seconds; None: not said): "error rate 7.0% > 5.0% over 2 min"."""
    if rule.signal in _RUN_OUT and value <= 0:
        return _RUN_OUT[rule.signal]  # no line to compare with, no rate to project
    threshold = rule.critical if level == "critical" and rule.critical is not None else rule.warning
    sign = ">" if rule.above else "<"
    text = f"{reading(rule, value, at)} {sign} {show(rule, threshold)}"
    if window is None or rule.signal in _WINDOWLESS:
        return text
    if rule.signal in _RUNWAY_BASIS:
        return f"{text}, {_RUNWAY_BASIS[rule.signal][1]} {span(window)}"
    return f"{text} over {span(window)}"


# The signals of a quota: nothing to measure on a scope without that quota.
_TOKEN_QUOTA_SIGNALS = frozenset({"tpm_quota_ratio", "tpm_runway_minutes"})
_REQUEST_QUOTA_SIGNALS = frozenset({"rpm_quota_ratio", "rpm_runway_minutes"})


def measurable(rule: Rule, config: DetectorRules, scope: str) -> bool:
    """Whether the rule has something to measure on the scope: a quota's rules only where the
    rules file sets that quota (the token and request quotas share one trigger, and one of
    them is often set alone)."""
    if rule.signal in _TOKEN_QUOTA_SIGNALS:
        return bool(config.quota_for(scope))
    if rule.signal in _REQUEST_QUOTA_SIGNALS:
        return bool(config.request_quota_for(scope))
    return True


def rule_window(rule: Rule, detector_window: int) -> int:
    """The seconds a rule reads: its own window, else the detector's."""
    return rule.window_seconds if rule.window_seconds is not None else detector_window


def windows_read(config: DetectorRules, detector_window: int) -> list[int]:
    """The distinct windows the enabled rules read, narrowest first."""
    found = {rule_window(rule, detector_window) for rule in config.rules if rule.enabled}
    return sorted(found or {detector_window})


def latency_windows(config: DetectorRules, detector_window: int) -> list[int]:
    """The windows whose rules read latency percentiles, from histograms."""
    return sorted(
        {
            rule_window(rule, detector_window)
            for rule in config.rules
            if rule.enabled and rule.signal in HISTOGRAM_SIGNALS
        }
    )


Found = dict[str, float | None]


def window_signals(
    config: DetectorRules,
    aggregates: WindowAggregates,
    daily_budget_usd: float,
    detector_window: int,
    also: Iterable[int] = (),
) -> dict[int, dict[str, Found]]:
    """Every signal of every scope over each window the enabled rules read, as the detector's
    evaluation computes them: window (seconds, as the rules name it) -> scope -> signal ->
    value (None: nothing to measure there). `also`: more windows to compute, e.g. the
    detector's own for the signals no rule reads.

    `aggregates` holds each of these windows, ending together (`window_aggregates(...,
    windows=...)`); a window it lacks is an error, not the widest under another name. A
    window lists the scopes (of `config.scopes`' kinds) with data in it, `global` always: a
    narrower window may leave out a scope the widest has. The tokens' trend
    (`tpm_runway_minutes`) runs from the rules' widest window to each narrower one."""
    signals = _Signals(config, aggregates, daily_budget_usd, detector_window, also)
    lengths = sorted(length for length in signals.views if length is not None)
    # The widest is the result itself: the narrower ones must be among its `windows`.
    if missing := aggregates.lacks(lengths[:-1]):
        raise ValueError(f"the result lacks the narrower windows {missing} (seconds)")
    return {
        length: {scope: signals.found(length, scope) for scope in scopes}
        for length, scopes in signals.scopes_by_window().items()
        if length is not None
    }


class _Signals:
    """The signals of each scope over each window a rule reads (and `also`), computed when
    first asked.

    `detector_window` None: one window, `aggregates` as given, for every rule (a run begun
    before rules had windows of their own evaluates as it did)."""

    def __init__(
        self,
        config: DetectorRules,
        aggregates: WindowAggregates,
        daily_budget_usd: float,
        detector_window: int | None,
        also: Iterable[int] = (),
    ) -> None:
        self._config = config
        self._budget = daily_budget_usd
        self._detector_window = detector_window
        self.end = aggregates.end
        self.cost_today_usd = aggregates.cost_today_usd
        lengths: list[int | None] = [None]
        if detector_window is not None:
            by_rules = windows_read(config, detector_window)
            # The trend runs from the rules' widest window, whatever else is read beside.
            self.widest: int | None = by_rules[-1]
            lengths = [*sorted({*by_rules, *also})]
        else:
            self.widest = None
        self.views = {length: aggregates if length is None else aggregates.over(length)
                      for length in lengths}  # fmt: skip
        self._scopes = {length: view.scopes(config.scopes) for length, view in self.views.items()}
        self._found: dict[tuple[int | None, str], Found] = {}

    def window_of(self, rule: Rule) -> int | None:
        if self._detector_window is None:
            return None
        return rule_window(rule, self._detector_window)

    def scopes(self) -> list[str]:
        """Every scope with data in some window, the widest's first."""
        found = dict.fromkeys(self._scopes[self.widest])
        for scopes in self._scopes.values():
            found.update(dict.fromkeys(scopes))
        return list(found)

    def scopes_by_window(self) -> dict[int | None, list[str]]:
        """The scopes with data in each window (global always)."""
        return {length: list(scopes) for length, scopes in self._scopes.items()}

    def found(self, window: int | None, scope: str) -> Found:
        """The scope's signals over the window; nothing measured when it had no data there."""
        key = (window, scope)
        if key not in self._found:
            aggregate = self._scopes[window].get(scope)
            if aggregate is None:
                self._found[key] = {}
            else:
                widest = self._scopes[self.widest].get(scope)
                self._found[key] = self._values(window, scope, aggregate, widest)
        return self._found[key]

    def baseline(self, window: int | None, scope: str) -> QualityBaseline | None:
        """The quality baseline set by hand for the scope, if any (the drift reads it)."""
        return self.views[window].baselines.get(scope)

    def rest(self, window: int | None, narrower: list[str]) -> Found:
        """The signals of global minus these scopes (of one kind) over the window."""
        rest = self.views[window].global_without(narrower)
        widest = self.views[self.widest].global_without(narrower)
        return self._values(window, GLOBAL, rest, widest)

    def _values(
        self, window: int | None, scope: str, aggregate: Aggregate, widest: Aggregate | None
    ) -> Found:
        """The tokens' and requests' trends: the average of the widest window is the rate at
        its centre, the narrower window's at its own (`detectors.signals.values` takes it from
        there)."""
        view = self.views[window]
        earlier = None
        if window is not None and window != self.widest and widest is not None:
            long = self.views[self.widest].window_seconds
            minutes = max(long, 1.0) / 60
            tokens = widest.input_tokens + widest.output_tokens
            earlier = Earlier(tokens / minutes, long, requests_per_minute=widest.calls / minutes)
        return values(
            aggregate,
            view.window_seconds,
            scope=scope,
            daily_budget_usd=self._budget,
            cost_today_usd=self.cost_today_usd,
            tpm_quota=self._config.quota_for(scope),
            now=None if window is None else self.end,
            earlier=earlier,
            rpm_quota=self._config.request_quota_for(scope),
            baseline=view.baselines.get(scope),
        )


def evaluate(
    config: DetectorRules,
    aggregates: WindowAggregates,
    states: dict[str, RuleState],
    daily_budget_usd: float,
    relations: tuple[Relation, ...] | None = None,
    hold_for_pending: bool = True,
    window_seconds: int | None = None,
) -> Evaluation:
    """`relations`: the rules' own unless given. `hold_for_pending`: a target waits while its
    source is pending, and a source hidden as another scope's problem hides nothing (a run
    begun before relations replays with the legacy ones and without this).
    `window_seconds`: the detector's window; each rule reads its own window
    (`aggregates.over`), or this one. None: every rule reads `aggregates` as given, as a run
    begun before rules had windows of their own does."""
    signals = _Signals(config, aggregates, daily_budget_usd, window_seconds)
    scopes = dict.fromkeys(signals.scopes())
    # Scopes that went quiet keep their state (a firing rule stays firing until data says so).
    for key in states:
        scopes.setdefault(key.partition("|")[2])

    new_states: dict[str, RuleState] = {}
    verdicts: dict[str, str] = {}
    firing_rules: dict[str, list[tuple[Rule, float | None]]] = {}
    pending: set[tuple[Trigger, str]] = set()
    recovered_rules: set[str] = set()
    for rule in config.rules:
        if not rule.enabled:
            continue
        window = signals.window_of(rule)
        for scope in scopes:
            if kind_of(scope) not in rule.scopes:
                continue
            key = rule_key(rule, scope)
            found = signals.found(window, scope)
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
        tkey: _finding(tkey, rules, signals, new_states) for tkey, rules in firing_rules.items()
    }
    if relations is None:
        relations = config.relations
    pending -= {(f.trigger, f.scope) for f in findings.values()}
    inhibited = _inhibited(findings, config, signals, relations, pending, hold_for_pending)
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
    signals: _Signals,
    states: dict[str, RuleState],
) -> Finding:
    """The trigger's firing rules on the scope: the worst sets the severity; the summary says
    each one's value, line and window, the metrics hold their signals (and a runway's basis)."""
    trigger_name, _, scope = tkey.partition("|")
    parts, severity, names = [], Severity.SEV4, []
    runbook_url, linked_rank = None, -1
    windows: list[int | None] = []
    metrics: dict[str, float] = {}
    for rule, value in rules:
        window = signals.window_of(rule)
        found = signals.found(window, scope)
        basis = _RUNWAY_BASIS.get(rule.signal, ((), ""))[0]
        for name in (rule.signal, *basis):
            if (shown := found.get(name)) is not None:
                metrics[name] = float(shown)
        level = states[rule_key(rule, scope)].level
        if level is None:
            continue
        names.append(rule.name)
        if window not in windows:
            windows.append(window)
        if severity_rank(rule.severity(level)) > severity_rank(severity):
            severity = rule.severity(level)
        if rule.runbook_url and severity_rank(rule.severity(level)) > linked_rank:
            runbook_url, linked_rank = rule.runbook_url, severity_rank(rule.severity(level))
        hand_set = signals.baseline(window, scope) if rule.signal == DRIFT_SIGNAL else None
        if hand_set is not None:
            metrics |= {
                "quality_baseline_mean": hand_set.mean,
                "quality_baseline_sd": hand_set.stddev,
                "quality_baseline_hand_set": 1.0,
            }
        if value is not None:
            text = describe(rule, value, level, window=window, at=signals.end)
            if hand_set is not None:
                text += f", against the baseline set by hand ({hand_set.describe()})"
            parts.append(text)
    # The calls of the widest window the rules read (the one window of most findings).
    known = [window for window in windows if window is not None]
    widest = max(known) if known else signals.widest
    calls = signals.found(widest, scope).get("calls")
    summary = "; ".join(parts) or "still firing (no data this evaluation)"
    if calls:
        where = f" in {span(widest)}" if widest is not None and len(windows) > 1 else ""
        summary += f" ({int(calls)} calls{where})"
    if calls is not None:
        metrics = {"calls": float(calls), **metrics}
    cooldown = max((rule.cooldown_seconds for rule, _ in rules if rule.name in names), default=0)
    return Finding(
        Trigger(trigger_name), scope, severity, summary, metrics, names, runbook_url, cooldown
    )


def _inhibited(
    findings: dict[str, Finding],
    config: DetectorRules,
    signals: _Signals,
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
            if _healthy(finding, narrower, config, signals):
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
    finding: Finding, narrower: list[str], config: DetectorRules, signals: _Signals
) -> bool:
    """Whether the rest of the traffic (global without the narrower scopes) has enough samples
    and breaches none of the finding's rules, each over its window."""
    rest: dict[int | None, Found] = {}
    for rule in config.rules:
        if rule.name in finding.rules:
            window = signals.window_of(rule)
            if window not in rest:
                rest[window] = signals.rest(window, narrower)
            value = rest[window].get(rule.signal)
            samples = rest[window].get(rule.sample_signal) or 0.0
            if value is None or samples < max(rule.min_samples, 1) or rule.level(value):
                return False
    return True
