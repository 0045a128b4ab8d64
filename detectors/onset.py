"""When an incident's trouble began, for its report: the first bad minute, found by walking
back from the opening over the minutes whose signal, as the detector computes it
(`detectors.series`), is past the rule's warning line. Also the lines past which the report
counts a call as affected without failing (slow, scored low), from the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from detectors.config import DetectorRules
from detectors.rules import Rule
from detectors.series import RuleSeries, trigger_series
from domain.report import Onset, ReportLines
from domain.scopes import OTHER

# How far back from the opening the search reaches: a run of bad minutes longer than this is
# reported as beginning at least that long before.
SEARCH_MINUTES = 120
# Minutes just before the opening that may be fine without ending the run: the detector judges
# every interval, not on the minute, and a breach reported a moment late still counts.
GRACE_MINUTES = 2


def _line(rule: Rule) -> float | None:
    return rule.warning if rule.warning is not None else rule.critical


def onset_of(series: RuleSeries) -> Onset | None:
    """The first minute of the run of bad minutes that ends at the series' last minute (up
    to GRACE_MINUTES of fine or unjudged ones may follow it); None when there is no run."""
    points = series.points
    last = len(points) - 1
    while last >= 0 and last >= len(points) - 1 - GRACE_MINUTES:
        value = points[last][1]
        if value is not None and series.rule.level(value) is not None:
            break
        last -= 1
    else:
        return None
    first = last
    while first > 0:
        value = points[first - 1][1]
        if value is None or series.rule.level(value) is None:
            break
        first -= 1
    minute, value = points[first]
    return Onset(
        minute=minute,
        rule=series.rule.name,
        line=_line(series.rule),
        value=value,
        bounded=first == 0,
    )


def earliest_onset(series: list[RuleSeries]) -> Onset | None:
    """Of the trigger's rules (latency has two), the one whose run began first."""
    found = [onset for s in series if (onset := onset_of(s)) is not None]
    return min(found, key=lambda o: o.minute or datetime.max) if found else None


@dataclass(frozen=True)
class IncidentOnsets:
    """The detector's rules and budget, reading an incident's signal history for its report
    (the worker gives `activities.reports.ReportActivities` one)."""

    engine: Engine
    config: DetectorRules
    daily_budget_usd: float
    window_seconds: int
    search_minutes: int = SEARCH_MINUTES

    def first_bad_minute(self, trigger: str, scope: str, opened_at: datetime) -> Onset:
        if scope.endswith(f":{OTHER}"):
            return Onset(None, why=f"{scope} sums many names: it has no history of its own")
        series = trigger_series(
            self.engine,
            trigger,
            scope,
            opened_at,
            config=self.config,
            daily_budget_usd=self.daily_budget_usd,
            window_seconds=self.window_seconds,
            minutes=self.search_minutes,
        )
        if not series:
            return Onset(None, why=f"no enabled rule watches {trigger} on {scope}")
        found = earliest_onset(series)
        if found is None:
            return Onset(None, why="no minute before the opening was past the rule's warning line")
        return found

    def lines(self) -> ReportLines:
        return report_lines(self.config)


def report_lines(config: DetectorRules) -> ReportLines:
    """The p95 latency rule's warning line and the quality rule's, as configured."""
    lines = ReportLines()
    for rule in config.rules:
        line = _line(rule)
        if line is None:
            continue
        if rule.signal == "latency_p95_ms":
            lines.slow_ms = line
        elif rule.signal == "quality_mean":
            lines.low_quality = line
    return lines
