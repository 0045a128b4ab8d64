"""Quality scores: the scorer's sampled verdicts, user feedback and external evals, per call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Column, DateTime, Engine, Index, insert
from sqlmodel import Field, SQLModel

from stores.llm_calls import utc


class QualityScore(SQLModel, table=True):
    __tablename__ = "quality_scores"
    __table_args__ = (
        Index("ix_quality_scores_ts", "ts"),
        Index("ix_quality_scores_call_id", "call_id"),
        Index("ix_quality_scores_model_ts", "model", "ts"),
    )

    id: int | None = Field(default=None, primary_key=True)
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


@dataclass(slots=True)
class ScoreRecord:
    call_id: str
    ts: datetime
    source: str
    score: float
    format_compliance: float | None = None
    hallucination_risk: float | None = None
    relevance: float | None = None
    evaluator: str | None = None
    label: str | None = None
    comment: str | None = None
    model: str | None = None
    feature: str | None = None


def write_scores(engine: Engine, scores: Sequence[ScoreRecord]) -> int:
    if not scores:
        return 0
    rows = [
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
    with engine.begin() as connection:
        connection.execute(insert(QualityScore), rows)
    return len(rows)
