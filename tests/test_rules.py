"""The rules and one evaluation of them, without Temporal or a store."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from detectors.config import DetectorRules, RulesFileError, load_rules
from detectors.correlation import LEGACY_RELATIONS
from detectors.evaluation import Evaluation, evaluate
from detectors.rules import DEFAULT_RULES, Event, Level, Rule, RuleState, step
from detectors.signals import values
from domain.aggregates import Aggregate, WindowAggregates
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
