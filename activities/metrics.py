"""Store queries behind the detectors' signals."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine
from temporalio import activity

from detectors.signals import WindowAggregates
from stores.aggregates import window_aggregates


@dataclass
class WindowQuery:
    """The minutes overlapping (end - window_seconds, end]."""

    end: datetime
    window_seconds: int


class MetricsActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="metrics.window_aggregates")
    async def window_aggregates(self, query: WindowQuery) -> WindowAggregates:
        return await asyncio.to_thread(
            window_aggregates, self._engine, query.end, query.window_seconds
        )
