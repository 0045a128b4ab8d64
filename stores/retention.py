"""Retention: raw call rows and scores for `retention_days`, the rollup for longer; the sent
emails' ledger as long as the calls (a retry needs its row for a day at most).

Deletes in chunks so that a large purge never holds a long lock over the ingest path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlmodel import col

from stores.email_ledger import SentEmail
from stores.llm_calls import LLMCall, UsageRollup, utc
from stores.quality import QualityScore

CHUNK = 20_000


@dataclass
class Purged:
    calls: int = 0
    scores: int = 0
    rollup_rows: int = 0
    emails: int = 0


def _purge(engine: Engine, table: Any, key: Any, ts: Any, before: datetime) -> int:
    total = 0
    while True:
        oldest = select(key).where(ts < before).limit(CHUNK)
        with engine.begin() as connection:
            deleted = connection.execute(delete(table).where(key.in_(oldest))).rowcount
        total += deleted
        if deleted < CHUNK:
            return total


def purge(engine: Engine, now: datetime, retention_days: int, rollup_days: int) -> Purged:
    calls_before = utc(now) - timedelta(days=retention_days)
    rollup_before = utc(now) - timedelta(days=rollup_days)
    return Purged(
        calls=_purge(engine, LLMCall, LLMCall.id, LLMCall.ts, calls_before),
        scores=_purge(engine, QualityScore, QualityScore.id, QualityScore.ts, calls_before),
        rollup_rows=_purge_rollup(engine, rollup_before),
        emails=_purge(engine, SentEmail, SentEmail.message_id, SentEmail.sent_at, calls_before),
    )


def _purge_rollup(engine: Engine, before: datetime) -> int:
    with engine.begin() as connection:
        return int(
            connection.execute(delete(UsageRollup).where(col(UsageRollup.minute) < before)).rowcount
        )
