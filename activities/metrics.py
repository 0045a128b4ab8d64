"""Store queries behind the detectors' signals."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import Engine
from temporalio import activity

from detectors.signals import ErrorRateSignal, WindowQuery
from stores.llm_calls import error_counts, utc


class MetricsActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="metrics.error_rate")
    async def error_rate(self, query: WindowQuery) -> ErrorRateSignal:
        end = utc(query.end)
        start = end - timedelta(seconds=query.window_seconds)
        counts = await asyncio.to_thread(error_counts, self._engine, start, end)
        return ErrorRateSignal(total=counts.total, errors=counts.errors)
