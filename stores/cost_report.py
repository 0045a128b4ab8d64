"""The cost report's questions to the stores: what a period cost, in total and by group,
against the one before it and against the daily budget, and how fast money and tokens burn now.

Everything but the per-user groups is read from `usage_rollup` (per minute, model, feature,
team and environment): a report reads at most the period's minutes times the combinations of
those in use, however many calls each row sums (a row per minute and combination whether that
minute saw one call or ten thousand).

Users are not a dimension of the rollups: a per-user rollup would hold one row per user and
minute (or day) that user called, which at millions of users is the call log again. `by=user`
is a bounded query over the call log instead (`llm_calls.user_hash`, the period's rows found
through `ix_llm_calls_ts`, grouped, the top N by cost), and its period is at most
`MAX_USER_SPAN` (7 days): its cost grows with the calls in the period, and the previous period
it is compared with doubles that reach.

Periods are whole minutes, the rollup's grain: a period ends with the current minute (the
calls up to now) and starts `span` before that; the previous period is the same number of
minutes just before it. Calls answered from the SDK's response cache (source "cache") never
reached OpenAI and cost nothing upstream: the rollups leave them out (stores.writer), and so
does the per-user query. "Today" is counted from midnight UTC, as the budget detector counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from sqlalchemy import Connection, Engine, case, func, select

from domain import periods
from domain.runway import BudgetRunway, budget_runway, rate_runway
from stores.llm_calls import CACHE_SOURCE, LLMCall, UsageRollup, utc

By = Literal["feature", "team", "model", "user", "environment"]
BY_VALUES: tuple[str, ...] = get_args(By)
NONE_LABEL = "(none)"  # a call without the dimension (stored "" in the rollups, NULL in the log)
ALL_MODELS = "*"  # the tpm_quota key of the global quota

MINUTE = timedelta(minutes=1)
MIN_SPAN = MINUTE
MAX_SPAN = timedelta(days=31)  # the rollups keep 400 days; the previous period doubles the reach
MAX_USER_SPAN = timedelta(days=7)  # a scan of the call log: see the module's docstring
MAX_TOP = 100
DEFAULT_TOP = 10
DEFAULT_SINCE = "24h"
# Tokens per minute, as the detector's `tpm_runway` rule reads them: the rate over its window
# against the rate over the widest window the detector reads (both in whole minutes, the
# current one as far as it went, ending now); the trend runs from centre to centre.
TPM_WINDOWS = (120, 600)

_usage = UsageRollup.__table__.c  # type: ignore[attr-defined]
_calls = LLMCall.__table__.c  # type: ignore[attr-defined]


class PeriodError(ValueError):
    """A `since` the report cannot take; the message says why and what it takes."""


def floor_minute(value: datetime) -> datetime:
    return utc(value).replace(second=0, microsecond=0)


@dataclass(frozen=True)
class Period:
    """Whole minutes [start, end); `end` is the minute after the current one."""

    start: datetime
    end: datetime

    @property
    def span(self) -> timedelta:
        return self.end - self.start

    @property
    def previous(self) -> Period:
        return Period(self.start - self.span, self.start)

    @property
    def days(self) -> float:
        return self.span / timedelta(days=1)

    @classmethod
    def ending(cls, now: datetime, span: timedelta) -> Period:
        end = floor_minute(now) + MINUTE
        return cls(end - span, end)


def max_span(by: str) -> timedelta:
    return MAX_USER_SPAN if by == "user" else MAX_SPAN


def _describe_span(seconds: float) -> str:
    if seconds < 86_400:
        return f"{seconds / 3600:.1f} hours"
    if seconds % 86_400 == 0:
        return f"{seconds // 86_400:.0f} days"
    return f"{seconds / 86_400:.1f} days"


def parse_since(text: str, now: datetime, by: str = "feature") -> Period:
    """The period a `since` names, read by domain.periods (as the call search reads it): a
    duration back from now (`30m`, `24h`, `7d`, `2w`; `120s` too, as long as it is whole minutes)
    or an RFC 3339 time with its UTC offset (floored to its minute). Bounds: at least a minute,
    at most `MAX_SPAN` (31 days), `MAX_USER_SPAN` (7 days) for `by=user`."""
    limit = max_span(by)
    try:
        span = periods.parse_duration(text, limit)
        since = periods.parse_instant(text) if span is None else None
    except periods.TooLongError as exc:
        raise _too_long(by, limit, exc.seconds) from None
    except periods.TimeError as exc:
        raise PeriodError(str(exc)) from None
    if span is not None:
        if span < MIN_SPAN:
            raise PeriodError("the period must be at least a minute (like 30m, 24h, 7d)")
        if span % MINUTE:
            raise PeriodError(
                f"the period is whole minutes (the rollups' grain): {text.strip()} is not"
            )
        period = Period.ending(now, span)
    else:
        assert since is not None
        start = floor_minute(since)
        end = floor_minute(now) + MINUTE
        if start >= end:
            raise PeriodError("must lie in the past")
        period = Period(start, end)
    if period.span > limit:
        raise _too_long(by, limit, period.span.total_seconds())
    return period


def _too_long(by: str, limit: timedelta, seconds: float) -> PeriodError:
    why = " for by=user (a scan of the call log, not of the rollups)" if by == "user" else ""
    return PeriodError(
        f"the period is at most {_describe_span(limit.total_seconds())}{why}; "
        f"this one is {_describe_span(seconds)}"
    )


@dataclass(frozen=True)
class Totals:
    calls: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    unpriced_calls: int = 0  # tokens known but no price: their cost is not in cost_usd

    @property
    def avg_cost_per_call(self) -> float | None:
        return self.cost_usd / self.calls if self.calls else None

    @property
    def cost_per_1k_calls(self) -> float | None:
        return self.cost_usd / self.calls * 1000 if self.calls else None


def change(current: float, previous: float) -> float | None:
    """(current - previous) / previous; None when there was nothing before to compare with."""
    return (current - previous) / previous if previous > 0 else None


@dataclass(frozen=True)
class Group:
    key: str | None  # None: calls without this dimension
    cost_usd: float
    calls: int
    previous_cost_usd: float
    previous_calls: int

    @property
    def label(self) -> str:
        return NONE_LABEL if self.key is None else self.key

    @property
    def avg_cost_per_call(self) -> float | None:
        return self.cost_usd / self.calls if self.calls else None

    @property
    def change(self) -> float | None:
        return change(self.cost_usd, self.previous_cost_usd)


@dataclass(frozen=True)
class Rest:
    """The groups beyond the top N, together."""

    groups: int
    cost_usd: float
    calls: int


@dataclass(frozen=True)
class TokenQuota:
    model: str  # "*": all models together
    quota_tpm: float
    recent_tpm: float
    earlier_tpm: float
    runway_seconds: float | None  # until the recent trend reaches the quota; 0: over it now

    @property
    def used_ratio(self) -> float | None:
        return self.recent_tpm / self.quota_tpm if self.quota_tpm > 0 else None


@dataclass(frozen=True)
class CostReport:
    by: str
    now: datetime
    period: Period
    totals: Totals
    previous_totals: Totals
    groups: list[Group]
    groups_seen: int  # distinct values of the dimension in the period
    rest: Rest
    daily_budget_usd: float
    spent_today_usd: float
    burn_window_seconds: float  # the whole minutes the burn rate is measured over
    burn_window_cost_usd: float
    runway: BudgetRunway
    token_quotas: list[TokenQuota]

    @property
    def change(self) -> float | None:
        return change(self.totals.cost_usd, self.previous_totals.cost_usd)

    @property
    def remaining_today_usd(self) -> float:
        return max(self.daily_budget_usd - self.spent_today_usd, 0.0)

    @property
    def percent_used_today(self) -> float | None:
        if self.daily_budget_usd <= 0:
            return None
        return self.spent_today_usd / self.daily_budget_usd * 100

    @property
    def period_budget_usd(self) -> float:
        """The daily budget times the period's length in days (7 d: 7 x; 1 h: 1/24)."""
        return self.daily_budget_usd * self.period.days

    @property
    def period_percent_used(self) -> float | None:
        budget = self.period_budget_usd
        return self.totals.cost_usd / budget * 100 if budget > 0 else None

    @property
    def burn_usd_per_hour(self) -> float:
        return self.runway.burn_per_hour

    def share(self, cost_usd: float) -> float | None:
        return cost_usd / self.totals.cost_usd if self.totals.cost_usd > 0 else None


def cost_report(
    engine: Engine,
    *,
    now: datetime,
    period: Period,
    by: str = "feature",
    top: int = DEFAULT_TOP,
    daily_budget_usd: float,
    burn_window_seconds: float,
    tpm_quota: Mapping[str, float] | None = None,
    tpm_windows: tuple[float, float] = TPM_WINDOWS,
) -> CostReport:
    """The report for `period`, grouped `by` one of BY_VALUES (top `top` groups by cost)."""
    if by not in BY_VALUES:
        raise ValueError(f"by must be one of {', '.join(BY_VALUES)}")
    if not 1 <= top <= MAX_TOP:
        raise ValueError(f"top must be 1..{MAX_TOP}")
    if period.span > max_span(by):
        raise PeriodError(
            f"the period is at most {_describe_span(max_span(by).total_seconds())} for by={by}"
        )
    now = utc(now)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    burn_start = floor_minute(now - timedelta(seconds=burn_window_seconds))
    with engine.connect() as connection:
        totals = _rollup_totals(connection, period.start, period.end)
        previous_totals = _rollup_totals(connection, period.previous.start, period.start)
        if by == "user":
            groups, seen = _user_groups(connection, period, top)
        else:
            groups, seen = _rollup_groups(connection, by, period, top)
        spent_today = _rollup_cost(connection, midnight, period.end)
        burn_cost = _rollup_cost(connection, burn_start, period.end)
        quotas = _token_quotas(connection, now, dict(tpm_quota or {}), tpm_windows)
    elapsed = max((now - burn_start).total_seconds(), 1.0)
    burn_per_hour = burn_cost / elapsed * 3600
    listed_cost = sum(g.cost_usd for g in groups)
    listed_calls = sum(g.calls for g in groups)
    return CostReport(
        by=by,
        now=now,
        period=period,
        totals=totals,
        previous_totals=previous_totals,
        groups=groups,
        groups_seen=seen,
        rest=Rest(
            groups=max(seen - len(groups), 0),
            cost_usd=max(totals.cost_usd - listed_cost, 0.0),
            calls=max(totals.calls - listed_calls, 0),
        ),
        daily_budget_usd=daily_budget_usd,
        spent_today_usd=spent_today,
        burn_window_seconds=elapsed,
        burn_window_cost_usd=burn_cost,
        runway=budget_runway(daily_budget_usd, spent_today, burn_per_hour, now),
        token_quotas=quotas,
    )


# --- the queries -------------------------------------------------------------------------


def _in(column: Any, start: datetime, end: datetime) -> Any:
    return (column >= start) & (column < end)


def _rollup_totals(connection: Connection, start: datetime, end: datetime) -> Totals:
    row = connection.execute(
        select(
            func.sum(_usage.calls),
            func.sum(_usage.cost_usd),
            func.sum(_usage.input_tokens),
            func.sum(_usage.output_tokens),
            func.sum(_usage.unpriced_calls),
        ).where(_in(_usage.minute, start, end))
    ).one()
    return Totals(
        calls=int(row[0] or 0),
        cost_usd=float(row[1] or 0.0),
        input_tokens=int(row[2] or 0),
        output_tokens=int(row[3] or 0),
        unpriced_calls=int(row[4] or 0),
    )


def _rollup_cost(connection: Connection, start: datetime, end: datetime) -> float:
    found = connection.execute(
        select(func.sum(_usage.cost_usd)).where(_in(_usage.minute, start, end))
    ).scalar_one()
    return float(found or 0.0)


def _ranked(
    connection: Connection, key: Any, cost: Any, count: Any, where: Any, top: int
) -> tuple[list[tuple[Any, float, int]], int]:
    """The top groups of `key` by cost (then calls, then key), and how many groups there are."""
    total_cost = func.sum(cost)
    query = (
        select(key, total_cost, count, func.count().over())
        .where(where)
        .group_by(key)
        .order_by(total_cost.desc(), count.desc(), key)
        .limit(top)
    )
    rows = connection.execute(query).all()
    seen = int(rows[0][3]) if rows else 0
    return [(row[0], float(row[1] or 0.0), int(row[2] or 0)) for row in rows], seen


def _previous(
    connection: Connection, key: Any, cost: Any, count: Any, where: Any, keys: Sequence[Any]
) -> dict[Any, tuple[float, int]]:
    if not keys:
        return {}
    present = [k for k in keys if k is not None]
    matches = key.in_(present) if present else None
    if None in keys:
        matches = key.is_(None) if matches is None else matches | key.is_(None)
    rows = connection.execute(
        select(key, func.sum(cost), count).where(where & matches).group_by(key)
    ).all()
    return {row[0]: (float(row[1] or 0.0), int(row[2] or 0)) for row in rows}


def _groups(
    connection: Connection,
    key: Any,
    cost: Any,
    calls: Any,
    period: Period,
    within: Callable[[datetime, datetime], Any],
    top: int,
) -> tuple[list[Group], int]:
    """The top groups of the period by cost, each with its sums in the period before; `within`
    is the rows' condition for a time range. A missing dimension ("" in the rollups, NULL in
    the call log) is the key None."""
    ranked, seen = _ranked(connection, key, cost, calls, within(period.start, period.end), top)
    before = _previous(
        connection,
        key,
        cost,
        calls,
        within(period.previous.start, period.start),
        [name for name, _, _ in ranked],
    )
    return [
        Group(
            key=name or None,
            cost_usd=cost_usd,
            calls=count,
            previous_cost_usd=before.get(name, (0.0, 0))[0],
            previous_calls=before.get(name, (0.0, 0))[1],
        )
        for name, cost_usd, count in ranked
    ], seen


def _rollup_groups(
    connection: Connection, by: str, period: Period, top: int
) -> tuple[list[Group], int]:
    def within(start: datetime, end: datetime) -> Any:
        return _in(_usage.minute, start, end)

    calls = func.sum(_usage.calls)
    return _groups(connection, _usage[by], _usage.cost_usd, calls, period, within, top)


def _user_groups(connection: Connection, period: Period, top: int) -> tuple[list[Group], int]:
    """The bounded scan of the call log: the period's rows by `ts` (ix_llm_calls_ts), those
    that reached OpenAI, grouped by user pseudonym."""

    def within(start: datetime, end: datetime) -> Any:
        return _in(_calls.ts, start, end) & (_calls.source != CACHE_SOURCE)

    cost = func.coalesce(_calls.cost_usd, 0.0)
    return _groups(connection, _calls.user_hash, cost, func.count(), period, within, top)


def _token_quotas(
    connection: Connection,
    now: datetime,
    quotas: dict[str, float],
    windows: tuple[float, float],
) -> list[TokenQuota]:
    """Each configured quota's tokens per minute over the recent window against the wide one,
    and when that trend reaches the quota (domain.runway.rate_runway), as `tpm_runway` sees it."""
    if not quotas:
        return []
    recent_start = floor_minute(now - timedelta(seconds=windows[0]))
    earlier_start = floor_minute(now - timedelta(seconds=max(windows)))
    recent_seconds = max((now - recent_start).total_seconds(), 1.0)
    earlier_seconds = max((now - earlier_start).total_seconds(), 1.0)
    between = (earlier_seconds - recent_seconds) / 2  # from centre to centre
    tokens = _usage.input_tokens + _usage.output_tokens
    recent_part = _usage.minute >= recent_start
    rows = connection.execute(
        select(
            _usage.model,
            func.sum(case((recent_part, tokens), else_=0)),
            func.sum(tokens),
        )
        .where(_in(_usage.minute, earlier_start, floor_minute(now) + MINUTE))
        .group_by(_usage.model)
    ).all()
    by_model = {str(row[0]): (int(row[1] or 0), int(row[2] or 0)) for row in rows}
    found = []
    for model, quota in sorted(quotas.items(), key=lambda item: (item[0] != ALL_MODELS, item[0])):
        if model == ALL_MODELS:
            recent = sum(r for r, _ in by_model.values())
            earlier = sum(e for _, e in by_model.values())
        else:
            recent, earlier = by_model.get(model, (0, 0))
        recent_tpm = recent / (recent_seconds / 60)
        earlier_tpm = earlier / (earlier_seconds / 60)
        found.append(
            TokenQuota(
                model=model,
                quota_tpm=float(quota),
                recent_tpm=recent_tpm,
                earlier_tpm=earlier_tpm,
                runway_seconds=rate_runway(float(quota), recent_tpm, earlier_tpm, between),
            )
        )
    return found
