"""Canary statistics (pure): is the slice of traffic under a new control better than the rest?

A canary step applies a control to a fraction of the traffic, lets the verification window run,
then compares the canary slice with the rest on every measure it has numbers for:

- error rate and 429 rate: a pooled two-proportion z-test (`two_proportion`);
- latency: a Mann-Whitney U rank test, from raw latencies or from the stores' latency
  histograms (`rank_test`, `rank_test_histograms`);
- quality: Welch's t-test on the mean score, from sums (`mean_difference`);
- cost: the same test on the mean cost per call, lower being better (a cheaper model's canary).

Each test gives both one-sided p-values (canary better, canary worse), so that `decide` can ask
"significantly better on the measure the incident is about" and "significantly worse on
anything" of the same comparison. A test refuses to judge below a minimum sample: its normal
or t approximation would not hold, and a verdict on a handful of calls is noise.

The decision rule (`decide`), in this order:

1. REVERT when the canary is significantly worse (p_worse < alpha) on any measure with enough
   samples, the primary one included, even before the window is over: harm is not waited out.
2. INCONCLUSIVE when the primary measure has too few samples: there is nothing to judge.
3. PROMOTE when the canary is significantly better on the primary measure (p_better < alpha)
   and the window is over.
4. Otherwise REVERT once the window is over (the control was not shown to help), INCONCLUSIVE
   while it is still running.

At the end of the window anything but PROMOTE reverts the canary: INCONCLUSIVE only says why
(too little traffic to judge), a different finding from "no better". The other measures are
tested at the same alpha without a multiple-comparison correction: a correction would make a
harmful canary easier to promote; without it, extra measures only make reverting likelier,
which is the safe side. Promotion is judged only at the window's end, so looking at the numbers
during the window (to revert early) does not inflate the chance of a false promotion.

Normal tails use `math.erfc`, accurate far into the tails; the Student t tail uses the
regularized incomplete beta function. No dependency beyond the standard library.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from domain.histogram import exact_percentile, percentile
from domain.incident import Trigger

# Below these a test refuses: the normal approximation of a rate needs n*p and n*(1-p) of at
# least 5 in each group (the textbook rule), and 30 per group is where the normal
# approximations of U and of the mean are customarily trusted.
MIN_SAMPLES = 30
MIN_EXPECTED = 5.0
ALPHA = 0.05

TWO_PROPORTION = "two-proportion z-test"
MANN_WHITNEY = "Mann-Whitney U test"
WELCH = "Welch's t-test"


class Measure(StrEnum):
    ERROR_RATE = "error_rate"
    RATE_LIMITED = "rate_limited"  # the 429 rate
    LATENCY = "latency"
    QUALITY = "quality"
    COST = "cost"  # dollars per call


# The measures where a higher value is the better one.
HIGHER_IS_BETTER = frozenset({Measure.QUALITY})

_LABELS = {
    Measure.ERROR_RATE: "error rate",
    Measure.RATE_LIMITED: "429 rate",
    Measure.LATENCY: "latency",
    Measure.QUALITY: "quality score",
    Measure.COST: "cost per call",
}

# The measure a canary must improve to mitigate an incident of each trigger; the others are
# guards it must not make worse. Token quotas have none: their mitigations pace calls, which
# no slice of the traffic shows.
_PRIMARY = {
    Trigger.COST_SPIKE: Measure.COST,
    Trigger.BUDGET_EXHAUSTION: Measure.COST,
    Trigger.ERROR_RATE: Measure.ERROR_RATE,
    Trigger.API_OUTAGE: Measure.ERROR_RATE,
    Trigger.RATE_LIMIT_EXHAUSTION: Measure.RATE_LIMITED,
    Trigger.ELEVATED_LATENCY: Measure.LATENCY,
    Trigger.QUALITY_DEGRADATION: Measure.QUALITY,
}


def primary_measure(trigger: Trigger) -> Measure | None:
    return _PRIMARY.get(trigger)


class Finding(StrEnum):
    BETTER = "better"
    WORSE = "worse"
    NOT_SIGNIFICANT = "not significant"
    TOO_FEW_SAMPLES = "too few samples"


@dataclass(frozen=True)
class Comparison:
    """One measure, canary against rest. Values are rates (0..1), median latencies (ms) or mean
    scores; None for a group without data. p-values are one-sided; 1.0 when the test refused
    (`too_few` says why) or the data cannot show a difference (no variation at all)."""

    measure: Measure
    test: str
    canary_n: int
    rest_n: int
    canary: float | None
    rest: float | None
    statistic: float  # z (canary minus rest), or Welch's t towards the better side
    p_better: float
    p_worse: float
    too_few: str | None = None
    # Mann-Whitney: the chance that a canary call is faster than a rest call, ties counting
    # half (the common-language effect size), and the U of the canary (pairs it is slower in).
    effect: float | None = None
    u: float | None = None
    canary_p95: float | None = None
    rest_p95: float | None = None
    df: float | None = None  # Welch

    @property
    def difference(self) -> float | None:
        if self.canary is None or self.rest is None:
            return None
        return self.canary - self.rest

    def finding(self, alpha: float = ALPHA) -> Finding:
        if self.too_few is not None:
            return Finding.TOO_FEW_SAMPLES
        if self.p_better < alpha:
            return Finding.BETTER
        if self.p_worse < alpha:
            return Finding.WORSE
        return Finding.NOT_SIGNIFICANT

    def describe(self, alpha: float = ALPHA) -> str:
        """One line for the incident timeline, e.g. "error rate 1.2% (canary, 412 calls) vs
        6.8% (rest, 3,702): lower (better), p=0.0003 (two-proportion z-test)"."""
        unit = "scores" if self.measure is Measure.QUALITY else "calls"
        canary = _value(self.measure, self.canary, self.canary_p95)
        rest = _value(self.measure, self.rest, self.rest_p95)
        head = (
            f"{_LABELS[self.measure]} {canary} (canary, {self.canary_n:,} {unit})"
            f" vs {rest} (rest, {self.rest_n:,})"
        )
        if self.too_few is not None:
            return f"{head}: too few samples ({self.too_few})"
        higher_is_better = self.measure in HIGHER_IS_BETTER
        better, worse = ("higher", "lower") if higher_is_better else ("lower", "higher")
        finding = self.finding(alpha)
        if finding is Finding.BETTER:
            verdict = f"{better} (better), {_p(self.p_better)}"
        elif finding is Finding.WORSE:
            verdict = f"{worse} (worse), {_p(self.p_worse)}"
        elif self.p_better < self.p_worse:
            verdict = f"not significantly {better}, {_p(self.p_better)}"
        elif self.p_worse < self.p_better:
            verdict = f"not significantly {worse}, {_p(self.p_worse)}"
        else:
            verdict = f"no difference, {_p(self.p_better)}"
        if self.effect is not None:
            verdict += f", canary faster in {self.effect:.0%} of pairs"
        return f"{head}: {verdict} ({self.test})"


def _p(p: float) -> str:
    # Two significant digits; below 0.0001 the approximations' own error dominates.
    return "p<0.0001" if p < 0.0001 else f"p={p:.2g}"


def _value(measure: Measure, value: float | None, p95: float | None) -> str:
    if value is None:
        return "n/a"
    if measure is Measure.LATENCY:
        text = f"median {_ms(value)}"
        return text if p95 is None else f"{text}, p95 {_ms(p95)}"
    if measure is Measure.QUALITY:
        return f"mean {value:.3f}"
    if measure is Measure.COST:
        return f"${value:.5f} a call" if value < 0.01 else f"${value:.4f} a call"
    # Small rates keep a second decimal: 0.04% is not 0.0%.
    return f"{value:.2%}" if 0 < value < 0.01 else f"{value:.1%}"


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 10 else f"{value:,.0f} ms"


def _upper_normal(z: float) -> float:
    """P(Z > z) for a standard normal Z; erfc keeps its precision deep into either tail."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def _too_few(canary_n: int, rest_n: int, min_n: int, unit: str) -> str | None:
    short = [f"{name} {n:,} {unit}" for name, n in (("canary", canary_n), ("rest", rest_n))]
    small = [s for s, n in zip(short, (canary_n, rest_n), strict=True) if n < min_n]
    if small:
        return f"{', '.join(small)}; at least {min_n:,} needed"
    return None


# -- rates ---------------------------------------------------------------------------------


def two_proportion(
    canary_events: int,
    canary_n: int,
    rest_events: int,
    rest_n: int,
    *,
    measure: Measure = Measure.ERROR_RATE,
    min_n: int = MIN_SAMPLES,
    min_expected: float = MIN_EXPECTED,
) -> Comparison:
    """Pooled two-proportion z-test of the canary's event rate (errors, 429s) against the
    rest's; lower is better. z = (p_c - p_r) / sqrt(p(1-p)(1/n_c + 1/n_r)) with p the pooled
    rate, the usual test of equal rates (its z squared is the 2x2 chi-square without Yates'
    correction). Refuses below `min_n` calls in a group, or when a group's expected events or
    non-events under the pooled rate are below `min_expected`: with no errors anywhere there
    is nothing to compare."""
    if not (0 <= canary_events <= canary_n and 0 <= rest_events <= rest_n):
        raise ValueError("events must be between 0 and the number of calls")
    canary = canary_events / canary_n if canary_n else None
    rest = rest_events / rest_n if rest_n else None

    def refused(why: str) -> Comparison:
        return Comparison(
            measure, TWO_PROPORTION, canary_n, rest_n, canary, rest, 0.0, 1.0, 1.0, too_few=why
        )

    why = _too_few(canary_n, rest_n, min_n, "calls")
    if why is not None or canary is None or rest is None:
        return refused(why or "a group without calls")
    pooled = (canary_events + rest_events) / (canary_n + rest_n)
    expected = min(canary_n, rest_n) * min(pooled, 1 - pooled)
    if expected < min_expected:
        return refused(
            f"{expected:.1f} expected events or non-events in the smaller group;"
            f" at least {min_expected:g} needed"
        )
    se = math.sqrt(pooled * (1 - pooled) * (1 / canary_n + 1 / rest_n))
    if se == 0:  # every call an event, or none: no evidence either way
        return Comparison(measure, TWO_PROPORTION, canary_n, rest_n, canary, rest, 0.0, 1.0, 1.0)
    z = (canary - rest) / se
    return Comparison(
        measure,
        TWO_PROPORTION,
        canary_n,
        rest_n,
        canary,
        rest,
        z,
        p_better=_upper_normal(-z),
        p_worse=_upper_normal(z),
    )


# -- latency -------------------------------------------------------------------------------


def rank_test(
    canary_values: Iterable[float],
    rest_values: Iterable[float],
    *,
    measure: Measure = Measure.LATENCY,
    min_n: int = MIN_SAMPLES,
) -> Comparison:
    """Mann-Whitney U test that the canary's latencies are lower (better) than the rest's.
    Medians and p95 are nearest-rank, as `domain.histogram` reads them."""
    canary_list = list(canary_values)
    rest_list = list(rest_values)
    return _mann_whitney(
        Counter(canary_list),
        Counter(rest_list),
        measure=measure,
        min_n=min_n,
        canary_quantiles=_exact_quantiles(canary_list),
        rest_quantiles=_exact_quantiles(rest_list),
    )


def rank_test_histograms(
    canary: Mapping[int, int],
    rest: Mapping[int, int],
    *,
    measure: Measure = Measure.LATENCY,
    min_n: int = MIN_SAMPLES,
) -> Comparison:
    """The same test from latency histograms (bucket -> count, `domain.histogram`'s buckets).
    A bucket is one tied value: the ranks and the tie correction are exact for the bucketed
    data, so this equals `rank_test` on the buckets' representative latencies. Calls within
    one bucket (5 % apart) count as ties, which can only hide a difference, never invent one."""
    return _mann_whitney(
        # Bucket indices ascend with latency, so they rank like the latencies themselves.
        {float(b): c for b, c in canary.items() if c},
        {float(b): c for b, c in rest.items() if c},
        measure=measure,
        min_n=min_n,
        canary_quantiles=_histogram_quantiles(canary),
        rest_quantiles=_histogram_quantiles(rest),
    )


def _exact_quantiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return exact_percentile(values, 0.5), exact_percentile(values, 0.95)


def _histogram_quantiles(histogram: Mapping[int, int]) -> tuple[float | None, float | None]:
    return percentile(histogram, 0.5), percentile(histogram, 0.95)


def _mann_whitney(
    canary: Mapping[float, int],
    rest: Mapping[float, int],
    *,
    measure: Measure,
    min_n: int,
    canary_quantiles: tuple[float | None, float | None],
    rest_quantiles: tuple[float | None, float | None],
) -> Comparison:
    """From counts per distinct value (or bucket), ascending: U of the canary is the number of
    (canary, rest) pairs where the canary is higher, ties counting half; its null mean is
    n_c*n_r/2 and its variance n_c*n_r/12 * (N+1 - sum(t^3 - t)/(N(N-1))) over tie groups of
    size t. The normal approximation carries a continuity correction of 1/2 towards the mean."""
    n_c = sum(canary.values())
    n_r = sum(rest.values())
    (c_median, c_p95), (r_median, r_p95) = canary_quantiles, rest_quantiles

    def result(
        statistic: float,
        p_better: float,
        p_worse: float,
        too_few: str | None = None,
        effect: float | None = None,
        u: float | None = None,
    ) -> Comparison:
        return Comparison(
            measure,
            MANN_WHITNEY,
            n_c,
            n_r,
            c_median,
            r_median,
            statistic,
            p_better,
            p_worse,
            too_few=too_few,
            effect=effect,
            u=u,
            canary_p95=c_p95,
            rest_p95=r_p95,
        )

    why = _too_few(n_c, n_r, min_n, "calls")
    if why is not None or n_c == 0 or n_r == 0:
        return result(0.0, 1.0, 1.0, too_few=why or "a group without calls")
    u = 0.0
    rest_below = 0
    ties = 0
    for value in sorted(canary.keys() | rest.keys()):
        c, r = canary.get(value, 0), rest.get(value, 0)
        u += c * rest_below + 0.5 * c * r
        rest_below += r
        t = c + r
        ties += t * t * t - t
    pairs = n_c * n_r
    total = n_c + n_r
    mean = pairs / 2
    variance = pairs / 12 * ((total + 1) - ties / (total * (total - 1)))
    effect = 1 - u / pairs
    if variance <= 0:  # every latency the same: an exact permutation test gives p = 1
        return result(0.0, 1.0, 1.0, effect=effect, u=u)
    sd = math.sqrt(variance)
    # Lower is better: a small U is evidence for the canary. Each one-sided tail moves U half
    # a step towards the mean before reading the normal tail.
    z_better = (u - mean + 0.5) / sd
    z_worse = (u - mean - 0.5) / sd
    return result(
        (u - mean) / sd,
        p_better=min(1.0, _upper_normal(-z_better)),
        p_worse=min(1.0, _upper_normal(z_worse)),
        effect=effect,
        u=u,
    )


# -- quality -------------------------------------------------------------------------------


def mean_difference(
    canary_sum: float,
    canary_sumsq: float,
    canary_n: int,
    rest_sum: float,
    rest_sumsq: float,
    rest_n: int,
    *,
    measure: Measure = Measure.QUALITY,
    min_n: int = MIN_SAMPLES,
) -> Comparison:
    """Welch's t-test, from sums, that the canary's mean is better than the rest's: higher for
    a score, lower for a cost (`HIGHER_IS_BETTER`). Sample variances (n-1),
    Welch-Satterthwaite degrees of freedom, and the exact Student t tail (not a normal
    approximation), so small samples are not overconfident."""
    canary = canary_sum / canary_n if canary_n else None
    rest = rest_sum / rest_n if rest_n else None
    why = _too_few(canary_n, rest_n, max(min_n, 2), "scores")
    if why is not None or canary is None or rest is None:
        return Comparison(
            measure,
            WELCH,
            canary_n,
            rest_n,
            canary,
            rest,
            0.0,
            1.0,
            1.0,
            too_few=why or "a group without scores",
        )
    # Sums of squares lose digits to cancellation; a variance below zero is that rounding.
    var_c = max(0.0, (canary_sumsq - canary_sum * canary) / (canary_n - 1)) / canary_n
    var_r = max(0.0, (rest_sumsq - rest_sum * rest) / (rest_n - 1)) / rest_n
    se2 = var_c + var_r
    diff = canary - rest
    if measure not in HIGHER_IS_BETTER:
        diff = -diff  # counted towards "better" either way, so t > 0 is the better side
    if se2 == 0:  # no spread in either group: the means say it all, or nothing
        p_better = 0.0 if diff > 0 else 1.0
        p_worse = 0.0 if diff < 0 else 1.0
        return Comparison(measure, WELCH, canary_n, rest_n, canary, rest, 0.0, p_better, p_worse)
    t = diff / math.sqrt(se2)
    df = se2 * se2 / (var_c * var_c / (canary_n - 1) + var_r * var_r / (rest_n - 1))
    return Comparison(
        measure,
        WELCH,
        canary_n,
        rest_n,
        canary,
        rest,
        t,
        p_better=student_t_sf(t, df),
        p_worse=student_t_sf(-t, df),
        df=df,
    )


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom:
    half the regularized incomplete beta I_{df/(df+t^2)}(df/2, 1/2) on the far side of zero."""
    if df <= 0:
        raise ValueError("degrees of freedom must be positive")
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (Lentz's method),
    evaluated on the side of the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where it converges
    fast (Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) >= tiny else tiny

    c = 1.0
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    h = d
    # Converges in O(sqrt(max(a, b))) terms; the bound covers df in the millions.
    for m in range(1, 20_000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 / guard(1 + even * d)
        c = guard(1 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 / guard(1 + odd * d)
        c = guard(1 + odd / c)
        step = d * c
        h *= step
        if abs(step - 1) < 1e-15:
            break
    return h


# -- the decision --------------------------------------------------------------------------


class Verdict(StrEnum):
    PROMOTE = "promote"
    REVERT = "revert"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    # One line per comparison for the timeline, the primary measure's first.
    lines: tuple[str, ...]
    primary: Measure
    alpha: float

    @property
    def promote(self) -> bool:
        """What the step does at the end of the window: anything but PROMOTE reverts."""
        return self.verdict is Verdict.PROMOTE


def decide(
    comparisons: Sequence[Comparison],
    alpha: float = ALPHA,
    *,
    primary: Measure,
    window_over: bool = True,
) -> Decision:
    """The canary's verdict by the rule in the module's docstring."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must be between 0 and 1")
    measures = [c.measure for c in comparisons]
    if len(set(measures)) != len(measures):
        raise ValueError("one comparison per measure")
    if primary not in measures:
        raise ValueError(f"no comparison for the primary measure {primary}")
    ordered = sorted(comparisons, key=lambda c: c.measure is not primary)
    main = ordered[0]
    lines = tuple(c.describe(alpha) for c in ordered)

    def decision(verdict: Verdict, reason: str) -> Decision:
        return Decision(verdict, reason, lines, primary, alpha)

    worse = [c for c in ordered if c.finding(alpha) is Finding.WORSE]
    if worse:
        names = ", ".join(f"{_LABELS[c.measure]} ({_p(c.p_worse)})" for c in worse)
        return decision(Verdict.REVERT, f"revert: the canary is worse on {names}")
    label = _LABELS[primary]
    finding = main.finding(alpha)
    if finding is Finding.TOO_FEW_SAMPLES:
        return decision(Verdict.INCONCLUSIVE, f"inconclusive: too few samples for the {label}")
    if finding is Finding.BETTER:
        if window_over:
            return decision(
                Verdict.PROMOTE,
                f"promote: the canary is better on the {label} ({_p(main.p_better)})"
                " and worse on nothing",
            )
        return decision(
            Verdict.INCONCLUSIVE,
            f"inconclusive: better on the {label} so far ({_p(main.p_better)});"
            " judged when the window ends",
        )
    if window_over:
        return decision(
            Verdict.REVERT,
            f"revert: the canary is not significantly better on the {label}"
            f" ({_p(main.p_better)}, alpha {alpha:g})",
        )
    return decision(Verdict.INCONCLUSIVE, f"inconclusive: no significant difference yet on {label}")
