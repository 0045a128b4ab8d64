"""Quality scores: the scorer's sampled verdicts, user feedback and external evals, per call.

A scorer verdict is the verdict on one call at that call's time, so (call_id, "scorer", ts) is
a natural key: a retried batch leaves out the verdicts already recorded, and the rollup counts
only those inserted.
Feedback and evals have no natural key (a user may vote twice, an eval may run again): each
one sent is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pagerloop_sdk.records import ScoreRecord as ScoreRecord
from sqlalchemy import Column, Connection, DateTime, Engine, Index, insert, select
from sqlmodel import Field, SQLModel

from stores import dialect
from stores.llm_calls import big, utc


class QualityScore(SQLModel, table=True):
    __tablename__ = "quality_scores"
    __table_args__ = (
        Index("ix_quality_scores_ts", "ts"),
        Index("ix_quality_scores_call_id", "call_id"),
        Index("ix_quality_scores_model_ts", "model", "ts"),
    )

    id: int | None = big(None, primary_key=True)
    call_id: str = Field(max_length=128)
    ts: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    source: str = Field(max_length=16)  # scorer | feedback | eval
    score: float  # 0 (bad) .. 1 (good): the composite, or the feedback / eval value
    format_compliance: float | None = None
    hallucination_risk: float | None = None
    relevance: float | None = None
    evaluator: str | None = Field(default=None, max_length=128)
    label: str | None = Field(default=None, max_length=64)
    comment: str | None = Field(default=None, max_length=1000)
    model: str | None = Field(default=None, max_length=128)
    feature: str | None = Field(default=None, max_length=128)


class QualityRollup(SQLModel, table=True):
    """Per hour, model and feature: the sums a drift baseline needs (mean and deviation)."""

    __tablename__ = "quality_rollup"
    __table_args__ = (Index("ix_quality_rollup_hour", "hour"),)

    hour: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    model: str = Field(primary_key=True, max_length=128)
    feature: str = Field(primary_key=True, max_length=128)
    scores: int = big()
    score_sum: float = 0.0
    score_sumsq: float = 0.0


def _rollup(scores: Sequence[ScoreRecord]) -> list[dict[str, object]]:
    sums: dict[tuple[datetime, str, str], list[float]] = {}
    for score in scores:
        key = (utc(score.ts).replace(minute=0, second=0, microsecond=0), score.model or "",
               score.feature or "")  # fmt: skip
        entry = sums.setdefault(key, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += score.score
        entry[2] += score.score * score.score
    return [
        {"hour": h, "model": m, "feature": f, "scores": int(n), "score_sum": s, "score_sumsq": q}
        for (h, m, f), (n, s, q) in sums.items()
    ]


def _upsert_rollup(engine: Engine) -> Any:
    table = QualityRollup.__table__  # type: ignore[attr-defined]
    statement = dialect.insert(engine)(table)
    return statement.on_conflict_do_update(
        index_elements=["hour", "model", "feature"],
        set_={
            "scores": table.c.scores + statement.excluded.scores,
            "score_sum": table.c.score_sum + statement.excluded.score_sum,
            "score_sumsq": table.c.score_sumsq + statement.excluded.score_sumsq,
        },
    )


SCORER = "scorer"


def _unrecorded(connection: Connection, scores: Sequence[ScoreRecord]) -> Sequence[ScoreRecord]:
    """The batch without the scorer verdicts already recorded (nor one twice in the batch)."""
    ids = {s.call_id for s in scores if s.source == SCORER}
    if not ids:
        return scores
    table = QualityScore.__table__  # type: ignore[attr-defined]
    query = select(table.c.call_id, table.c.ts).where(
        table.c.source == SCORER, table.c.call_id.in_(ids)
    )
    seen = {(call_id, utc(ts)) for call_id, ts in connection.execute(query)}
    kept = []
    for score in scores:
        if score.source == SCORER:
            key = (score.call_id, utc(score.ts))
            if key in seen:
                continue
            seen.add(key)
        kept.append(score)
    return kept


def write_scores(engine: Engine, scores: Sequence[ScoreRecord]) -> int:
    """Insert the scores and their rollup in one transaction; the number inserted (a scorer
    verdict already recorded for its call is left out)."""
    if not scores:
        return 0
    with engine.begin() as connection:
        scores = _unrecorded(connection, scores)
        if scores:
            connection.execute(insert(QualityScore), _rows(scores))
            connection.execute(_upsert_rollup(engine), _rollup(scores))
    return len(scores)


def _rows(scores: Sequence[ScoreRecord]) -> list[dict[str, Any]]:
    return [
        {
            "call_id": s.call_id,
            "ts": utc(s.ts),
            "source": s.source,
            "score": s.score,
            "format_compliance": s.format_compliance,
            "hallucination_risk": s.hallucination_risk,
            "relevance": s.relevance,
            "evaluator": s.evaluator,
            "label": s.label,
            "comment": s.comment[:1000] if s.comment else None,
            "model": s.model,
            "feature": s.feature,
        }
        for s in scores
    ]
