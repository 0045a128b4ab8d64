"""A canary's two sides in the call log: the calls in the canary slice of a control and the
rest of its target, over one window, summed the way `domain.canary`'s tests take them.

The instrumentation tags every call in a control's canary slice `canary#<control id>` in the
call's `controls` label, whether or not the control changed that call; the rest are the calls
of the control's target (its feature, its model: the model the app asked for, which a reroute
leaves in the record) without the tag. An SDK too old to know canaries is never handed a
canary control (`GET /v1/controls`), so its calls count with the rest, untreated, as they are.

Calls the response cache answered never reached OpenAI and are left out, as everywhere else.
Reads the window's call rows: the rollups do not know which calls were in a slice. The window
is the verification window (minutes), on the ts index.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pagerloop_sdk.controls import canary_tag
from sqlalchemy import ColumnElement, Engine, and_, case, func, literal, or_, select

from stores.call_search import ERROR_STATUSES
from stores.llm_calls import CACHE_SOURCE, LLMCall, utc
from stores.quality import QualityScore

_calls_table = LLMCall.__table__  # type: ignore[attr-defined]
_scores_table = QualityScore.__table__  # type: ignore[attr-defined]
_calls = _calls_table.c
_scores = _scores_table.c
RATE_LIMITED = "rate_limited"
SUCCESS = "success"


@dataclass
class Side:
    calls: int = 0
    errors: int = 0  # statuses the detector's error rate counts
    rate_limited: int = 0
    latency: Counter[int] = field(default_factory=Counter)  # bucket -> successful calls
    costed: int = 0  # calls with a cost
    cost_sum: float = 0.0
    cost_sumsq: float = 0.0
    scores: int = 0
    score_sum: float = 0.0
    score_sumsq: float = 0.0


@dataclass(frozen=True)
class Target:
    """The control(s) under test: the tags of their canary slices and what they apply to."""

    control_ids: tuple[int, ...]
    feature: str | None = None  # None: any feature
    models: tuple[str, ...] = ()  # (): any model

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(canary_tag(control_id) for control_id in self.control_ids)


def _in_canary(target: Target) -> ColumnElement[bool]:
    # Commas on both sides, so canary#1 never matches canary#12.
    label = literal(",") + func.coalesce(_calls.controls, "") + literal(",")
    return or_(*(label.like(f"%,{tag},%") for tag in target.tags))


def _window(target: Target, start: datetime, end: datetime) -> ColumnElement[bool]:
    where = [_calls.ts >= utc(start), _calls.ts < utc(end), _calls.source != CACHE_SOURCE]
    in_target = []
    if target.feature is not None:
        in_target.append(_calls.feature == target.feature)
    if target.models:
        in_target.append(_calls.model.in_(target.models))
    if not in_target:  # a control on every call: the whole window is its target
        return and_(*where)
    # A tagged call is in the canary wherever the control sent it.
    return and_(*where, or_(_in_canary(target), and_(*in_target)))


def sides(engine: Engine, target: Target, start: datetime, end: datetime) -> tuple[Side, Side]:
    """(canary, rest) over [start, end)."""
    if not target.control_ids:
        raise ValueError("a canary needs at least one control")
    canary = case((_in_canary(target), 1), else_=0).label("canary")
    window = _window(target, start, end)
    calls = (
        select(
            canary,
            _calls.status,
            _calls.latency_bucket,
            func.count(),
            func.count(_calls.cost_usd),
            func.coalesce(func.sum(_calls.cost_usd), 0.0),
            func.coalesce(func.sum(_calls.cost_usd * _calls.cost_usd), 0.0),
        )
        .where(window)
        .group_by(canary, _calls.status, _calls.latency_bucket)
    )
    scores = (
        select(
            canary,
            func.count(),
            func.coalesce(func.sum(_scores.score), 0.0),
            func.coalesce(func.sum(_scores.score * _scores.score), 0.0),
        )
        .select_from(_calls_table.join(_scores_table, _scores.call_id == _calls.call_id))
        .where(window)
        .group_by(canary)
    )
    result = (Side(), Side())
    with engine.connect() as connection:
        for is_canary, status, bucket, n, costed, cost, cost_sq in connection.execute(calls):
            side = result[0 if is_canary else 1]
            side.calls += n
            side.errors += n if status in ERROR_STATUSES else 0
            side.rate_limited += n if status == RATE_LIMITED else 0
            if status == SUCCESS and bucket is not None:
                side.latency[int(bucket)] += n
            side.costed += costed
            side.cost_sum += float(cost)
            side.cost_sumsq += float(cost_sq)
        for is_canary, n, total, total_sq in connection.execute(scores):
            side = result[0 if is_canary else 1]
            side.scores, side.score_sum, side.score_sumsq = n, float(total), float(total_sq)
    return result


def target_of(
    control_ids: Sequence[int], feature: str | None, models: Sequence[str | None]
) -> Target:
    """The target of controls set on one feature (or any) for some models (None: any)."""
    named = tuple(sorted({m for m in models if m}))
    return Target(tuple(control_ids), feature, () if None in models else named)
