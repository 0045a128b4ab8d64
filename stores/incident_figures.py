"""The figures of an incident report, read from the stores for one scope over (start, end].

Totals (calls by status, tokens, cost) come from the usage rollups for the whole minutes and
from the call rows for the two partial ones (`stores.diagnosis.usage`: calls that reached
OpenAI, as the detector counts them). The calls past a line (slow, scored low) and the calls
each control changed are read from the rows, on the ts index: the rollups know neither. The
window is the incident's, which the report caps (domain.report.MAX_WINDOW_DAYS).

Scopes are matched in Python with the detector's own test (`domain.scopes.in_scope`) on the
raw names, as the runbooks' diagnosis does.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlmodel
from pagerloop_sdk.controls import canary_tag
from sqlalchemy import Engine, func, select
from sqlmodel import Session, col

from domain.report import ControlShare, Usage
from domain.scopes import in_scope
from domain.usage import UsageCounters
from stores import diagnosis
from stores.controls import Control
from stores.llm_calls import CACHE_SOURCE, LLMCall, utc
from stores.quality import QualityScore

_calls = LLMCall.__table__.c  # type: ignore[attr-defined]
_scores = QualityScore.__table__.c  # type: ignore[attr-defined]
SUCCESS = "success"


def window(start: datetime, end: datetime) -> diagnosis.Window:
    """(start, end]: its whole minutes from the rollups, the rest from the rows."""
    start, end = utc(start), utc(end)
    full_from = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    full_to = end.replace(second=0, microsecond=0)
    if full_from >= full_to:
        full_from = full_to = end
    return diagnosis.Window(start, end, full_from, full_to)


def usage(
    engine: Engine,
    scope: str,
    start: datetime,
    end: datetime,
    *,
    slow_ms: float | None = None,
    low_quality: float | None = None,
) -> Usage:
    """The scope's calls, failures, 429s, tokens and cost over (start, end]; with `slow_ms`,
    its successful calls slower than that; with `low_quality`, its answers scored below it."""
    total = UsageCounters()
    for counters in diagnosis.usage(engine, window(start, end), scope).values():
        total.add(counters)
    found = Usage(
        calls=total.calls,
        failed=total.errors + total.timeouts + total.server_errors,
        rate_limited=total.rate_limited,
        input_tokens=total.input_tokens,
        output_tokens=total.output_tokens,
        cost_usd=total.cost_usd,
    )
    if slow_ms is not None:
        found.slow = slow_calls(engine, scope, start, end, slow_ms)
    if low_quality is not None:
        found.low_quality = low_scores(engine, scope, start, end, low_quality)
    return found


def slow_calls(engine: Engine, scope: str, start: datetime, end: datetime, line_ms: float) -> int:
    """Successful calls slower than `line_ms` (failed ones count as failed already)."""
    query = (
        select(_calls.model, _calls.feature, func.count())
        .where(
            _calls.ts > utc(start),
            _calls.ts <= utc(end),
            _calls.source != CACHE_SOURCE,
            _calls.status == SUCCESS,
            _calls.latency_ms > line_ms,
        )
        .group_by(_calls.model, _calls.feature)
    )
    with engine.connect() as connection:
        return sum(
            int(n)
            for model, feature, n in connection.execute(query)
            if in_scope(scope, model, feature)
        )


def low_scores(engine: Engine, scope: str, start: datetime, end: datetime, line: float) -> int:
    """Answers (calls, by call id) scored below `line`, in the scope of the score's model and
    feature, as the detector's quality signal counts them."""
    query = (
        select(_scores.model, _scores.feature, func.count(func.distinct(_scores.call_id)))
        .where(_scores.ts > utc(start), _scores.ts <= utc(end), _scores.score < line)
        .group_by(_scores.model, _scores.feature)
    )
    with engine.connect() as connection:
        return sum(
            int(n)
            for model, feature, n in connection.execute(query)
            if in_scope(scope, model or "", feature)
        )


def incident_controls(engine: Engine, incident_id: str) -> list[Control]:
    """Every control set for the incident (by its runbook or by hand), reverted or not."""
    with Session(engine) as session:
        query = sqlmodel.select(Control).where(Control.incident_id == incident_id)
        return list(session.exec(query.order_by(col(Control.id))))


def ended_at(control: Control) -> datetime | None:
    """When it stopped being in force: reverted, or expired (None: neither yet)."""
    if control.reverted_at is not None:
        return min(utc(control.reverted_at), utc(control.expires_at))
    return utc(control.expires_at)


def tags(control: Control) -> frozenset[str]:
    """The tags a call it changed carries (`pagerloop_sdk.controls.Rule.tag`, `canary_tag`)."""
    assert control.id is not None  # a stored control: only those are read here
    return frozenset({f"{control.kind}#{control.id}", canary_tag(control.id)})


def control_share(
    engine: Engine, scope: str, control: Control, start: datetime, end: datetime
) -> ControlShare:
    """The scope's calls while `control` was in force within (start, end], and how many of
    them carried its tag. Cache hits count: a cache control's calls are those."""
    assert control.id is not None
    until = ended_at(control)
    since = max(utc(control.created_at), utc(start))
    stop = min(until, utc(end)) if until is not None else utc(end)
    share = ControlShare(
        control_id=control.id,
        kind=control.kind,
        description=control.description,
        created_at=utc(control.created_at),
        ended_at=until,
        fraction=control.fraction,
        start=None,
        end=None,
    )
    if since >= stop:
        return share
    share.start, share.end = since, stop
    query = (
        select(_calls.model, _calls.feature, _calls.controls, func.count())
        .where(_calls.ts > since, _calls.ts <= stop)
        .group_by(_calls.model, _calls.feature, _calls.controls)
    )
    wanted = tags(control)
    with engine.connect() as connection:
        for model, feature, label, n in connection.execute(query):
            if not in_scope(scope, model, feature):
                continue
            share.calls += int(n)
            if label and not wanted.isdisjoint(label.split(",")):
                share.tagged += int(n)
    return share
