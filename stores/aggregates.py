"""The detectors' questions to the stores: per (model, feature) sums for a window, read from the
rollups, so the cost follows the window's length, never the history's."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select

from detectors.signals import Aggregate, WindowAggregates
from stores.llm_calls import LatencyRollup, UsageRollup, utc
from stores.quality import QualityRollup, QualityScore

USAGE_SUMS = (
    "calls",
    "successes",
    "errors",
    "timeouts",
    "rate_limited",
    "server_errors",
    "input_tokens",
    "output_tokens",
    "cost_usd",
)


def _floor_minute(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


def window_aggregates(
    engine: Engine, end: datetime, window_seconds: int, baseline_days: int = 7
) -> WindowAggregates:
    """Every minute that overlaps (end - window, end), per model and feature: the last
    window_seconds, counted in whole minutes (the current minute included)."""
    end = utc(end)
    first_minute = _floor_minute(end - timedelta(seconds=window_seconds))
    cells: dict[str, dict[str, Aggregate]] = {}

    def cell(model: str, feature: str) -> Aggregate:
        return cells.setdefault(model, {}).setdefault(feature, Aggregate())

    usage = UsageRollup.__table__.c  # type: ignore[attr-defined]
    in_window = (usage.minute >= first_minute, usage.minute < end)
    usage_query = (
        select(usage.model, usage.feature, *(func.sum(usage[name]) for name in USAGE_SUMS))
        .where(*in_window)
        .group_by(usage.model, usage.feature)
    )
    lat = LatencyRollup.__table__.c  # type: ignore[attr-defined]
    latency_query = (
        select(lat.model, lat.feature, lat.bucket, func.sum(lat.calls))
        .where(lat.minute >= first_minute, lat.minute < end)
        .group_by(lat.model, lat.feature, lat.bucket)
    )
    midnight = end.replace(hour=0, minute=0, second=0, microsecond=0)
    today_query = select(func.coalesce(func.sum(usage.cost_usd), 0.0)).where(
        usage.minute >= midnight, usage.minute < end
    )
    score = QualityScore.__table__.c  # type: ignore[attr-defined]
    window_start = end - timedelta(seconds=window_seconds)
    quality_query = (
        select(score.model, score.feature, func.count(), func.sum(score.score))
        .where(score.ts > window_start, score.ts <= end)
        .group_by(score.model, score.feature)
    )
    hourly = QualityRollup.__table__.c  # type: ignore[attr-defined]
    baseline_query = (
        select(
            hourly.model,
            hourly.feature,
            func.sum(hourly.scores),
            func.sum(hourly.score_sum),
            func.sum(hourly.score_sumsq),
        )
        .where(
            hourly.hour >= end - timedelta(days=baseline_days),
            hourly.hour < window_start.replace(minute=0, second=0, microsecond=0),
        )
        .group_by(hourly.model, hourly.feature)
    )
    with engine.connect() as connection:
        for model, feature, *sums in connection.execute(usage_query):
            target = cell(model, feature)
            for name, value in zip(USAGE_SUMS, sums, strict=True):
                setattr(target, name, type(getattr(target, name))(value or 0))
        for model, feature, bucket, calls in connection.execute(latency_query):
            target = cell(model, feature)
            target.latency_histogram[int(bucket)] = int(calls)
        cost_today = float(connection.execute(today_query).scalar_one())
        for model, feature, count, total in connection.execute(quality_query):
            target = cell(model or "", feature or "")
            target.quality_count, target.quality_sum = int(count), float(total or 0)
        for model, feature, count, total, squares in connection.execute(baseline_query):
            target = cell(model, feature)
            target.baseline_count = int(count or 0)
            target.baseline_sum = float(total or 0)
            target.baseline_sumsq = float(squares or 0)
    return WindowAggregates(
        end=end,
        window_seconds=(end - first_minute).total_seconds(),
        cells=cells,
        cost_today_usd=cost_today,
    )
