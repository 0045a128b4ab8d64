"""An incident's signal over the last hour, minute by minute, as the detector computes it: the
value at minute m is `detectors.signals.values` over the rule's window ending with m (the
window slides), read from the rollups with a few grouped queries for the whole hour
(stores.series) instead of one window query per minute. As in `detectors.evaluation`, each
window is dated by its end (the budget's runway) and the tokens per minute take their trend
from the widest window any enabled rule reads, ending at the same time (the token runway), and
so do the requests per minute. A feature's quality baseline set by hand is the drift's baseline
at every minute, as it is the detector's while it is set.

Which signal: the rules of the incident's trigger that watch its scope (a trigger may have
several, `latency_p50` and `latency_p95`); the chart shows the most relevant one, the rule
breaching worst at the latest minute (then worst over the hour, then the first listed). A
minute whose window holds fewer samples than the rule's `min_samples` is a gap: the detector
judges nothing there either.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine

from detectors.config import DetectorRules
from detectors.evaluation import measurable, rule_window, windows_read
from detectors.rules import Level, Rule
from detectors.signals import Earlier, values
from domain.aggregates import Aggregate
from domain.baselines import QualityBaseline
from domain.chart import Chart, render_png, render_svg
from domain.scopes import OTHER, kind_of
from stores.llm_calls import utc
from stores.quality_baselines import for_scope as baseline_for_scope
from stores.series import ScopeHistory, UnchartableScopeError, scope_history

SERIES_MINUTES = 60
BASELINE_DAYS = 7  # as the detector's drift baseline (stores.aggregates.window_aggregates)
# A steady baseline makes any drift 1e9 standard deviations: drawn at the edge of this.
DRIFT_LIMIT_SD = 50.0
# A runway out of sight is the horizon (2 days): drawn at this many times the rule's highest
# line instead, so that the lines stay apart.
RUNWAY_SIGNALS = frozenset({"budget_runway_hours", "tpm_runway_minutes", "rpm_runway_minutes"})
RUNWAY_SHOWN_LINES = 4.0

# signal -> (label, unit shown, factor from the signal's unit to the one shown)
DISPLAY: dict[str, tuple[str, str, float]] = {
    "latency_p50_ms": ("p50 latency", " s", 0.001),
    "latency_p95_ms": ("p95 latency", " s", 0.001),
    "latency_p99_ms": ("p99 latency", " s", 0.001),
    "error_rate": ("error rate", "%", 100.0),
    "non_200_rate": ("non-200 rate (429s included)", "%", 100.0),
    "rate_limit_rate": ("429 rate", "%", 100.0),
    "server_error_rate": ("5xx rate", "%", 100.0),
    "timeout_rate": ("timeout rate", "%", 100.0),
    "tpm_quota_ratio": ("tokens per minute, of the quota", "%", 100.0),
    "rpm_quota_ratio": ("requests per minute, of the quota", "%", 100.0),
    "cost_rate_ratio": ("cost rate, times the hourly budget", "x", 1.0),
    "budget_consumed_ratio": ("daily budget used", "%", 100.0),
    "quality_mean": ("mean quality score", "", 1.0),
    "quality_drift_z": ("quality drift", " sd", 1.0),
    "tpm_runway_minutes": ("minutes until the token quota runs out", " min", 1.0),
    "rpm_runway_minutes": ("minutes until the request quota runs out", " min", 1.0),
    "budget_runway_hours": ("hours until the daily budget runs out", " h", 1.0),
}


@dataclass(frozen=True)
class RuleSeries:
    """One rule's signal per minute; `raw` as `signals.values` computes it, `samples` what the
    rule counts against its `min_samples`."""

    rule: Rule
    scope: str
    window_seconds: int
    minutes: tuple[datetime, ...]
    raw: tuple[float | None, ...]
    samples: tuple[float, ...]
    # The quality baseline set by hand the drift was measured against (None: the rolling one).
    baseline: QualityBaseline | None = None

    @property
    def points(self) -> list[tuple[datetime, float | None]]:
        """What the detector judges: None where the window had too few samples."""
        return [
            (minute, value if samples >= self.rule.min_samples else None)
            for minute, value, samples in zip(self.minutes, self.raw, self.samples, strict=True)
        ]

    def latest(self) -> float | None:
        return next((v for _, v in reversed(self.points) if v is not None), None)

    def relevance(self) -> tuple[int, int]:
        """(level at the latest judged minute, worst level over the series): 2 critical,
        1 warning, 0 fine, -1 nothing judged."""
        judged = [v for _, v in self.points if v is not None]
        if not judged:
            return -1, -1
        rank = {None: 0, Level.WARNING: 1, Level.CRITICAL: 2}
        latest = judged[-1]
        return rank[self.rule.level(latest)], max(rank[self.rule.level(v)] for v in judged)


def _floor_minute(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


def _midnight(value: datetime) -> datetime:
    return value.replace(hour=0, minute=0, second=0, microsecond=0)


def _hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


def trigger_rules(config: DetectorRules, trigger: str, scope: str) -> list[Rule]:
    """The enabled rules of the trigger on the scope with something to measure there (a token
    quota incident charts no request quota that is not set)."""
    return [
        rule
        for rule in config.rules
        if rule.enabled
        and rule.trigger == trigger
        and kind_of(scope) in rule.scopes
        and measurable(rule, config, scope)
    ]


def point_ends(now: datetime, minutes: int) -> list[tuple[datetime, datetime]]:
    """(minute, end of its window) for the last `minutes` minutes, the current one included:
    a whole minute ends when the next begins, the current one now."""
    last = _floor_minute(now)
    found = []
    for back in range(minutes - 1, -1, -1):
        minute = last - timedelta(minutes=back)
        found.append((minute, min(minute + timedelta(minutes=1), now)))
    return found


def trigger_series(
    engine: Engine,
    trigger: str,
    scope: str,
    now: datetime,
    *,
    config: DetectorRules,
    daily_budget_usd: float,
    window_seconds: int,
    minutes: int = SERIES_MINUTES,
) -> list[RuleSeries]:
    """Every rule of the trigger on the scope, per minute over the last `minutes` minutes; []
    when no enabled rule watches it there, or the scope is a folded `(other)`."""
    rules = trigger_rules(config, trigger, scope)
    if not rules:
        return []
    now = utc(now)
    ends = point_ends(now, minutes)
    windows = {rule.name: rule_window(rule, window_seconds) for rule in rules}
    # The detector reads every window in one scan of the widest any enabled rule reads: the
    # drift baseline is that window's (the 7 days before its first hour), and the tokens per
    # minute take their trend from it.
    widest = windows_read(config, window_seconds)[-1]
    first_end = ends[0][1]
    watched = {rule.signal for rule in rules} | {rule.sample_signal for rule in rules}
    quality = any(name.startswith("quality") for name in watched)
    try:
        history = scope_history(
            engine,
            scope,
            _floor_minute(first_end - timedelta(seconds=widest)),
            now,
            scores_after=first_end - timedelta(seconds=widest) if quality else None,
            baseline=(
                (
                    first_end - timedelta(days=BASELINE_DAYS),
                    _hour(now - timedelta(seconds=widest)),
                )
                if "quality_drift_z" in watched
                else None
            ),
            cost_since=(
                _midnight(first_end) if any(n.startswith("budget") for n in watched) else None
            ),
        )
    except UnchartableScopeError:
        return []
    hand_set = None
    if "quality_drift_z" in watched and kind_of(scope) == "feature":
        hand_set = baseline_for_scope(engine, scope)  # the detector reads it while it is set
    by_window = {
        seconds: [
            _signals_at(history, end, seconds, widest, scope, config, daily_budget_usd, hand_set)
            for _, end in ends
        ]
        for seconds in set(windows.values())
    }
    minutes_shown = tuple(minute for minute, _ in ends)
    series = []
    for rule in rules:
        found = by_window[windows[rule.name]]
        series.append(
            RuleSeries(
                rule=rule,
                scope=scope,
                window_seconds=windows[rule.name],
                minutes=minutes_shown,
                raw=tuple(point.get(rule.signal) for point in found),
                samples=tuple(float(point.get(rule.sample_signal) or 0.0) for point in found),
                baseline=hand_set if rule.signal == "quality_drift_z" else None,
            )
        )
    return series


def _signals_at(
    history: ScopeHistory,
    end: datetime,
    window_seconds: int,
    widest: int,
    scope: str,
    config: DetectorRules,
    daily_budget_usd: float,
    baseline: QualityBaseline | None = None,
) -> dict[str, float | None]:
    """`signals.values` of the window ending at `end`, summed as window_aggregates sums it,
    dated and trended as `detectors.evaluation` does: `now` the window's end, `earlier` the
    widest window read (`widest` seconds) ending there, for every narrower window; `baseline`
    the scope's quality baseline set by hand, if any."""
    start = end - timedelta(seconds=window_seconds)
    first_minute = _floor_minute(start)
    aggregate: Aggregate = history.window(first_minute, end)
    aggregate.quality_count, aggregate.quality_sum = history.scores(start, end)
    (
        aggregate.baseline_count,
        aggregate.baseline_sum,
        aggregate.baseline_sumsq,
    ) = history.baseline(
        end - timedelta(days=BASELINE_DAYS), _hour(end - timedelta(seconds=widest))
    )
    earlier = None
    if window_seconds != widest:
        wide_first = _floor_minute(end - timedelta(seconds=widest))
        wide = history.window(wide_first, end)
        long = (end - wide_first).total_seconds()
        minutes = max(long, 1.0) / 60
        tokens = wide.input_tokens + wide.output_tokens
        earlier = Earlier(tokens / minutes, long, requests_per_minute=wide.calls / minutes)
    return values(
        aggregate,
        (end - first_minute).total_seconds(),
        scope=scope,
        daily_budget_usd=daily_budget_usd,
        cost_today_usd=history.spent(_midnight(end), end),
        tpm_quota=config.quota_for(scope),
        now=end,
        earlier=earlier,
        rpm_quota=config.request_quota_for(scope),
        baseline=baseline,
    )


def most_relevant(series: list[RuleSeries]) -> RuleSeries | None:
    """The rule breaching worst now, then worst over the hour, then the first listed."""
    if not series:
        return None
    best = max(range(len(series)), key=lambda i: (*series[i].relevance(), -i))
    return series[best]


def _minutes(seconds: int) -> str:
    return f"{seconds // 60}-min" if seconds % 60 == 0 else f"{seconds}-s"


def to_chart(series: RuleSeries, trigger: str) -> Chart:
    """The series in the units people read (seconds, percent), with the rule's lines."""
    label, unit, factor = DISPLAY.get(series.rule.signal, (series.rule.signal, "", 1.0))
    rule = series.rule
    lines = [line for line in (rule.warning, rule.critical) if line is not None]
    cap = RUNWAY_SHOWN_LINES * max(lines) if rule.signal in RUNWAY_SIGNALS and lines else None

    def shown(value: float | None) -> float | None:
        if value is None:
            return None
        if rule.signal == "quality_drift_z":
            value = max(-DRIFT_LIMIT_SD, min(DRIFT_LIMIT_SD, value))
        if cap is not None:
            value = min(value, cap)
        return value * factor

    judged = [(minute, shown(value)) for minute, value in series.points]
    every = [
        (minute, shown(value)) for minute, value in zip(series.minutes, series.raw, strict=True)
    ]
    unjudged = judged != every
    capped = cap is not None and any(v is not None and v > cap for v in series.raw)
    return Chart(
        title=f"{label} · {series.scope}",
        points=judged,
        unit=unit,
        warning=shown(rule.warning),
        critical=shown(rule.critical),
        above=rule.above,
        subtitle=(
            f"{trigger} · rule {rule.name} · each minute over the {_minutes(series.window_seconds)}"
            " window ending there"
            + (f" · pale: fewer than {rule.min_samples} samples, not judged" if unjudged else "")
            + (f" · over {cap * factor:g}{unit} drawn at it" if capped and cap is not None else "")
            + (
                f" · against the baseline set by hand ({series.baseline.describe()})"
                if series.baseline is not None
                else ""
            )
        ),
        faint=every if unjudged else (),
    )


@dataclass(frozen=True)
class IncidentCharts:
    """The chart of an incident's trigger and scope, as the detector configured sees it: the
    status page draws its SVG, the Slack activity uploads its PNG (the worker hands it `png`)."""

    engine: Engine
    config: DetectorRules
    daily_budget_usd: float
    window_seconds: int
    minutes: int = SERIES_MINUTES

    def chart(self, trigger: str, scope: str, now: datetime) -> Chart | None:
        series = trigger_series(
            self.engine,
            trigger,
            scope,
            now,
            config=self.config,
            daily_budget_usd=self.daily_budget_usd,
            window_seconds=self.window_seconds,
            minutes=self.minutes,
        )
        chosen = most_relevant(series)
        return to_chart(chosen, str(trigger)) if chosen is not None else None

    def why_none(self, trigger: str, scope: str) -> str:
        """Why `chart` has nothing for this trigger and scope."""
        if scope.endswith(f":{OTHER}"):
            return f"{scope} sums the names beyond the busiest: it has no history of its own"
        return "no enabled rule watches this trigger on this scope"

    def svg(self, trigger: str, scope: str, now: datetime) -> str | None:
        chart = self.chart(trigger, scope, now)
        return render_svg(chart) if chart is not None else None

    def png(self, trigger: str, scope: str, now: datetime) -> bytes | None:
        """None when there is nothing to show (no rule, or no value at all this hour)."""
        chart = self.chart(trigger, scope, now)
        if chart is None or not (chart.values or chart.faint_values):
            return None
        return render_png(chart)
