from __future__ import annotations

from detectors.rules import ERROR_RATE_RULE, RuleState, Verdict, evaluate


def run(values: list[tuple[float, int]]) -> list[Verdict]:
    state = RuleState()
    verdicts = []
    for value, samples in values:
        state, verdict = evaluate(ERROR_RATE_RULE, state, value, samples)
        verdicts.append(verdict)
    return verdicts


def test_fires_after_two_consecutive_breaches() -> None:
    assert run([(0.5, 50), (0.5, 50), (0.5, 50)]) == [
        Verdict.PENDING,
        Verdict.FIRING,
        Verdict.FIRING,
    ]


def test_threshold_is_strictly_above_five_percent() -> None:
    assert run([(0.05, 100), (0.05, 100)]) == [Verdict.OK, Verdict.OK]
    assert run([(0.0501, 100), (0.0501, 100)])[-1] == Verdict.FIRING


def test_needs_twenty_calls() -> None:
    assert run([(1.0, 19), (1.0, 19), (1.0, 19)]) == [Verdict.INSUFFICIENT_DATA] * 3
    assert run([(1.0, 20), (1.0, 20)])[-1] == Verdict.FIRING


def test_a_flapping_signal_never_fires() -> None:
    flapping = [(0.5, 50), (0.0, 50)] * 10
    assert Verdict.FIRING not in run(flapping)


def test_too_few_samples_break_the_streak() -> None:
    assert run([(0.5, 50), (0.5, 5), (0.5, 50)]) == [
        Verdict.PENDING,
        Verdict.INSUFFICIENT_DATA,
        Verdict.PENDING,
    ]


def test_the_incident_on_record_is_kept_across_good_evaluations() -> None:
    state = RuleState(consecutive_breaches=3, incident_id="incident-x")
    state, verdict = evaluate(ERROR_RATE_RULE, state, 0.0, 50)
    assert verdict == Verdict.OK
    assert state == RuleState(consecutive_breaches=0, incident_id="incident-x")
