"""The rules and one evaluation of them, without Temporal or a store."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from detectors.config import DetectorRules, RulesFileError, load_rules
from detectors.correlation import LEGACY_RELATIONS
from detectors.evaluation import (
    Evaluation,
    evaluate,
    latency_windows,
    reading,
    rule_window,
    window_signals,
    windows_read,
)
from detectors.rules import DEFAULT_RULES, Event, Level, Rule, RuleState, step
from detectors.signals import values
from domain.aggregates import Aggregate, WindowAggregates, WindowSums
from domain.histogram import RELATIVE_ERROR, bucket
from domain.incident import Severity, Trigger
from domain.scopes import scope_name

RULES = {rule.name: rule for rule in DEFAULT_RULES}
ERROR_RATE = RULES["error_rate"]


def run(rule: Rule, observations: list[tuple[float | None, float]]) -> list[Event]:
    state = RuleState()
    events = []
    for value, samples in observations:
        state, event = step(rule, state, value, samples)
        events.append(event)
    return events


def test_fires_after_two_consecutive_breaches_and_keeps_firing() -> None:
    assert run(ERROR_RATE, [(0.5, 50)] * 3) == [Event.PENDING, Event.FIRING, Event.FIRING]


def test_thresholds_are_strict_and_pick_the_level() -> None:
    assert ERROR_RATE.level(0.02) is None
    assert ERROR_RATE.level(0.021) == Level.WARNING
    assert ERROR_RATE.level(0.05) == Level.WARNING
    assert ERROR_RATE.level(0.051) == Level.CRITICAL
    assert ERROR_RATE.severity(Level.CRITICAL) == Severity.SEV2
    assert RULES["api_outage"].severity(Level.CRITICAL) == Severity.SEV1


def test_minimum_samples() -> None:
    assert run(ERROR_RATE, [(1.0, 19)] * 3) == [Event.INSUFFICIENT_DATA] * 3
    assert run(ERROR_RATE, [(1.0, 20)] * 2)[-1] == Event.FIRING


def test_a_flapping_signal_never_fires() -> None:
    assert Event.FIRING not in run(ERROR_RATE, [(0.5, 50), (0.0, 50)] * 10)


def test_recovery_needs_consecutive_good_evaluations_past_the_hysteresis_line() -> None:
    firing = [(0.10, 100)] * 2
    # 1.8 % is under the 2 % threshold but inside the band (clear below 1.6 %): still firing.
    band = [(0.018, 100)] * 5
    assert run(ERROR_RATE, firing + band)[-1] == Event.FIRING
    good = [(0.01, 100)] * 3
    assert run(ERROR_RATE, firing + good)[-3:] == [
        Event.RECOVERING,
        Event.RECOVERING,
        Event.RECOVERED,
    ]
    # A breach while recovering starts the recovery count over.
    assert run(ERROR_RATE, firing + good[:2] + [(0.1, 100)] + good[:2])[-1] == Event.RECOVERING


def test_quiet_traffic_neither_fires_nor_recovers() -> None:
    state = RuleState(breaches=5, firing=True, level=Level.CRITICAL)
    same, event = step(ERROR_RATE, state, None, 0)
    assert (same, event) == (state, Event.INSUFFICIENT_DATA)
    pending = RuleState(breaches=1, level=Level.WARNING)
    assert step(ERROR_RATE, pending, 0.5, 3)[0].breaches == 0


def test_below_rules_fire_on_low_values() -> None:
    quality = RULES["quality"]
    assert quality.level(0.45) == Level.CRITICAL
    assert quality.level(0.6) == Level.WARNING
    assert quality.level(0.75) is None
    assert quality.clear_line() == pytest.approx(0.77)
    assert run(quality, [(0.4, 30)] * 2)[-1] == Event.FIRING


# --- signals ------------------------------------------------------------------------------------


def aggregate(**sums: object) -> Aggregate:
    return Aggregate(**sums)  # type: ignore[arg-type]


def window(cells: dict[str, dict[str, Aggregate]], cost_today: float = 0.0) -> WindowAggregates:
    return WindowAggregates(
        end=datetime(2026, 11, 26, 12, tzinfo=UTC),
        window_seconds=300,
        cells=cells,
        cost_today_usd=cost_today,
    )


def histogram(latencies_ms: list[float]) -> dict[int, int]:
    found: dict[int, int] = {}
    for value in latencies_ms:
        found[bucket(value)] = found.get(bucket(value), 0) + 1
    return found


def test_signal_values() -> None:
    a = aggregate(
        calls=200, errors=6, timeouts=2, server_errors=2, rate_limited=10,
        input_tokens=30_000, output_tokens=20_000, cost_usd=5.0,
        latency_histogram=histogram([1000.0] * 100 + [9000.0] * 100),
        quality_count=10, quality_sum=6.0,
    )  # fmt: skip
    found = values(
        a, 300, scope="model:gpt-4.1", daily_budget_usd=240, cost_today_usd=100, tpm_quota=20_000
    )
    assert found["error_rate"] == pytest.approx(10 / 200)  # 429s are not counted as errors
    assert found["rate_limit_rate"] == pytest.approx(0.05)
    assert found["server_error_rate"] == pytest.approx(0.01)
    assert found["tokens_per_minute"] == pytest.approx(10_000)
    assert found["tpm_quota_ratio"] == pytest.approx(0.5)
    assert found["cost_usd_per_hour"] == pytest.approx(60.0)
    assert found["cost_rate_ratio"] == pytest.approx(6.0)  # $60/h against $10/h
    assert found["budget_consumed_ratio"] is None  # the budget is global
    assert found["quality_mean"] == pytest.approx(0.6)
    assert found["latency_p50_ms"] == pytest.approx(1000, rel=RELATIVE_ERROR)
    assert found["latency_p95_ms"] == pytest.approx(9000, rel=RELATIVE_ERROR)


def test_quality_drift_is_in_baseline_deviations() -> None:
    baseline = [0.8, 0.9] * 20  # mean 0.85, sd ~0.0506
    a = aggregate(
        quality_count=20, quality_sum=20 * 0.7,
        baseline_count=40, baseline_sum=sum(baseline), baseline_sumsq=sum(x * x for x in baseline),
    )  # fmt: skip
    found = values(a, 300, scope="global", daily_budget_usd=1, cost_today_usd=0, tpm_quota=None)
    assert found["quality_drift_z"] == pytest.approx(-2.96, abs=0.01)
    thin = replace(a, baseline_count=29)
    too_thin = values(
        thin, 300, scope="global", daily_budget_usd=1, cost_today_usd=0, tpm_quota=None
    )
    assert too_thin["quality_drift_z"] is None


def test_scope_names_are_always_safe() -> None:
    assert scope_name("model", "gpt-4.1") == "model:gpt-4.1"
    assert scope_name("feature", "x' OR 1=1") == "feature:x__OR_1_1"


# --- evaluations --------------------------------------------------------------------------------


def evaluate_twice(
    cells: dict[str, dict[str, Aggregate]], rules: DetectorRules | None = None
) -> Evaluation:
    rules = rules or DetectorRules()
    first = evaluate(rules, window(cells), {}, daily_budget_usd=500)
    return evaluate(rules, window(cells), first.rule_states, daily_budget_usd=500)


def test_a_breach_on_one_model_opens_that_scope_and_not_global() -> None:
    cells = {
        "gpt-4.1": {"chat": aggregate(calls=400, errors=200)},
        "gpt-4.1-mini": {"chat": aggregate(calls=400, successes=400)},
    }
    found = evaluate_twice(cells)
    firing = {(f.trigger, f.scope) for f in found.firing}
    assert (Trigger.ERROR_RATE, "model:gpt-4.1") in firing
    assert (Trigger.ERROR_RATE, "global") not in firing  # explained by gpt-4.1 alone
    assert "error_rate|global" in found.inhibited
    assert (Trigger.ERROR_RATE, "model:gpt-4.1-mini") not in firing
    finding = next(f for f in found.firing if f.scope == "model:gpt-4.1")
    assert finding.severity == Severity.SEV2
    assert "error rate 50.0% > 5.0%" in finding.summary
    assert finding.metrics["error_rate"] == pytest.approx(0.5)


def test_a_problem_of_everyone_is_one_global_incident() -> None:
    cells = {
        "gpt-4.1": {"": aggregate(calls=400, errors=200)},
        "o3": {"": aggregate(calls=400, errors=100)},
        "o4-mini": {"": aggregate(calls=400, errors=60)},
    }
    found = evaluate_twice(cells, DetectorRules(scopes=("global", "model")))
    assert {f.scope for f in found.firing if f.trigger == Trigger.ERROR_RATE} == {"global"}
    assert "error_rate|model:o3" in found.inhibited


def test_an_outage_hides_the_error_rate_of_its_scope() -> None:
    found = evaluate_twice({"gpt-4.1": {"": aggregate(calls=100, server_errors=80)}})
    triggers = {(f.trigger, f.scope) for f in found.firing}
    assert (Trigger.API_OUTAGE, "global") in triggers
    assert (Trigger.ERROR_RATE, "global") not in triggers
    outage = next(f for f in found.firing if f.trigger == Trigger.API_OUTAGE)
    assert outage.severity == Severity.SEV1


def test_the_worst_rule_of_a_trigger_sets_its_severity() -> None:
    slow = histogram([3000.0] * 60 + [20_000.0] * 40)  # p50 3 s (warning), p95 20 s (critical)
    found = evaluate_twice({"gpt-4.1": {"": aggregate(calls=100, latency_histogram=slow)}})
    [finding] = [f for f in found.firing if f.scope == "global"]
    assert finding.trigger == Trigger.ELEVATED_LATENCY
    assert finding.severity == Severity.SEV2
    assert sorted(finding.rules) == ["latency_p50", "latency_p95"]


def test_cost_budget_and_quota_rules() -> None:
    rules = DetectorRules(tpm_quota={"gpt-4.1": 10_000})
    cells = {
        "gpt-4.1": {
            "": aggregate(calls=10, input_tokens=45_000, output_tokens=5_000, cost_usd=10.0)
        }
    }
    found = evaluate(rules, window(cells, cost_today=490.0), {}, daily_budget_usd=500)
    found = evaluate(
        rules, window(cells, cost_today=490.0), found.rule_states, daily_budget_usd=500
    )
    triggers = {(f.trigger, f.scope, f.severity) for f in found.firing}
    assert (Trigger.TOKEN_QUOTA, "model:gpt-4.1", Severity.SEV2) in triggers  # 10k/min = 100 %
    assert (Trigger.BUDGET_EXHAUSTION, "global", Severity.SEV2) in triggers  # 98 % used
    # $120/h against $20.8/h fires too, but a budget running out is the problem it is part of
    assert "cost_spike|global" in found.inhibited
    assert Trigger.COST_SPIKE not in {trigger for trigger, _, _ in triggers}
    assert found.rule_states["cost_rate|global"].firing


def test_a_recovery_is_reported_once_every_rule_of_the_trigger_is_back() -> None:
    bad = {"gpt-4.1": {"": aggregate(calls=100, errors=50)}}
    good = {"gpt-4.1": {"": aggregate(calls=100, successes=100)}}
    states: dict[str, RuleState] = {}
    recovered = []
    for cells in [bad, bad, good, good, good]:
        found = evaluate(DetectorRules(), window(cells), states, daily_budget_usd=500)
        states = found.rule_states
        recovered.append(found.recovered)
    assert recovered[:4] == [[], [], [], []]
    assert (Trigger.ERROR_RATE, "global") in recovered[4]
    assert states == {}


# --- the rules file -----------------------------------------------------------------------------


def test_rules_file_overrides(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        """
scopes = ["global", "model"]
for_evaluations = 3

[tpm_quota]
"gpt-4.1" = 2000000

[rules.error_rate]
warning = 0.03
critical = 0.08
critical_severity = "SEV1"

[rules.quality_drift]
enabled = false
"""
    )
    rules = load_rules(path)
    by_name = {rule.name: rule for rule in rules.rules}
    assert rules.scopes == ("global", "model")
    assert rules.quota_for("model:gpt-4.1") == 2_000_000
    assert (by_name["error_rate"].warning, by_name["error_rate"].critical) == (0.03, 0.08)
    assert by_name["error_rate"].critical_severity == Severity.SEV1
    assert by_name["latency_p95"].for_evaluations == 3
    assert not by_name["quality_drift"].enabled


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("[rules.nope]\nwarning = 1", "unknown rules ['nope']"),
        ("[rules.error_rate]\nwarning = 'high'", "rules.error_rate.warning"),
        ("scopes = ['galaxy']", "scopes.0"),
        ("[rules.api_outage]\ncritical = ", "PAGERLOOP_RULES_FILE"),
    ],
)
def test_a_bad_rules_file_says_what_is_wrong(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(content)
    with pytest.raises(RulesFileError) as error:
        load_rules(path)
    assert complaint in str(error.value)


def test_scopes_that_go_quiet_leave_no_state_behind() -> None:
    """A hostile client can make thousands of scopes pending for one evaluation each; what the
    detector carries from one evaluation (and run) to the next must not grow with them."""
    rules = DetectorRules()
    states: dict[str, RuleState] = {}
    for n in range(20):
        failing = Aggregate(calls=50, errors=50)
        seen = window({"gpt-4.1": {f"feature-{n}": failing}})
        states = evaluate(rules, seen, states, daily_budget_usd=500).rule_states
        assert {key.partition("|")[2] for key in states} <= {
            "global", "model:gpt-4.1", f"feature:feature-{n}", f"feature:feature-{n - 1}"
        }  # fmt: skip
    assert not any(key.endswith("feature-0") for key in states)


def test_errors_wait_while_the_outage_they_are_part_of_is_pending() -> None:
    """Errors confirmed an evaluation before the outage's 5xx share crossed its line: the
    error rate is held while the outage rule is pending, then hidden once it fires."""
    errors = {"gpt-4.1": {"": aggregate(calls=100, errors=40)}}
    outage = {"gpt-4.1": {"": aggregate(calls=100, server_errors=80)}}
    rules = DetectorRules()
    first = evaluate(rules, window(errors), {}, daily_budget_usd=500)
    second = evaluate(rules, window(outage), first.rule_states, daily_budget_usd=500)
    assert second.verdicts["api_outage|global"] == "pending"
    assert second.rule_states["error_rate|global"].firing
    assert "error_rate|global" in second.inhibited
    assert second.firing == []
    third = evaluate(rules, window(outage), second.rule_states, daily_budget_usd=500)
    assert [(f.trigger, f.scope) for f in third.firing] == [(Trigger.API_OUTAGE, "global")]
    # A run begun before relations (legacy, no hold) pages the errors at once.
    legacy = evaluate(
        rules, window(outage), first.rule_states, 500, LEGACY_RELATIONS, hold_for_pending=False
    )
    assert [(f.trigger, f.scope) for f in legacy.firing] == [(Trigger.ERROR_RATE, "global")]


# --- per-rule windows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "seconds"),
    [
        ("error_rate", 120), ("rate_limit", 120), ("tpm_runway", 120),
        ("latency_p50", 300), ("latency_p95", 300),
        ("budget", 600), ("budget_runway", 600), ("quality", 600), ("quality_drift", 600),
        ("api_outage", None), ("token_quota", None), ("cost_rate", None),
    ],
)  # fmt: skip
def test_each_rule_reads_the_seeds_window_or_the_detectors(rule: str, seconds: int | None) -> None:
    assert RULES[rule].window_seconds == seconds
    assert rule_window(RULES[rule], 900) == (seconds or 900)


def test_the_windows_read_and_those_with_histograms() -> None:
    assert windows_read(DetectorRules(), 300) == [120, 300, 600]
    assert windows_read(DetectorRules(), 900) == [120, 300, 600, 900]
    assert latency_windows(DetectorRules(), 300) == [300]
    no_latency = DetectorRules(
        rules=tuple(replace(r, enabled=not r.name.startswith("latency")) for r in DEFAULT_RULES)
    )
    assert latency_windows(no_latency, 300) == []


END = datetime(2026, 11, 26, 12, 0, 30, tzinfo=UTC)


def windows(by_window: dict[int, dict[str, Aggregate]], **extra: Any) -> WindowAggregates:
    """A result as the store gives it: the widest window's sums, and the narrower ones'."""
    widest = max(by_window)
    return WindowAggregates.of_scopes(
        END,
        widest + 30,
        by_window[widest],
        windows={
            seconds: WindowSums.of_scopes(seconds + 30, scopes)
            for seconds, scopes in by_window.items()
            if seconds != widest
        },
        **extra,
    )


def per_rule(
    aggregates: WindowAggregates,
    states: dict[str, RuleState] | None = None,
    rules: DetectorRules | None = None,
    times: int = 2,
) -> Evaluation:
    states = dict(states or {})
    for _ in range(times):
        found = evaluate(
            rules or DetectorRules(), aggregates, states, daily_budget_usd=500, window_seconds=300
        )
        states = found.rule_states
    return found


def test_errors_of_the_last_two_minutes_fire_although_five_minutes_dilute_them() -> None:
    recent = Aggregate(calls=100, successes=93, errors=7)
    five = Aggregate(calls=1000, successes=993, errors=7)  # 0.7 %
    found = per_rule(windows({120: {"global": recent}, 300: {"global": five},
                              600: {"global": five}}))  # fmt: skip
    [finding] = found.firing
    assert (finding.trigger, finding.severity) == (Trigger.ERROR_RATE, Severity.SEV2)
    assert finding.summary == "error rate 7.0% > 5.0% over 2 min (100 calls)"
    assert finding.metrics == {"calls": 100.0, "error_rate": pytest.approx(0.07)}
    # The same numbers over the detector's window alone (a run begun before): nothing.
    legacy = evaluate(DetectorRules(), windows({300: {"global": five}}), {}, 500)
    assert legacy.firing == []
    assert legacy.verdicts["error_rate|global"] == "ok"


def test_slow_answers_are_judged_over_five_minutes_not_two() -> None:
    slow = histogram([20_000.0] * 30)
    fast = histogram([300.0] * 300)
    two = Aggregate(calls=30, successes=30, latency_histogram=slow)
    five = Aggregate(calls=330, successes=330, latency_histogram={**fast})  # p95 fast
    found = per_rule(windows({120: {"global": two}, 300: {"global": five}, 600: {"global": five}}))
    assert found.verdicts["latency_p95|global"] == "ok"
    assert found.firing == []


def test_a_scope_quiet_in_its_rules_window_stays_firing() -> None:
    failing = Aggregate(calls=50, errors=50)
    firing = per_rule(windows({120: {"global": failing}, 600: {"global": failing}}))
    assert firing.rule_states["error_rate|global"].firing
    # Two minutes without calls, some ten minutes ago: nothing to judge the error rate by.
    quiet = windows({120: {}, 600: {"global": failing}})
    later = per_rule(quiet, firing.rule_states, times=5)
    assert later.verdicts["error_rate|global"] == "insufficient_data"
    assert [f.trigger for f in later.firing] == [Trigger.ERROR_RATE]
    assert later.firing[0].summary == "still firing (no data this evaluation)"


def test_global_minus_a_model_is_judged_over_the_rules_window() -> None:
    bad = Aggregate(calls=100, errors=50)
    good = Aggregate(calls=100, successes=100)
    both = Aggregate()
    both.add(bad)
    both.add(good)
    recent = {"global": both, "model:o3": bad, "model:gpt-4.1": good}
    # Ten minutes ago gpt-4.1 failed too: over that window the rest is not healthy.
    old_bad = Aggregate(calls=1000, errors=900)
    older = {"global": old_bad, "model:o3": bad, "model:gpt-4.1": old_bad}
    found = per_rule(
        windows({120: recent, 600: older}), rules=DetectorRules(scopes=("global", "model"))
    )
    assert [(f.trigger, f.scope) for f in found.firing] == [(Trigger.ERROR_RATE, "model:o3")]
    assert "error_rate|global" in found.inhibited


# --- runways ----------------------------------------------------------------------------------


def at(hour: int, minute: int) -> datetime:
    return datetime(2026, 11, 26, hour, minute, tzinfo=UTC)


def spending(
    end: datetime, spent: float, burn_per_hour: float, calls: int = 50
) -> WindowAggregates:
    """Ten minutes at `burn_per_hour`, `spent` today so far."""
    ten = Aggregate(calls=calls, successes=calls, cost_usd=burn_per_hour / 6)
    return WindowAggregates.of_scopes(end, 600, {"global": ten}, cost_today_usd=spent)


@pytest.mark.parametrize(
    ("end", "spent", "burn", "severity", "summary"),
    [
        # 97 % spent at 23:10, $15 left at $30/h: out at 23:40, before the reset.
        pytest.param(at(23, 10), 485, 30, "SEV1",
                     "daily budget used 97.0% > 95.0%; daily budget runs out in 30 min "
                     "(at 23:40 UTC) < 1.0 h, at the burn of the last 10 min (50 calls)",
                     id="23:10-sev1"),
        # The same at 23:50: 10 min to the reset, today's $15 lasts 30: tomorrow's $500 lasts
        # 16.7 h after midnight.
        pytest.param(at(23, 50), 485, 30, None, None, id="23:50-the-reset-comes-first"),
        # Just after midnight the spend starts again from nothing.
        pytest.param(at(0, 5), 2.5, 30, None, None, id="00:05-reset"),
        # $100 spent by 14:00, $80/h: $400 lasts 5 h.
        pytest.param(at(14, 0), 100, 80, "SEV2",
                     "daily budget runs out in 5.0 h (at 19:00 UTC) < 6.0 h, at the burn of the "
                     "last 10 min (50 calls)", id="5h-sev2"),
        # At 20:00, $100/h would spend today's $450 in 4.5 h, past the reset (in 4 h): then
        # tomorrow's $500 lasts 5 h more, 9 h in all.
        pytest.param(at(20, 0), 50, 100, None, None, id="20:00-the-reset-comes-first"),
        pytest.param(at(22, 0), 50, 150, "SEV2",
                     "daily budget runs out in 5.3 h (at 03:20 UTC, after the midnight reset) "
                     "< 6.0 h", id="tomorrows-budget"),
        pytest.param(at(12, 0), 500, 0, "SEV1",
                     "daily budget used 100.0% > 95.0%; daily budget used up (50 calls)",
                     id="used-up"),
        pytest.param(at(12, 0), 400, 0, None, None, id="no-burn"),
    ],
)  # fmt: skip
def test_the_budget_runway_counts_the_daily_reset(
    end: datetime, spent: float, burn: float, severity: str | None, summary: str | None
) -> None:
    found = per_rule(spending(end, spent, burn))
    budget = [f for f in found.firing if f.trigger == Trigger.BUDGET_EXHAUSTION]
    runway_fires = found.rule_states.get("budget_runway|global", RuleState()).firing
    if severity is None:
        assert not runway_fires
        return
    assert runway_fires
    [finding] = budget
    assert finding.severity == severity
    assert summary is not None
    assert summary in finding.summary
    assert finding.metrics["cost_usd_per_hour"] == pytest.approx(burn)
    assert "budget_runway_hours" in finding.metrics


def test_a_runway_recovers_after_midnight_and_when_the_burn_stops() -> None:
    firing = per_rule(spending(at(23, 10), 485, 30))
    assert firing.firing[0].severity == Severity.SEV1
    # Just after midnight: spent starts again; three good evaluations recover the rule.
    states = firing.rule_states
    events = []
    for _ in range(3):
        found = evaluate(
            DetectorRules(), spending(at(0, 5), 2.5, 30), states, 500, window_seconds=300
        )
        states = found.rule_states
        events.append(found.verdicts["budget_runway|global"])
    assert events == ["recovering", "recovering", "recovered"]
    assert (Trigger.BUDGET_EXHAUSTION, "global") in found.recovered
    # The spend stops (no calls at all): the runway is out of sight, and that is data too.
    states = firing.rule_states
    for _ in range(3):
        quiet = spending(at(23, 12), 485, 0, calls=0)
        found = evaluate(DetectorRules(), quiet, states, 500, window_seconds=300)
        states = found.rule_states
    assert found.verdicts["budget_runway|global"] == "recovered"


def test_a_budget_runway_takes_in_the_cost_spike_it_comes_with() -> None:
    found = per_rule(spending(at(14, 0), 100, 300))  # $400 left at $300/h: 80 min
    assert {(f.trigger, f.severity) for f in found.firing} == {
        (Trigger.BUDGET_EXHAUSTION, Severity.SEV2)
    }
    assert "cost_spike|global" in found.inhibited


def tokens(per_minute: float, seconds: int, calls: int = 100) -> Aggregate:
    total = int(per_minute * (seconds + 30) / 60)  # the windows are read 30 s into a minute
    return Aggregate(calls=calls, successes=calls, input_tokens=total)


@pytest.mark.parametrize(
    ("recent", "earlier", "minutes", "severity"),
    [
        # 50k/min over ten minutes (centre 5.25 min ago), 80k over two (1.25 min ago): +7.5k a
        # minute, 20k to go: 2.7 min.
        pytest.param(80_000, 50_000, 2.7, "SEV2", id="critical"),
        # +2.5k a minute, 20k to go: 8 min.
        pytest.param(80_000, 70_000, 8.0, "SEV3", id="warning"),
        pytest.param(60_000, 70_000, None, None, id="falling"),
        pytest.param(60_000, 60_000, None, None, id="flat"),
    ],
)
def test_the_tokens_runway_follows_the_trend_to_the_quota(
    recent: float, earlier: float, minutes: float | None, severity: str | None
) -> None:
    rules = DetectorRules(tpm_quota={"gpt-4.1": 100_000})
    scopes = {
        120: {"global": tokens(recent, 120), "model:gpt-4.1": tokens(recent, 120)},
        300: {"global": tokens(recent, 300), "model:gpt-4.1": tokens(recent, 300)},
        600: {"global": tokens(earlier, 600), "model:gpt-4.1": tokens(earlier, 600)},
    }
    found = per_rule(windows(scopes), rules=rules)
    state = found.rule_states.get("tpm_runway|model:gpt-4.1", RuleState())
    assert "tpm_runway|global" not in found.verdicts or found.verdicts["tpm_runway|global"] in (
        "insufficient_data", "ok"
    )  # fmt: skip
    if severity is None:
        assert not state.firing
        return
    [finding] = [f for f in found.firing if f.trigger == Trigger.TOKEN_QUOTA]
    assert finding.severity == severity
    assert finding.metrics["tpm_runway_minutes"] == pytest.approx(minutes, abs=0.05)
    assert finding.summary.startswith("tokens/min reach the quota in ")
    assert ", at the trend of the last 2 min" in finding.summary


def test_no_quota_no_tokens_runway() -> None:
    scopes = {120: {"global": tokens(80_000, 120)}, 600: {"global": tokens(1_000, 600)}}
    found = per_rule(windows(scopes))
    assert found.verdicts["tpm_runway|global"] == "insufficient_data"


@pytest.mark.parametrize(
    ("rule", "value", "text"),
    [
        ("budget_runway", 0.0, "daily budget used up"),
        ("budget_runway", 48.0, "daily budget runs out: not in sight"),
        ("budget_runway", 2 / 3, "daily budget runs out in 40 min (at 12:40 UTC)"),
        ("budget_runway", 13.0,
         "daily budget runs out in 13.0 h (at 01:00 UTC, after the midnight reset)"),
        ("tpm_runway", 0.0, "tokens/min at the quota"),
        ("tpm_runway", 4.0, "tokens/min reach the quota in 4 min (at 12:04 UTC)"),
        ("error_rate", 0.07, "error rate 7.0%"),
    ],
)  # fmt: skip
def test_readings_for_people(rule: str, value: float, text: str) -> None:
    assert reading(RULES[rule], value, at(12, 0)) == text


# --- the rules file: windows and runways --------------------------------------------------------


def test_the_rules_file_sets_windows_and_runway_lines(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        """
[rules.error_rate]
window_seconds = 300

[rules.cost_rate]
window_seconds = 900

[rules.quality]
window_seconds = 0

[rules.budget_runway]
warning = 12
critical_severity = "SEV2"
"""
    )
    by_name = {rule.name: rule for rule in load_rules(path).rules}
    assert by_name["error_rate"].window_seconds == 300
    assert by_name["cost_rate"].window_seconds == 900
    assert by_name["quality"].window_seconds is None  # 0: the detector's
    assert (by_name["budget_runway"].warning, by_name["budget_runway"].critical) == (12, 1.0)
    assert by_name["budget_runway"].critical_severity == Severity.SEV2


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (
            "[rules.error_rate]\nwindow_seconds = 30",
            "rules.error_rate.window_seconds: Value error, 30 s is not a window: 0 (the "
            "detector's window) or whole minutes, a multiple of 60 from 60 to 3600",
        ),
        # The rollups count whole minutes: 90 s would read 2 or 3 of them, shown as "90 s".
        ("[rules.latency_p95]\nwindow_seconds = 90", "rules.latency_p95.window_seconds: "),
        ("[rules.quality]\nwindow_seconds = 3599", "a multiple of 60 from 60 to 3600"),
        ("[rules.error_rate]\nwindow_seconds = -60", "rules.error_rate.window_seconds"),
        ("[rules.error_rate]\nwindow_seconds = 7200", "rules.error_rate.window_seconds"),
        (
            "[rules.cost_rate]\nwindow_seconds = 900\n[rules.api_outage]\nwindow_seconds = 60",
            "at most 4 distinct window_seconds",
        ),
    ],
)
def test_a_bad_window_is_refused(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(content)
    with pytest.raises(RulesFileError, match=re.escape(complaint)):
        load_rules(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[rules.error_rate]\nwindow_seconds = 60", {"error_rate": 60}),
        (
            "[rules.latency_p50]\nwindow_seconds = 180\n[rules.latency_p95]\nwindow_seconds = 180"
            "\n[rules.quality]\nwindow_seconds = 3600",
            {"latency_p50": 180, "latency_p95": 180, "quality": 3600},
        ),
    ],
)
def test_whole_minutes_up_to_an_hour_are_windows(
    tmp_path: Path, content: str, expected: dict[str, int]
) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(content)
    by_name = {rule.name: rule.window_seconds for rule in load_rules(path).rules}
    assert {name: by_name[name] for name in expected} == expected


# --- every signal of every scope, as the evaluation computes it ----------------------------------


def test_window_signals_are_what_the_evaluation_judges() -> None:
    """The shared code path (the exporter and the charts read it too): each window the rules
    read, the scopes with data in it, the tokens' trend from the widest window."""
    rules = DetectorRules(tpm_quota={"gpt-4.1": 100_000})
    recent = tokens(80_000, 120)
    scopes = {
        120: {"global": recent, "model:gpt-4.1": recent},
        300: {"global": tokens(70_000, 300), "model:gpt-4.1": tokens(70_000, 300)},
        # o3 called nine minutes ago only: a scope of the widest window alone.
        600: {"global": tokens(50_000, 600), "model:gpt-4.1": tokens(50_000, 600),
              "model:o3": Aggregate(calls=30, successes=30)},
    }  # fmt: skip
    result = windows(scopes)
    found = window_signals(rules, result, 500, 300)
    assert list(found) == [120, 300, 600]
    assert list(found[120]) == ["global", "model:gpt-4.1"]
    assert list(found[600]) == ["global", "model:gpt-4.1", "model:o3"]
    # The trend from the widest (centre 5.25 min ago) to two minutes (1.25 min ago).
    assert found[120]["model:gpt-4.1"]["tpm_runway_minutes"] == pytest.approx(2.7, abs=0.05)
    assert found[600]["model:gpt-4.1"]["tpm_runway_minutes"] is None  # no wider window
    assert found[120]["model:gpt-4.1"]["tokens_per_minute"] == pytest.approx(80_000)
    evaluation = per_rule(result, rules=rules)
    [quota] = [f for f in evaluation.firing if f.trigger == Trigger.TOKEN_QUOTA]
    assert quota.metrics["tpm_runway_minutes"] == found[120]["model:gpt-4.1"]["tpm_runway_minutes"]
    # `also`: the detector's window beside the rules' (here wider than theirs): the trend still
    # runs from the rules' widest.
    wider = windows({**scopes, 900: scopes[600]})
    also = window_signals(rules, wider, 500, 300, also=[900])
    assert list(also) == [120, 300, 600, 900]
    assert also[120] == found[120]


def test_window_signals_refuse_a_result_without_the_windows() -> None:
    """A result with the widest window alone (an old worker's) is not read as the narrower."""
    alone = WindowAggregates.of_scopes(END, 630, {"global": Aggregate(calls=50, successes=50)})
    assert alone.lacks([120, 300]) == [120, 300]
    with pytest.raises(ValueError, match=re.escape("lacks the narrower windows [120, 300]")):
        window_signals(DetectorRules(), alone, 500, 300)
    # Every rule on the detector's window: one window, nothing lacking.
    one = DetectorRules(rules=tuple(replace(r, window_seconds=None) for r in DEFAULT_RULES))
    assert list(window_signals(one, alone, 500, 300)) == [300]
