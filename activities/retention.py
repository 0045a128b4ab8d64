"""Store maintenance: the periodic purge of records past their retention."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine
from temporalio import activity

from stores.retention import Purged, purge


@dataclass
class PurgeRequest:
    now: datetime
    retention_days: int
    rollup_retention_days: int


class RetentionActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="stores.purge")
    async def purge(self, request: PurgeRequest) -> Purged:
        return await asyncio.to_thread(
            purge,
            self._engine,
            request.now,
            request.retention_days,
            request.rollup_retention_days,
        )
