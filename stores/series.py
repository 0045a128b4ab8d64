"""One scope's history, minute by minute, for the charts (detectors.series slides the detector's
window over it).

A few grouped queries for the whole range, whatever the number of minutes charted: the usage
and latency rollups summed per minute, the quality scores of the range (their own timestamps:
the detector counts scores in (end - window, end], not by minute), the hourly quality rollup
for the drift baseline, and today's spend per minute. A `model:` / `feature:` scope matches the
raw names that make it (scope_name() turns odd characters into `_`, which LIKE reads as any one
character; the candidates are checked in Python), as the detector's sums do.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from domain.aggregates import Aggregate
from domain.scopes import GLOBAL, OTHER, SCOPE_NAME_MAX, kind_of, scope_name
from domain.usage import SIGNAL_COUNTERS
from stores.llm_calls import LatencyRollup, UsageRollup, utc
from stores.quality import QualityRollup, QualityScore

_usage = UsageRollup.__table__.c  # type: ignore[attr-defined]
_latency = LatencyRollup.__table__.c  # type: ignore[attr-defined]
_scores = QualityScore.__table__.c  # type: ignore[attr-defined]
_hourly = QualityRollup.__table__.c  # type: ignore[attr-defined]


class UnchartableScopeError(ValueError):
    """A folded `<kind>:(other)` scope: which names it holds depends on the busiest names of
    each evaluation, so it has no stable history to chart."""


@dataclass
class ScopeHistory:
    """What the stores hold about one scope over a range."""

    minutes: dict[datetime, Aggregate] = field(default_factory=dict)  # counters and latency
    score_times: list[datetime] = field(default_factory=list)  # quality scores, oldest first
    score_values: list[float] = field(default_factory=list)
    hours: list[datetime] = field(default_factory=list)  # the quality rollup, oldest first
    hourly: list[tuple[int, float, float]] = field(default_factory=list)  # (n, sum, sum of sq.)
    cost_minutes: list[datetime] = field(default_factory=list)  # every scope's spend
    cost_values: list[float] = field(default_factory=list)

    def window(self, first_minute: datetime, end: datetime) -> Aggregate:
        """The rollups' minutes in [first_minute, end), summed, as the detector sums them."""
        total = Aggregate()
        minute = first_minute
        while minute < end:
            found = self.minutes.get(minute)
            if found is not None:
                total.add(found)
            minute += timedelta(minutes=1)
        return total

    def scores(self, after: datetime, until: datetime) -> tuple[int, float]:
        """Count and sum of the quality scores in (after, until]."""
        lo, hi = bisect_right(self.score_times, after), bisect_right(self.score_times, until)
        return hi - lo, sum(self.score_values[lo:hi])

    def baseline(self, since: datetime, before: datetime) -> tuple[int, float, float]:
        """The quality rollup's hours in [since, before), summed."""
        lo, hi = bisect_left(self.hours, since), bisect_left(self.hours, before)
        n, total, squares = 0, 0.0, 0.0
        for count, score_sum, score_sumsq in self.hourly[lo:hi]:
            n, total, squares = n + count, total + score_sum, squares + score_sumsq
        return n, total, squares

    def spent(self, since: datetime, before: datetime) -> float:
        lo, hi = bisect_left(self.cost_minutes, since), bisect_left(self.cost_minutes, before)
        return sum(self.cost_values[lo:hi])


@dataclass(frozen=True)
class _Match:
    """Which rows of a table belong to the scope: a SQL filter on one column that lets through
    the candidates, and the exact test in Python."""

    kind: str
    name: str  # the scope's name part (`gpt-4.1` of `model:gpt-4.1`)
    scope: str

    def where(self, column: Any) -> Any:
        if "_" not in self.name and len(self.name) < SCOPE_NAME_MAX:
            return column == self.name
        return column.like(self.name + ("%" if len(self.name) >= SCOPE_NAME_MAX else ""))

    def accepts(self, raw: Any) -> bool:
        # A call without the dimension counts in global only, as in the detector's sums.
        return bool(raw) and scope_name(self.kind, str(raw)) == self.scope


def _match(scope: str) -> _Match | None:
    if scope == GLOBAL:
        return None
    kind, _, name = scope.partition(":")
    if kind_of(scope) not in ("model", "feature") or not name:
        raise UnchartableScopeError(f"not a scope: {scope!r}")
    if name == OTHER:
        raise UnchartableScopeError(f"{scope} is folded: no history of its own")
    return _Match(kind, name, scope)


def scope_history(
    engine: Engine,
    scope: str,
    since: datetime,
    until: datetime,
    *,
    scores_after: datetime | None = None,
    baseline: tuple[datetime, datetime] | None = None,
    cost_since: datetime | None = None,
) -> ScopeHistory:
    """The scope's rollup minutes in [since, until); with `scores_after`, its quality scores in
    (scores_after, until]; with `baseline`, its quality rollup hours in [start, end); with
    `cost_since`, every scope's spend per minute in [cost_since, until)."""
    since, until = utc(since), utc(until)
    match = _match(scope)
    history = ScopeHistory()
    with engine.connect() as connection:
        # The rollups per minute (and per raw name of the scope's dimension, when it has one).
        usage_by = [_usage.minute] + ([_usage[match.kind]] if match else [])
        usage = (
            select(*usage_by, *(func.sum(_usage[n]) for n in SIGNAL_COUNTERS))
            .where(_usage.minute >= since, _usage.minute < until)
            .group_by(*usage_by)
        )
        latency_by = [_latency.minute, _latency.bucket] + ([_latency[match.kind]] if match else [])
        latency = (
            select(*latency_by, func.sum(_latency.calls))
            .where(_latency.minute >= since, _latency.minute < until)
            .group_by(*latency_by)
        )
        if match:
            usage = usage.where(match.where(_usage[match.kind]))
            latency = latency.where(match.where(_latency[match.kind]))
        for row in connection.execute(usage):
            minute, *rest = row
            if match:
                raw, *rest = rest
                if not match.accepts(raw):
                    continue
            cell = history.minutes.setdefault(utc(minute), Aggregate())
            for name, value in zip(SIGNAL_COUNTERS, rest, strict=True):
                setattr(cell, name, getattr(cell, name) + type(getattr(cell, name))(value or 0))
        for row in connection.execute(latency):
            minute, bucket, *rest = row
            if match and not match.accepts(rest[0]):
                continue
            histogram = history.minutes.setdefault(utc(minute), Aggregate()).latency_histogram
            histogram[int(bucket)] = histogram.get(int(bucket), 0) + int(rest[-1] or 0)

        if scores_after is not None:
            scores = select(_scores.ts, _scores.score).where(
                _scores.ts > utc(scores_after), _scores.ts <= until
            )
            if match:
                scores = scores.add_columns(_scores[match.kind]).where(
                    match.where(_scores[match.kind])
                )
            found = sorted(
                (utc(row[0]), float(row[1]))
                for row in connection.execute(scores)
                if not match or match.accepts(row[2])
            )
            history.score_times = [ts for ts, _ in found]
            history.score_values = [score for _, score in found]

        if baseline is not None:
            hourly_by = [_hourly.hour] + ([_hourly[match.kind]] if match else [])
            hourly = (
                select(
                    *hourly_by,
                    func.sum(_hourly.scores),
                    func.sum(_hourly.score_sum),
                    func.sum(_hourly.score_sumsq),
                )
                .where(_hourly.hour >= utc(baseline[0]), _hourly.hour < utc(baseline[1]))
                .group_by(*hourly_by)
            )
            if match:
                hourly = hourly.where(match.where(_hourly[match.kind]))
            hours: dict[datetime, tuple[int, float, float]] = {}
            for row in connection.execute(hourly):
                hour, *rest = row
                if match:
                    raw, *rest = rest
                    if not match.accepts(raw):
                        continue
                n, s, q = hours.get(utc(hour), (0, 0.0, 0.0))
                count, total, squares = rest
                hours[utc(hour)] = (
                    n + int(count or 0),
                    s + float(total or 0),
                    q + float(squares or 0),
                )
            history.hours = sorted(hours)
            history.hourly = [hours[h] for h in history.hours]

        if cost_since is not None:
            cost = (
                select(_usage.minute, func.sum(_usage.cost_usd))
                .where(_usage.minute >= utc(cost_since), _usage.minute < until)
                .group_by(_usage.minute)
            )
            spent = sorted((utc(m), float(c or 0)) for m, c in connection.execute(cost))
            history.cost_minutes = [m for m, _ in spent]
            history.cost_values = [c for _, c in spent]
    return history
