"""What a silence may be, whichever path creates it (API or CLI): bounded in time, few at once,
and silencing everything only when asked for in so many words."""

from __future__ import annotations

import fnmatch
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, text
from sqlmodel import Session, col, select

from stores.llm_calls import utc
from stores.silences import Silence

MAX_SILENCE = timedelta(days=30)
# How far back a start may be given (a window opened a little late), and ahead.
MAX_START_IN_PAST = timedelta(days=1)
MAX_START_AHEAD = timedelta(days=30)
# One advisory lock key for "creating a silence" on PostgreSQL.
_CAP_LOCK = 0x51_1E_4C_E5
# Scopes no glob should cover unless it means "everything".
_PROBES = ("global", "model:gpt-4.1", "feature:checkout", "model:(other)")


class SilenceRefusedError(ValueError):
    """A silence outside the rules; `field` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class TooManySilencesError(Exception):
    pass


def matches_everything(trigger: str | None, scope: str | None) -> bool:
    if trigger is not None:
        return False
    return scope is None or all(fnmatch.fnmatchcase(probe, scope) for probe in _PROBES)


def check(silence: Silence, now: datetime, match_all: bool = False) -> None:
    starts, ends = utc(silence.starts_at), utc(silence.ends_at)
    if starts < now - MAX_START_IN_PAST or starts > now + MAX_START_AHEAD:
        raise SilenceRefusedError(
            "starts_at", "starts_at must lie between a day ago and 30 days from now"
        )
    if ends <= max(starts, now):
        raise SilenceRefusedError("ends_at", "ends_at must be in the future and after starts_at")
    if ends - starts > MAX_SILENCE:
        raise SilenceRefusedError(
            "ends_at", f"a silence lasts at most {MAX_SILENCE.days} days; renew it if need be"
        )
    if matches_everything(silence.trigger, silence.scope) and not match_all:
        raise SilenceRefusedError(
            "match_all",
            "this silence would keep every incident from opening: give a trigger or a "
            "narrower scope, or say so with match_all: true",
        )


def _active(now: datetime) -> Any:
    return (
        select(func.count())
        .select_from(Silence)
        .where(col(Silence.ends_at) > utc(now), col(Silence.expired_at).is_(None))
    )


def create_checked(
    engine: Engine, silence: Silence, now: datetime, cap: int, match_all: bool = False
) -> Silence:
    """Check the silence, refuse past `cap` silences in force or to come, then create it, in
    one transaction: concurrent requests cannot both take the last place."""
    check(silence, now, match_all)
    with Session(engine) as session:
        if engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CAP_LOCK})
        else:  # SQLite: take the write lock before counting, not after
            session.execute(text("BEGIN IMMEDIATE"))
        if int(session.exec(_active(now)).one()) >= cap:
            raise TooManySilencesError(
                f"{cap} silences are already in force or scheduled "
                "(PAGERLOOP_MAX_ACTIVE_SILENCES): expire some first"
            )
        session.add(silence)
        session.commit()
        session.refresh(silence)
    return silence
