"""The runbooks' diagnosis questions to the stores: who spends, who gets 429s, who is slow, what
fails, which snapshot answers badly, for calls in (end - window, end] within one scope.

Sums read from the per-minute rollups where a rollup holds the answer, and the window's two
partial minutes from the call rows, so that an answer covers the window to the microsecond
while reading only two minutes of rows. Questions the rollups cannot answer (retries, prompt
sizes, error messages, snapshots) read the window's call rows.

Calls served from the response cache (source "cache") never reached OpenAI: the rollups leave
them out, and so does every read of the call rows here (`Window.rows`, `Window.all_rows`), so
that the partial minutes agree with the whole ones.

Scopes are matched in Python with the detector's own test (`domain.scopes.in_scope`) on the
raw names, so a runbook reads the calls the detector judged even when a model's name had
characters that the scope name replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, case, func, or_, select, true

from domain.scopes import SCOPE_NAME_MAX, in_scope
from domain.usage import (
    ERROR_COUNTER,
    FLOAT_COUNTERS,
    STATUS_COUNTERS,
    USAGE_COUNTERS,
    UsageCounters,
)
from stores.llm_calls import CACHE_SOURCE, LatencyRollup, LLMCall, UsageRollup, utc
from stores.quality import QualityScore

# Upper bounds (input tokens, exclusive) of the prompt-size bands; the last band is open.
PROMPT_SIZE_BANDS: tuple[tuple[str, int | None], ...] = (
    ("<1k", 1_000),
    ("1k-4k", 4_000),
    ("4k-16k", 16_000),
    (">=16k", None),
)

_calls_table = LLMCall.__table__  # type: ignore[attr-defined]
_scores_table = QualityScore.__table__  # type: ignore[attr-defined]
_calls = _calls_table.c
_scores = _scores_table.c
_usage = UsageRollup.__table__.c  # type: ignore[attr-defined]
_latency = LatencyRollup.__table__.c  # type: ignore[attr-defined]
# Calls that reached OpenAI: not those the response cache answered.
_sent = _calls.source != CACHE_SOURCE


@dataclass(frozen=True)
class Window:
    """(start, end], split into the whole minutes [full_from, full_to) that the rollups answer
    and the partial minutes around them that the call rows answer."""

    start: datetime
    end: datetime
    full_from: datetime
    full_to: datetime

    @classmethod
    def of(cls, end: datetime, window_seconds: float) -> Window:
        end = utc(end)
        start = end - timedelta(seconds=window_seconds)
        # The first minute that starts after `start`: a call at exactly `start` is outside.
        full_from = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
        full_to = end.replace(second=0, microsecond=0)
        if full_from >= full_to:
            full_from = full_to = end  # no whole minute inside: the rows answer all of it
        return cls(start, end, full_from, full_to)

    @property
    def has_full_minutes(self) -> bool:
        return self.full_from < self.full_to

    def rows(self) -> ColumnElement[bool]:
        """Call rows the rollup part does not cover (the rollups' calls: no cache hits)."""
        ts = _calls.ts
        if not self.has_full_minutes:
            return and_(ts > self.start, ts <= self.end, _sent)
        return and_(
            or_(
                and_(ts > self.start, ts < self.full_from),
                and_(ts >= self.full_to, ts <= self.end),
            ),
            _sent,
        )

    def all_rows(self) -> ColumnElement[bool]:
        """Every call row of the window that reached OpenAI."""
        return and_(_calls.ts > self.start, _calls.ts <= self.end, _sent)

    def minutes(self, minute: Any) -> ColumnElement[bool]:
        return and_(minute >= self.full_from, minute < self.full_to)


# --- usage: calls, 429s, tokens, cost, time in flight per (model, feature) -------------------


def _row_counters() -> list[Any]:
    """What the call rows add to each usage counter (domain.usage), as the writer sums them
    into the rollup: the rows answer the window's partial minutes."""

    def count(condition: ColumnElement[bool]) -> Any:
        return func.sum(case((condition, 1), else_=0))

    status = _calls.status
    sums: dict[str, Any] = {
        "calls": func.count(),
        **{counter: count(status == name) for name, counter in STATUS_COUNTERS.items()},
        ERROR_COUNTER: count(status.not_in(list(STATUS_COUNTERS))),
        "input_tokens": func.sum(_calls.input_tokens),
        "output_tokens": func.sum(_calls.output_tokens),
        "cached_input_tokens": func.sum(_calls.cached_input_tokens),
        "cost_usd": func.sum(_calls.cost_usd),
        "unpriced_calls": count(and_(_calls.cost_usd.is_(None), _calls.input_tokens.is_not(None))),
        "latency_ms_sum": func.sum(_calls.latency_ms),
    }
    return [sums[name] for name in USAGE_COUNTERS]


def usage(engine: Engine, window: Window, scope: str) -> dict[tuple[str, str], UsageCounters]:
    """(model, feature) -> usage counters; feature "" for calls without one."""
    rollup = (
        select(_usage.model, _usage.feature, *(func.sum(_usage[n]) for n in USAGE_COUNTERS))
        .where(window.minutes(_usage.minute))
        .group_by(_usage.model, _usage.feature)
    )
    rows = (
        select(_calls.model, _calls.feature, *_row_counters())
        .where(window.rows())
        .group_by(_calls.model, _calls.feature)
    )
    found: dict[tuple[str, str], UsageCounters] = {}
    with engine.connect() as connection:
        results = [connection.execute(rows)]
        if window.has_full_minutes:
            results.append(connection.execute(rollup))
        for result in results:
            for model, feature, *sums in result:
                if in_scope(scope, model, feature):
                    counters = found.setdefault((model, feature or ""), UsageCounters())
                    for name, value in zip(USAGE_COUNTERS, sums, strict=True):
                        kind = float if name in FLOAT_COUNTERS else int
                        setattr(counters, name, getattr(counters, name) + kind(value or 0))
    return found


def first_calls(engine: Engine, window: Window, scope: str) -> dict[str, datetime]:
    """feature -> its first call in the window ("" for calls without one): how long the
    window's traffic of each feature has really been flowing."""
    query = (
        select(_calls.model, _calls.feature, func.min(_calls.ts))
        .where(window.all_rows())
        .group_by(_calls.model, _calls.feature)
    )
    first: dict[str, datetime] = {}
    with engine.connect() as connection:
        for model, feature, ts in connection.execute(query):
            if in_scope(scope, model, feature):
                key = feature or ""
                first[key] = min(first.get(key, utc(ts)), utc(ts))
    return first


# --- latency -----------------------------------------------------------------------------------


def latency_histograms(engine: Engine, window: Window, scope: str) -> dict[str, dict[int, int]]:
    """model -> latency bucket -> calls (domain.histogram's buckets)."""
    rollup = (
        select(_latency.model, _latency.feature, _latency.bucket, func.sum(_latency.calls))
        .where(window.minutes(_latency.minute))
        .group_by(_latency.model, _latency.feature, _latency.bucket)
    )
    # Rows written before the histograms existed (schema 0002) have no bucket; they are older
    # than any window a runbook reads.
    rows = (
        select(_calls.model, _calls.feature, _calls.latency_bucket, func.count())
        .where(window.rows(), _calls.latency_bucket.is_not(None))
        .group_by(_calls.model, _calls.feature, _calls.latency_bucket)
    )
    found: dict[str, dict[int, int]] = {}
    with engine.connect() as connection:
        results = [connection.execute(rows)]
        if window.has_full_minutes:
            results.append(connection.execute(rollup))
        for result in results:
            for model, feature, bucket, calls in result:
                if in_scope(scope, model, feature):
                    histogram = found.setdefault(model, {})
                    histogram[int(bucket)] = histogram.get(int(bucket), 0) + int(calls)
    return found


@dataclass
class PromptSizes:
    """One model's calls that reported their input tokens."""

    calls: int = 0
    input_tokens: int = 0
    histograms: dict[str, dict[int, int]] = field(default_factory=dict)  # band -> histogram


def _band() -> ColumnElement[str]:
    tokens = _calls.input_tokens
    bounded = [(label, bound) for label, bound in PROMPT_SIZE_BANDS if bound is not None]
    last = PROMPT_SIZE_BANDS[-1][0]
    return case(*((tokens < bound, label) for label, bound in bounded), else_=last)


def prompt_sizes(engine: Engine, window: Window, scope: str) -> dict[str, PromptSizes]:
    """model -> latency histograms per prompt-size band (calls without input tokens left out)."""
    band = _band().label("band")
    query = (
        select(
            _calls.model,
            _calls.feature,
            band,
            _calls.latency_bucket,
            func.count(),
            func.sum(_calls.input_tokens),
        )
        .where(
            window.all_rows(),
            _calls.input_tokens.is_not(None),
            _calls.latency_bucket.is_not(None),
        )
        .group_by(_calls.model, _calls.feature, band, _calls.latency_bucket)
    )
    found: dict[str, PromptSizes] = {}
    with engine.connect() as connection:
        for model, feature, label, bucket, calls, tokens in connection.execute(query):
            if not in_scope(scope, model, feature):
                continue
            sizes = found.setdefault(model, PromptSizes())
            sizes.calls += int(calls)
            sizes.input_tokens += int(tokens or 0)
            histogram = sizes.histograms.setdefault(label, {})
            histogram[int(bucket)] = histogram.get(int(bucket), 0) + int(calls)
    return found


# --- rate limits ---------------------------------------------------------------------------


@dataclass
class RateLimits:
    calls: int = 0
    rate_limited: int = 0
    retries: int = 0


def rate_limits(engine: Engine, window: Window, scope: str) -> dict[str, RateLimits]:
    """model -> calls, 429s and retries. The rollups hold no retry counts, so this reads the
    window's rows once for all three rather than the rollup and then the rows anyway."""
    query = (
        select(
            _calls.model,
            _calls.feature,
            func.count(),
            func.sum(case((_calls.status == "rate_limited", 1), else_=0)),
            func.sum(_calls.retry_count),
        )
        .where(window.all_rows())
        .group_by(_calls.model, _calls.feature)
    )
    found: dict[str, RateLimits] = {}
    with engine.connect() as connection:
        for model, feature, calls, limited, retries in connection.execute(query):
            if in_scope(scope, model, feature):
                entry = found.setdefault(model, RateLimits())
                entry.calls += int(calls)
                entry.rate_limited += int(limited or 0)
                entry.retries += int(retries or 0)
    return found


def retries_by_feature(engine: Engine, window: Window, scope: str) -> dict[str, int]:
    """feature ("" for calls without one) -> the retries of its calls. The rollups hold no
    retry counts: this reads the window's rows, only those that retried, one row out per
    (model, feature)."""
    query = (
        select(_calls.model, _calls.feature, func.sum(_calls.retry_count))
        .where(window.all_rows(), _calls.retry_count > 0)
        .group_by(_calls.model, _calls.feature)
    )
    found: dict[str, int] = {}
    with engine.connect() as connection:
        for model, feature, retries in connection.execute(query):
            if in_scope(scope, model, feature):
                key = feature or ""
                found[key] = found.get(key, 0) + int(retries or 0)
    return found


# --- errors --------------------------------------------------------------------------------


@dataclass
class Errors:
    model: str
    feature: str | None
    status: str
    error_type: str | None
    count: int
    last_seen: datetime
    sample_message: str | None = None


def recent_errors(engine: Engine, window: Window, scope: str, limit: int) -> list[Errors]:
    """Non-success calls per model, feature, status and error type, the most recent group first,
    each with the message of its latest call that had one."""
    keys = (_calls.model, _calls.feature, _calls.status, _calls.error_type)
    query = (
        select(*keys, func.count(), func.max(_calls.ts))
        .where(window.all_rows(), _calls.status != "success")
        .group_by(*keys)
    )
    with engine.connect() as connection:
        groups = [
            Errors(model, feature, status, error_type, int(count), utc(last))
            for model, feature, status, error_type, count, last in connection.execute(query)
            if in_scope(scope, model, feature)
        ]
        groups.sort(key=lambda g: (g.last_seen, g.count), reverse=True)
        groups = groups[: max(limit, 0)]
        # One short lookup per group shown, walking the ts index back from the group's last
        # call, instead of ordering every error row of the window to pick one message each.
        for group in groups:
            message = select(_calls.error_message).where(
                window.all_rows(),
                _calls.error_message.is_not(None),
                *(
                    column.is_not_distinct_from(value)
                    for column, value in zip(
                        keys, (group.model, group.feature, group.status, group.error_type),
                        strict=True,
                    )
                ),
            )  # fmt: skip
            group.sample_message = connection.execute(
                message.order_by(_calls.ts.desc()).limit(1)
            ).scalar_one_or_none()
    return groups


# --- quality -------------------------------------------------------------------------------


@dataclass
class Quality:
    model: str  # asked for
    response_model: str  # answered ("" when the call did not say)
    scores: int
    score_sum: float
    first_seen: datetime
    last_seen: datetime


def quality(engine: Engine, window: Window, scope: str) -> list[Quality]:
    """Scores in the window per requested model and answering snapshot (scores joined to their
    calls; a score without its call counts under the model the score names).

    A model scope names either a requested model or a snapshot, because the detector judges
    quality by the model on the score, which is the snapshot when the call reported one. Either
    way the answer holds every snapshot of the requested models involved, so that a runbook
    sees the good snapshot beside the bad one."""
    keys = (
        _calls.model,
        _calls.response_model,
        _calls.feature,
        _scores.model,
        _scores.feature,
    )
    query = (
        select(
            *keys,
            func.count(),
            func.sum(_scores.score),
            func.min(_scores.ts),
            func.max(_scores.ts),
        )
        .select_from(_scores_table.outerjoin(_calls_table, _calls.call_id == _scores.call_id))
        .where(_scores.ts > window.start, _scores.ts <= window.end)
        .group_by(*keys)
    )
    with engine.connect() as connection:
        rows = list(connection.execute(query))
    kind = scope.partition(":")[0]
    groups: dict[tuple[str, str], Quality] = {}
    wanted: set[str] | None = None
    if kind == "model":
        wanted = {
            call_model or score_model or ""
            for call_model, snapshot, _, score_model, *_ in rows
            if any(
                name is not None and in_scope(scope, name, None)
                for name in (call_model, snapshot, score_model)
            )
        }
    for call_model, snapshot, call_feature, score_model, score_feature, *sums in rows:
        model = call_model or score_model or ""
        if wanted is not None and model not in wanted:
            continue
        if kind != "model" and not in_scope(scope, model, call_feature or score_feature):
            continue
        count, total, first, last = int(sums[0]), float(sums[1] or 0), utc(sums[2]), utc(sums[3])
        key = (model, snapshot or "")
        group = groups.get(key)
        if group is None:
            groups[key] = Quality(model, snapshot or "", count, total, first, last)
        else:
            group.scores += count
            group.score_sum += total
            group.first_seen = min(group.first_seen, first)
            group.last_seen = max(group.last_seen, last)
    return list(groups.values())


# --- the worst calls' traces ---------------------------------------------------------------------

# Why a call is among the worst: the calls each diagnosis question ranks first.
WORST_ORDERS = ("slowest", "failed", "rate_limited", "costliest")
# Calls read per question to find a few of distinct traces within the scope.
TRACE_CANDIDATES = 50


@dataclass
class Traced:
    trace_id: str
    model: str
    status: str
    latency_ms: float
    cost_usd: float | None


def _scope_prefilter(scope: str) -> ColumnElement[bool]:
    """A condition every call in `scope` meets, so that the candidates read are the scope's:
    the scope's name as a LIKE pattern, each `_` (what `scope_name` puts for an odd character)
    any one character; `in_scope` then decides on the raw names."""
    kind, _, value = scope.partition(":")
    column = {"model": _calls.model, "feature": _calls.feature}.get(kind)
    if scope == "global" or column is None:
        return true()
    # A name cut at SCOPE_NAME_MAX stands for every name that begins with it.
    pattern: ColumnElement[bool] = column.like(
        value + ("%" if len(value) >= SCOPE_NAME_MAX else "")
    )
    return pattern


def _traced(
    engine: Engine, query: Any, scope: str, limit: int, *, check_scope: bool = True
) -> list[Traced]:
    found: list[Traced] = []
    seen: set[str] = set()
    with engine.connect() as connection:
        for trace_id, model, feature, status, latency_ms, cost_usd in connection.execute(query):
            if trace_id in seen or (check_scope and not in_scope(scope, model, feature)):
                continue
            seen.add(trace_id)
            found.append(Traced(trace_id, model, status, float(latency_ms), cost_usd))
            if len(found) >= limit:
                break
    return found


_TRACED_COLUMNS = (
    _calls.trace_id,
    _calls.model,
    _calls.feature,
    _calls.status,
    _calls.latency_ms,
    _calls.cost_usd,
)


def worst_calls(
    engine: Engine,
    window: Window,
    scope: str,
    why: str,
    match: Mapping[str, str | None] | None = None,
    limit: int = 3,
) -> list[Traced]:
    """The worst calls in the window and scope that carry a trace id, one per trace, at most
    `limit`: the slowest, the latest failed or rate-limited, or the costliest. `match`: columns
    the calls have exactly (None: not set), e.g. an error group's model and status."""
    conditions: list[ColumnElement[bool]] = [
        window.all_rows(),
        _calls.trace_id.is_not(None),
        _scope_prefilter(scope),
        *(_calls[name].is_not_distinct_from(value) for name, value in (match or {}).items()),
    ]
    if why == "slowest":
        order = [_calls.latency_ms.desc(), _calls.ts.desc()]
    elif why == "failed":
        conditions.append(_calls.status != "success")
        order = [_calls.ts.desc()]
    elif why == "rate_limited":
        conditions.append(_calls.status == "rate_limited")
        order = [_calls.ts.desc()]
    elif why == "costliest":
        conditions.append(_calls.cost_usd.is_not(None))
        order = [_calls.cost_usd.desc(), _calls.ts.desc()]
    else:
        raise ValueError(f"why: one of {', '.join(WORST_ORDERS)}")
    query = select(*_TRACED_COLUMNS).where(*conditions).order_by(*order).limit(TRACE_CANDIDATES)
    return _traced(engine, query, scope, limit)


def lowest_scored_calls(
    engine: Engine, window: Window, scope: str, model: str, response_model: str, limit: int = 3
) -> list[Traced]:
    """The calls of a requested model and answering snapshot ("" for none) scored lowest in the
    window, that carry a trace id, one per trace. The quality group was chosen by scope already
    (a model scope may name the snapshot): only a feature scope is checked again."""
    query = (
        select(*_TRACED_COLUMNS)
        .select_from(_scores_table.join(_calls_table, _calls.call_id == _scores.call_id))
        .where(
            _scores.ts > window.start,
            _scores.ts <= window.end,
            _calls.trace_id.is_not(None),
            _calls.model == model,
            func.coalesce(_calls.response_model, "") == response_model,
        )
        .order_by(_scores.score, _scores.ts.desc())
        .limit(TRACE_CANDIDATES)
    )
    feature_scope = scope.partition(":")[0] == "feature"
    return _traced(engine, query, scope, limit, check_scope=feature_scope)
