"""What a silence may be, whichever path creates it (API or CLI): bounded in time, few at once,
and silencing everything only when asked for in so many words."""

from __future__ import annotations

import fnmatch
from datetime import datetime, timedelta

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from stores.llm_calls import utc
from stores.silences import Silence, create

MAX_SILENCE = timedelta(days=30)
# How far back a start may be given (a window opened a little late), and ahead.
MAX_START_IN_PAST = timedelta(days=1)
MAX_START_AHEAD = timedelta(days=30)
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


def active_count(engine: Engine, now: datetime) -> int:
    query = (
        select(func.count())
        .select_from(Silence)
        .where(col(Silence.ends_at) > utc(now), col(Silence.expired_at).is_(None))
    )
    with Session(engine) as session:
        return int(session.exec(query).one())


def create_checked(
    engine: Engine, silence: Silence, now: datetime, cap: int, match_all: bool = False
) -> Silence:
    """Check the silence, refuse past `cap` silences in force or to come, then create it."""
    check(silence, now, match_all)
    if active_count(engine, now) >= cap:
        raise TooManySilencesError(
            f"{cap} silences are already in force or scheduled "
            "(PAGERLOOP_MAX_ACTIVE_SILENCES): expire some first"
        )
    return create(engine, silence)
