"""Silences (maintenance windows): while one matches a trigger and scope, no new incident opens
for them. Open incidents carry on; an expired silence stops applying by itself."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Column, DateTime, Engine, Index
from sqlmodel import Field, Session, SQLModel, col, select

from stores.llm_calls import big, utc


class Silence(SQLModel, table=True):
    __tablename__ = "silences"
    __table_args__ = (Index("ix_silences_ends_at", "ends_at"),)

    id: int | None = big(None, primary_key=True)
    trigger: str | None = Field(default=None, max_length=64)  # None: any trigger
    scope: str | None = Field(default=None, max_length=160)  # glob, e.g. "model:*"; None: any
    starts_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    ends_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    author: str = Field(max_length=128)
    reason: str = Field(max_length=1000)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    expired_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )

    def matches(self, trigger: str, scope: str) -> bool:
        return (self.trigger is None or self.trigger == trigger) and (
            self.scope is None or fnmatch.fnmatchcase(scope, self.scope)
        )

    def active_at(self, when: datetime) -> bool:
        return self.expired_at is None and utc(self.starts_at) <= utc(when) < utc(self.ends_at)


@dataclass(frozen=True)
class SilenceMatch:
    id: int
    reason: str
    author: str
    ends_at: datetime


def create(engine: Engine, silence: Silence) -> Silence:
    with Session(engine) as session:
        session.add(silence)
        session.commit()
        session.refresh(silence)
    return silence


def listed(engine: Engine, now: datetime, include_past: bool = False) -> list[Silence]:
    query = select(Silence).order_by(col(Silence.starts_at))
    if not include_past:
        query = query.where(col(Silence.ends_at) > utc(now), col(Silence.expired_at).is_(None))
    with Session(engine) as session:
        return list(session.exec(query))


def expire(engine: Engine, silence_id: int, now: datetime) -> Silence | None:
    with Session(engine) as session:
        silence = session.get(Silence, silence_id)
        if silence is None:
            return None
        if silence.expired_at is None:
            silence.expired_at = utc(now)
            session.add(silence)
            session.commit()
            session.refresh(silence)
        return silence


def matching(engine: Engine, trigger: str, scope: str, now: datetime) -> SilenceMatch | None:
    """The active silence that covers this trigger and scope, if any."""
    for silence in listed(engine, now):
        if silence.active_at(now) and silence.matches(trigger, scope):
            assert silence.id is not None
            return SilenceMatch(silence.id, silence.reason, silence.author, utc(silence.ends_at))
    return None
