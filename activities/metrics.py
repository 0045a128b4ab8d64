"""Store queries behind the detectors' signals."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from temporalio import activity

from domain.aggregates import WindowAggregates
from stores.aggregates import DEFAULT_MAX_SCOPES, window_aggregates


@dataclass
class WindowQuery:
    """The minutes overlapping (end - window_seconds, end]."""

    end: datetime
    window_seconds: int
    # Scopes measured on their own whenever they have calls, busiest or not (firing ones).
    keep: list[str] = field(default_factory=list)
    # Per-scope sums (small at any cardinality); False, the default of detector code from
    # before, asks for per-(model, feature) cells, the only shape that code can evaluate.
    per_scope: bool = False
    # Narrower windows (seconds) read in the same scan, for rules with windows of their own:
    # the result's `windows` (empty, the default of detector code from before: one window).
    windows: list[int] = field(default_factory=list)
    # The windows whose latency histograms are summed (most of the result's bytes); None: all.
    latency_windows: list[int] | None = None


class MetricsActivities:
    def __init__(self, engine: Engine, max_scopes: int = DEFAULT_MAX_SCOPES) -> None:
        self._engine = engine
        self._max_scopes = max_scopes

    @activity.defn(name="metrics.window_aggregates")
    async def window_aggregates(self, query: WindowQuery) -> WindowAggregates:
        return await asyncio.to_thread(
            window_aggregates,
            self._engine,
            query.end,
            query.window_seconds,
            max_scopes=self._max_scopes,
            keep=query.keep,
            per_scope=query.per_scope,
            windows=query.windows,
            latency_windows=query.latency_windows,
        )
