"""domain.canary (pure): the canary-versus-rest tests against values computed independently
(hand-worked examples, the 2x2 chi-square, brute force over all pairs, exact permutation
tests, closed forms of Student's t), their edge cases, and the decision rule."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.canary import (
    MANN_WHITNEY,
    TWO_PROPORTION,
    WELCH,
    Comparison,
    Finding,
    Measure,
    Verdict,
    decide,
    mean_difference,
    primary_measure,
    rank_test,
    rank_test_histograms,
    student_t_sf,
    two_proportion,
)
from domain.histogram import bucket, representative
from domain.incident import Trigger

# -- two proportions ---------------------------------------------------------------------------


def test_two_proportion_hand_worked_example() -> None:
    # 10/100 against 20/100: pooled 0.15, se = sqrt(0.15 * 0.85 * (1/100 + 1/100)).
    c = two_proportion(10, 100, 20, 100)
    assert c.canary == 0.1
    assert c.rest == 0.2
    assert c.difference == pytest.approx(-0.1)
    assert c.statistic == pytest.approx(-0.1 / math.sqrt(0.15 * 0.85 * 0.02))
    assert c.statistic == pytest.approx(-1.98030, abs=1e-5)
    # z^2 is the 2x2 table's chi-square without Yates: N (ad - bc)^2 / (row and column sums).
    chi2 = 200 * (10 * 80 - 90 * 20) ** 2 / (100 * 100 * 30 * 170)
    assert c.statistic**2 == pytest.approx(chi2)
    # Normal table: P(Z < -1.98) = 0.0239.
    assert c.p_better == pytest.approx(0.02384, abs=1e-5)
    assert c.p_better + c.p_worse == pytest.approx(1)
    assert c.finding() is Finding.BETTER
    assert c.finding(alpha=0.01) is Finding.NOT_SIGNIFICANT
    assert c.test == TWO_PROPORTION


def test_two_proportion_zero_events_in_the_canary_is_evidence() -> None:
    c = two_proportion(0, 400, 40, 400)
    assert c.canary == 0.0
    assert c.too_few is None
    assert c.p_better < 1e-9
    assert c.finding() is Finding.BETTER


def test_two_proportion_no_events_anywhere_refuses() -> None:
    c = two_proportion(0, 1_000, 0, 10_000)
    assert c.finding() is Finding.TOO_FEW_SAMPLES
    assert c.p_better == c.p_worse == 1.0
    assert "expected events" in (c.too_few or "")


def test_two_proportion_identical_groups() -> None:
    c = two_proportion(20, 400, 40, 800)
    assert c.statistic == 0
    assert c.p_better == pytest.approx(0.5)
    assert c.p_worse == pytest.approx(0.5)
    assert c.finding() is Finding.NOT_SIGNIFICANT


def test_two_proportion_minimum_sample() -> None:
    assert two_proportion(10, 29, 500, 1000).finding() is Finding.TOO_FEW_SAMPLES
    assert two_proportion(10, 30, 500, 1000).too_few is None
    assert two_proportion(10, 29, 500, 1000, min_n=20).too_few is None
    # 30 calls at a 10 % pooled rate: 3 expected events in the canary, under the 5 needed.
    refused = two_proportion(3, 30, 100, 1000)
    assert refused.finding() is Finding.TOO_FEW_SAMPLES
    assert two_proportion(3, 30, 100, 1000, min_expected=2).too_few is None
    assert "canary 29 calls" in (two_proportion(1, 29, 1, 29).too_few or "")
    empty = two_proportion(0, 0, 5, 100, min_n=0)
    assert empty.canary is None
    assert empty.finding() is Finding.TOO_FEW_SAMPLES
    with pytest.raises(ValueError, match="events must be between"):
        two_proportion(5, 4, 1, 10)


# -- ranks -------------------------------------------------------------------------------------


def brute_u(canary: list[float], rest: list[float]) -> float:
    return sum((c > r) + 0.5 * (c == r) for c in canary for r in rest)


def permutation_p_lower(canary: list[float], rest: list[float]) -> float:
    """Exact one-sided p of the canary being lower: the share of all relabellings of the
    pooled data whose canary U is at most the observed one."""
    pooled = canary + rest
    observed = brute_u(canary, rest)
    count = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(canary)):
        picked = set(chosen)
        c = [pooled[i] for i in chosen]
        r = [v for i, v in enumerate(pooled) if i not in picked]
        total += 1
        count += brute_u(c, r) <= observed + 1e-9
    return count / total


SMALL_CASES = [
    # distinct values, a clear shift
    ([112.0, 130, 95, 101, 120, 99, 108], [125.0, 140, 131, 118, 150, 122, 128, 135]),
    # ties within and across the groups, a weak shift
    ([100.0, 100, 110, 120, 120, 130, 140], [100.0, 110, 120, 130, 130, 140, 150, 150]),
    # the canary slower
    ([300.0, 280, 310, 250, 260, 290, 270], [240.0, 250, 255, 260, 230, 300, 245, 235]),
]


@pytest.mark.parametrize(("canary", "rest"), SMALL_CASES)
def test_rank_test_u_and_p_against_brute_force(canary: list[float], rest: list[float]) -> None:
    c = rank_test(canary, rest, min_n=0)
    assert c.u == brute_u(canary, rest)
    pairs = len(canary) * len(rest)
    faster = sum((x < y) + 0.5 * (x == y) for x in canary for y in rest) / pairs
    assert c.effect == pytest.approx(faster)
    # The normal approximation with continuity correction against the exact permutation test.
    assert c.p_better == pytest.approx(permutation_p_lower(canary, rest), abs=0.02)
    assert c.p_worse == pytest.approx(permutation_p_lower(rest, canary), abs=0.02)
    assert c.test == MANN_WHITNEY


def test_rank_test_reference_value() -> None:
    # Hand-worked: canary 1..5 against rest 6..10, n = 5 each, no ties: U = 0, mean 12.5,
    # variance 5*5*11/12; z = (0 - 12.5 + 0.5) / sqrt(22.9167) = -2.5067.
    c = rank_test([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], min_n=0)
    assert c.u == 0
    assert c.effect == 1.0
    assert c.p_better == pytest.approx(0.5 * math.erfc(2.5067 / math.sqrt(2)), abs=1e-4)
    assert c.p_better == pytest.approx(0.00609, abs=1e-4)
    # Exact: 1 arrangement in C(10, 5) = 252.
    assert permutation_p_lower([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(1 / 252)


def test_rank_test_identical_groups() -> None:
    values = [float(v) for v in range(50, 150)]
    c = rank_test(values, list(values))
    assert c.u == len(values) ** 2 / 2
    assert c.p_better == pytest.approx(0.5, abs=0.01)
    assert c.p_worse == pytest.approx(0.5, abs=0.01)
    assert c.effect == 0.5
    assert c.finding() is Finding.NOT_SIGNIFICANT


def test_rank_test_all_ties() -> None:
    c = rank_test([200.0] * 40, [200.0] * 300)
    assert c.p_better == c.p_worse == 1.0
    assert c.effect == 0.5
    assert c.finding() is Finding.NOT_SIGNIFICANT


def test_rank_test_minimum_sample_and_quantiles() -> None:
    refused = rank_test([100.0] * 29, [200.0] * 100)
    assert refused.finding() is Finding.TOO_FEW_SAMPLES
    assert refused.canary == 100.0
    c = rank_test([float(v) for v in range(1, 101)], [float(v) for v in range(51, 151)])
    assert (c.canary, c.canary_p95) == (50.0, 95.0)  # nearest rank
    assert (c.rest, c.rest_p95) == (100.0, 145.0)
    assert c.finding() is Finding.BETTER
    assert rank_test([], [1.0], min_n=0).canary is None


def test_histogram_variant_equals_raw_values() -> None:
    rng = random.Random(15)
    canary = [rng.lognormvariate(6.0, 0.5) for _ in range(300)]
    rest = [rng.lognormvariate(6.2, 0.5) for _ in range(2_000)]
    hist_c: dict[int, int] = {}
    hist_r: dict[int, int] = {}
    for v in canary:
        hist_c[bucket(v)] = hist_c.get(bucket(v), 0) + 1
    for v in rest:
        hist_r[bucket(v)] = hist_r.get(bucket(v), 0) + 1
    from_hist = rank_test_histograms(hist_c, hist_r)
    from_values = rank_test(
        [representative(bucket(v)) for v in canary], [representative(bucket(v)) for v in rest]
    )
    assert from_hist == from_values
    assert from_hist.finding() is Finding.BETTER
    # Bucketing turns near values into ties, which moves U little.
    raw = rank_test(canary, rest)
    assert from_hist.u == pytest.approx(raw.u or 0, rel=0.01)
    assert from_hist.canary == pytest.approx(raw.canary or 0, rel=0.025)


def test_histogram_variant_ignores_empty_buckets() -> None:
    a = rank_test_histograms({10: 40, 11: 0}, {12: 50}, min_n=0)
    b = rank_test_histograms({10: 40}, {12: 50, 3: 0}, min_n=0)
    assert a == b


# -- means -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "df", "expected"),
    [
        # df = 1 is Cauchy: P(T > t) = 1/2 - atan(t)/pi.
        (1.0, 1, 0.25),
        (2.0, 1, 0.5 - math.atan(2.0) / math.pi),
        # df = 2: P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)).
        (2.0, 2, 0.5 - 2.0 / (2 * math.sqrt(6.0))),
        (-0.7, 2, 0.5 + 0.7 / (2 * math.sqrt(2.49))),
        # Printed t-table critical values.
        (1.812461, 10, 0.05),
        (2.228139, 10, 0.025),
        (2.085963, 20, 0.025),
        (1.697261, 30, 0.05),
        (0.0, 7.3, 0.5),
    ],
)
def test_student_t_tail(t: float, df: float, expected: float) -> None:
    assert student_t_sf(t, df) == pytest.approx(expected, abs=1e-6)


def test_student_t_tends_to_the_normal() -> None:
    for z in (0.5, 1.96, 3.0):
        assert student_t_sf(z, 1e6) == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=1e-4)


def test_welch_from_sums_against_raw_scores() -> None:
    rng = random.Random(7)
    canary = [min(1.0, max(0.0, rng.gauss(0.80, 0.10))) for _ in range(40)]
    rest = [min(1.0, max(0.0, rng.gauss(0.74, 0.20))) for _ in range(300)]
    c = mean_difference(
        sum(canary), sum(v * v for v in canary), 40, sum(rest), sum(v * v for v in rest), 300
    )
    v_c = statistics.variance(canary) / 40
    v_r = statistics.variance(rest) / 300
    t = (statistics.fmean(canary) - statistics.fmean(rest)) / math.sqrt(v_c + v_r)
    df = (v_c + v_r) ** 2 / (v_c**2 / 39 + v_r**2 / 299)
    assert c.canary == pytest.approx(statistics.fmean(canary))
    assert c.statistic == pytest.approx(t)
    assert c.df == pytest.approx(df)
    assert c.p_better == pytest.approx(student_t_sf(t, df))
    assert c.p_better + c.p_worse == pytest.approx(1)
    assert c.finding() is Finding.BETTER
    assert c.test == WELCH


def test_welch_hand_worked_example() -> None:
    # Canary: 30 scores, mean 0.8, sample variance 0.04 (sum of squares 30*0.64 + 29*0.04);
    # rest: 60 scores, mean 0.7, sample variance 0.09. se^2 = 0.04/30 + 0.09/60 = 0.0028333,
    # t = 0.1 / 0.053229 = 1.87867, df = 0.0028333^2 / ((0.04/30)^2/29 + (0.0015)^2/59) = 80.73.
    c = mean_difference(24.0, 30 * 0.64 + 29 * 0.04, 30, 42.0, 60 * 0.49 + 59 * 0.09, 60)
    assert c.statistic == pytest.approx(1.87867, abs=1e-4)
    assert c.df == pytest.approx(80.73, abs=0.01)
    # Between the t-table's one-sided 0.05 (1.665) and 0.025 (1.992) for df about 80.
    assert 0.025 < c.p_better < 0.05
    assert c.p_better == pytest.approx(0.0320, abs=5e-4)


def test_welch_edge_cases() -> None:
    same = mean_difference(24.0, 30 * 0.64 + 29 * 0.04, 30, 24.0, 30 * 0.64 + 29 * 0.04, 30)
    assert same.p_better == pytest.approx(0.5)
    assert same.finding() is Finding.NOT_SIGNIFICANT
    flat = mean_difference(30 * 0.9, 30 * 0.81, 30, 30 * 0.5, 30 * 0.25, 30)
    assert (flat.p_better, flat.p_worse) == (0.0, 1.0)
    assert mean_difference(0.8 * 29, 0.65 * 29, 29, 80, 70, 100).finding() is (
        Finding.TOO_FEW_SAMPLES
    )
    assert mean_difference(0, 0, 0, 80, 70, 100, min_n=0).canary is None


# -- properties --------------------------------------------------------------------------------

counts = st.integers(min_value=30, max_value=5_000)


@settings(max_examples=60, deadline=None)
@given(counts, counts, st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_swapping_groups_mirrors_two_proportion(n1: int, n2: int, r1: float, r2: float) -> None:
    x1, x2 = round(n1 * r1), round(n2 * r2)
    ab = two_proportion(x1, n1, x2, n2, min_n=0, min_expected=0)
    ba = two_proportion(x2, n2, x1, n1, min_n=0, min_expected=0)
    assert ab.p_better == pytest.approx(ba.p_worse, abs=1e-12)
    assert ab.p_worse == pytest.approx(ba.p_better, abs=1e-12)


latencies = st.lists(st.integers(min_value=1, max_value=20).map(float), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(latencies, latencies)
def test_swapping_groups_mirrors_rank_test(a: list[float], b: list[float]) -> None:
    ab = rank_test(a, b, min_n=0)
    ba = rank_test(b, a, min_n=0)
    assert ab.u == brute_u(a, b)
    assert (ab.u or 0) + (ba.u or 0) == len(a) * len(b)
    assert ab.p_better == pytest.approx(ba.p_worse, abs=1e-12)
    assert ab.p_worse == pytest.approx(ba.p_better, abs=1e-12)
    assert 0 <= ab.p_better <= 1


scores = st.lists(st.floats(0, 1), min_size=2, max_size=50)


@settings(max_examples=60, deadline=None)
@given(scores, scores)
def test_swapping_groups_mirrors_welch(a: list[float], b: list[float]) -> None:
    def sums(v: list[float]) -> tuple[float, float, int]:
        return sum(v), sum(x * x for x in v), len(v)

    ab = mean_difference(*sums(a), *sums(b), min_n=0)
    ba = mean_difference(*sums(b), *sums(a), min_n=0)
    assert ab.p_better == pytest.approx(ba.p_worse, abs=1e-9)
    assert 0 <= ab.p_better <= 1


# -- the timeline ------------------------------------------------------------------------------


def test_describe_reads_like_the_issue() -> None:
    c = two_proportion(5, 412, 252, 3702)
    assert c.describe() == (
        "error rate 1.2% (canary, 412 calls) vs 6.8% (rest, 3,702): lower (better), p<0.0001"
        " (two-proportion z-test)"
    )
    refused = two_proportion(0, 12, 252, 3702, measure=Measure.RATE_LIMITED)
    assert refused.describe() == (
        "429 rate 0.0% (canary, 12 calls) vs 6.8% (rest, 3,702): too few samples"
        " (canary 12 calls; at least 30 needed)"
    )
    latency = rank_test([float(v) for v in range(1, 101)], [float(v) for v in range(51, 151)])
    assert latency.describe().startswith(
        "latency median 50 ms, p95 95 ms (canary, 100 calls) vs median 100 ms, p95 145 ms"
        " (rest, 100): lower (better), p<0.0001, canary faster in "
    )
    quality = mean_difference(24.0, 30 * 0.64 + 29 * 0.04, 30, 42.0, 60 * 0.49 + 59 * 0.09, 60)
    assert quality.describe() == (
        "quality score mean 0.800 (canary, 30 scores) vs mean 0.700 (rest, 60):"
        " higher (better), p=0.032 (Welch's t-test)"
    )
    assert quality.describe(alpha=0.01).endswith(
        "not significantly higher, p=0.032 (Welch's t-test)"
    )


# -- the decision ------------------------------------------------------------------------------


def comparison(measure: Measure, finding: Finding) -> Comparison:
    p_better, p_worse = {
        Finding.BETTER: (0.001, 0.999),
        Finding.WORSE: (0.999, 0.001),
        Finding.NOT_SIGNIFICANT: (0.2, 0.8),
        Finding.TOO_FEW_SAMPLES: (1.0, 1.0),
    }[finding]
    too_few = "canary 3 calls; at least 30 needed" if finding is Finding.TOO_FEW_SAMPLES else None
    return Comparison(measure, "test", 100, 1000, 0.1, 0.2, 0.0, p_better, p_worse, too_few)


B, W, N, F = Finding.BETTER, Finding.WORSE, Finding.NOT_SIGNIFICANT, Finding.TOO_FEW_SAMPLES
P, R, U = Verdict.PROMOTE, Verdict.REVERT, Verdict.INCONCLUSIVE  # U: undecided

# (primary's finding, the other measures' findings, window over, verdict)
DECISIONS = [
    (B, [], True, P),
    (B, [N, N], True, P),
    (B, [F], True, P),  # an unmeasured guard does not block
    (B, [W], True, R),  # better on the trigger, worse elsewhere
    (B, [N, W], True, R),
    (W, [], True, R),
    (W, [B], True, R),
    (N, [], True, R),  # the window ended inconclusive: revert
    (N, [B], True, R),  # better on a guard only does not promote
    (F, [], True, U),
    (F, [B], True, U),
    (F, [W], True, R),  # harm seen on a guard reverts whatever the primary
    (B, [], False, U),  # promotion waits for the window's end
    (N, [], False, U),
    (F, [], False, U),
    (W, [], False, R),  # harm does not wait
    (B, [W], False, R),
]


@pytest.mark.parametrize(("primary", "others", "window_over", "verdict"), DECISIONS)
def test_decision_rule(
    primary: Finding, others: list[Finding], window_over: bool, verdict: Verdict
) -> None:
    guards = [Measure.LATENCY, Measure.QUALITY, Measure.RATE_LIMITED]
    comparisons = [comparison(m, f) for m, f in zip(guards, others, strict=False)]
    comparisons.append(comparison(Measure.ERROR_RATE, primary))
    decision = decide(comparisons, primary=Measure.ERROR_RATE, window_over=window_over)
    assert decision.verdict is verdict
    assert decision.promote is (verdict is Verdict.PROMOTE)
    assert decision.reason.startswith(verdict.value)
    assert len(decision.lines) == len(comparisons)
    assert decision.lines[0].startswith("error rate")


def test_decision_on_real_comparisons_and_its_words() -> None:
    errors = two_proportion(5, 412, 252, 3702)
    latency = rank_test([float(v) for v in range(100, 200)], [float(v) for v in range(100, 200)])
    decision = decide([latency, errors], primary=Measure.ERROR_RATE)
    assert decision.verdict is Verdict.PROMOTE
    assert decision.reason == (
        "promote: the canary is better on the error rate (p<0.0001) and worse on nothing"
    )
    assert decision.lines == (errors.describe(), latency.describe())
    slower = rank_test([float(v) for v in range(300, 400)], [float(v) for v in range(100, 200)])
    worse = decide([errors, slower], primary=Measure.ERROR_RATE)
    assert worse.verdict is Verdict.REVERT
    assert worse.reason == "revert: the canary is worse on latency (p<0.0001)"


def test_decide_refuses_malformed_input() -> None:
    errors = comparison(Measure.ERROR_RATE, B)
    with pytest.raises(ValueError, match="primary measure"):
        decide([errors], primary=Measure.LATENCY)
    with pytest.raises(ValueError, match="one comparison per measure"):
        decide([errors, errors], primary=Measure.ERROR_RATE)
    with pytest.raises(ValueError, match="alpha"):
        decide([errors], alpha=0, primary=Measure.ERROR_RATE)


def test_primary_measure_by_trigger() -> None:
    assert primary_measure(Trigger.ERROR_RATE) is Measure.ERROR_RATE
    assert primary_measure(Trigger.API_OUTAGE) is Measure.ERROR_RATE
    assert primary_measure(Trigger.RATE_LIMIT_EXHAUSTION) is Measure.RATE_LIMITED
    assert primary_measure(Trigger.ELEVATED_LATENCY) is Measure.LATENCY
    assert primary_measure(Trigger.QUALITY_DEGRADATION) is Measure.QUALITY


def test_a_cheaper_canary_is_better_on_cost_and_a_dearer_one_worse() -> None:
    # 40 calls at $0.002 +- a little against 400 at $0.010 +- a little.
    cheap = [0.002 + 0.0001 * (i % 5) for i in range(40)]
    dear = [0.010 + 0.0001 * (i % 7) for i in range(400)]

    def sums(values: list[float]) -> tuple[float, float, int]:
        return sum(values), sum(v * v for v in values), len(values)

    better = mean_difference(*sums(cheap), *sums(dear), measure=Measure.COST)
    assert better.finding() is Finding.BETTER
    assert better.canary is not None
    assert better.canary < 0.003
    assert "cost per call $0.00220 a call (canary, 40 calls)" in better.describe()
    assert "lower (better)" in better.describe()
    worse = mean_difference(*sums(dear[:40]), *sums(cheap * 10), measure=Measure.COST)
    assert worse.finding() is Finding.WORSE
    flat = mean_difference(0.4, 0.004, 40, 4.0, 0.04, 400, measure=Measure.COST)
    assert flat.finding() is Finding.NOT_SIGNIFICANT


def test_cost_triggers_are_judged_on_cost_per_call() -> None:
    assert primary_measure(Trigger.COST_SPIKE) is Measure.COST
    assert primary_measure(Trigger.BUDGET_EXHAUSTION) is Measure.COST
    assert primary_measure(Trigger.TOKEN_QUOTA) is None
