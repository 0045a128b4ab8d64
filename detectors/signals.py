"""The golden signals of one scope, computed from its additive aggregates (domain.aggregates).

Everything here is arithmetic on the window's sums: rates of calls, latency percentiles from
the merged histogram, spend against the budget, tokens and requests against their quotas,
quality drift (from the rolling baseline, or one set by hand for a feature), and runways
(domain.runway): how long the daily budget lasts at the window's burn, and how long until the
tokens (or requests) per minute reach their quota on their trend from a longer window to this
one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from domain.aggregates import Aggregate
from domain.baselines import BASELINE_MIN_SCORES, QualityBaseline, mean_and_stddev
from domain.histogram import percentile
from domain.runway import budget_runway, in_sight, rate_runway
from domain.scopes import GLOBAL

# Signals read from the latency histograms: windows without a rule on them need none.
HISTOGRAM_SIGNALS = frozenset({"latency_p50_ms", "latency_p95_ms", "latency_p99_ms"})
# Signals of a trend between two windows (`earlier`): none where only one window is read.
TREND_SIGNALS = frozenset({"tpm_runway_minutes", "rpm_runway_minutes"})


@dataclass(frozen=True)
class Earlier:
    """The far end of a trend: the same scope over a longer window ending at the same time
    (an average over a window is the rate at its centre, for a rate changing steadily)."""

    tokens_per_minute: float
    window_seconds: float
    # None (a caller from before request quotas): no trend of the requests, no runway for them.
    requests_per_minute: float | None = None


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def values(
    aggregate: Aggregate,
    window_seconds: float,
    *,
    scope: str,
    daily_budget_usd: float,
    cost_today_usd: float,
    tpm_quota: float | None,
    now: datetime | None = None,
    earlier: Earlier | None = None,
    rpm_quota: float | None = None,
    baseline: QualityBaseline | None = None,
) -> dict[str, float | None]:
    """Every signal of one scope; None where there is nothing to measure. `now` (the window's
    end) dates the budget's runway, `earlier` gives the tokens and requests per minute their
    trend; `baseline`, a quality baseline set by hand for the scope, replaces the rolling one."""
    a = aggregate
    minutes = max(window_seconds, 1.0) / 60
    tokens_per_minute = (a.input_tokens + a.output_tokens) / minutes
    requests_per_minute = a.calls / minutes
    cost_per_hour = a.cost_usd / (minutes / 60)
    histogram = a.latency_histogram
    found: dict[str, float | None] = {
        "calls": float(a.calls),
        "latency_p50_ms": percentile(histogram, 0.50),
        "latency_p95_ms": percentile(histogram, 0.95),
        "latency_p99_ms": percentile(histogram, 0.99),
        # 429s have a signal of their own (rate_limit_rate), so they are not errors here.
        "error_rate": _ratio(a.errors + a.timeouts + a.server_errors, a.calls),
        # The seed's error rate, every non-200 (429s too): for `include_rate_limited`.
        "non_200_rate": _ratio(a.errors + a.timeouts + a.server_errors + a.rate_limited, a.calls),
        "rate_limit_rate": _ratio(a.rate_limited, a.calls),
        "server_error_rate": _ratio(a.server_errors, a.calls),
        "timeout_rate": _ratio(a.timeouts, a.calls),
        "tokens_per_minute": tokens_per_minute,
        "requests_per_minute": requests_per_minute,
        "cost_usd_per_hour": cost_per_hour,
        "quality_mean": _ratio(a.quality_sum, a.quality_count),
        "quality_scores": float(a.quality_count),
    }
    tpm = found["tokens_per_minute"]
    found["tpm_quota_ratio"] = tpm / tpm_quota if tpm_quota and tpm is not None else None
    found["rpm_quota_ratio"] = requests_per_minute / rpm_quota if rpm_quota else None
    hourly_budget = daily_budget_usd / 24
    cost_rate = found["cost_usd_per_hour"]
    found["cost_rate_ratio"] = cost_rate / hourly_budget if cost_rate is not None else None
    found["budget_consumed_ratio"] = cost_today_usd / daily_budget_usd if scope == GLOBAL else None
    found["quality_drift_z"] = _drift(a, baseline)
    found["budget_runway_hours"] = None
    if scope == GLOBAL and now is not None:
        runway = budget_runway(daily_budget_usd, cost_today_usd, cost_per_hour, now)
        # Finite (the horizon when not in sight), so that a firing rule recovers.
        found["budget_runway_hours"] = in_sight(runway.seconds_left) / 3600
    found["tpm_runway_minutes"] = None
    found["rpm_runway_minutes"] = None
    if earlier is not None and earlier.window_seconds > window_seconds:
        between = (earlier.window_seconds - window_seconds) / 2  # from centre to centre
        if tpm_quota:
            left = rate_runway(tpm_quota, tokens_per_minute, earlier.tokens_per_minute, between)
            found["tpm_runway_minutes"] = in_sight(left) / 60
        if rpm_quota and earlier.requests_per_minute is not None:
            left = rate_runway(rpm_quota, requests_per_minute, earlier.requests_per_minute, between)
            found["rpm_runway_minutes"] = in_sight(left) / 60
    return found


def _drift(a: Aggregate, baseline: QualityBaseline | None) -> float | None:
    """How many baseline standard deviations the recent quality mean lies from the baseline:
    the one set by hand when there is one, else the rolling one (at least 30 scores)."""
    if a.quality_count == 0:
        return None
    if baseline is not None:
        mean, sd = baseline.mean, baseline.stddev
    elif a.baseline_count < BASELINE_MIN_SCORES:
        return None
    else:
        mean, sd = mean_and_stddev(a.baseline_count, a.baseline_sum, a.baseline_sumsq)
    recent = a.quality_sum / a.quality_count
    if sd == 0:  # a perfectly steady baseline: any move is far off, but stays a finite number
        return 0.0 if recent == mean else math.copysign(1e9, recent - mean)
    return (recent - mean) / sd
