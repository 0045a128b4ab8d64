"""The detectors' questions to the stores: per-scope sums for a window, read from the rollups, so
the cost follows the window's length, never the history's.

Each dimension (model, feature) keeps its busiest names (by calls and quality scores in the
window) as scopes of their own, up to `max_scopes`, and folds the rest into `<kind>:(other)`
inside the query (CASE WHEN name IN (:top) THEN name ELSE '(other)' END): the answer has at
most 1 + 2 * (max_scopes + 1) scopes whatever the number of distinct names, which keeps the
detector's activity result far below Temporal's 2 MB payload limit. Each table is read once
for both dimensions, grouped by (model key, feature key); the scopes are summed from those.

Rules with windows of their own (2, 5, 10 minutes) are answered by the same read: the widest
window is ranked, folded and scanned once, each row grouped also by the narrowest window it
falls in (a band), and each window is the sum of the bands inside it. Latency histograms, most
of a result's bytes, are summed only for the windows whose rules read them.

Quality baselines set by hand (stores.quality_baselines) come with the feature scopes they are
set for: the drift rule reads them there instead of the rolling sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select, case, func, literal, select, union_all

from domain.aggregates import Aggregate, FoldedInfo, WindowAggregates, WindowSums
from domain.scopes import (
    DIMENSIONS,
    GLOBAL,
    OTHER,
    SCOPE_NAME_MAX,
    folded_scope,
    kind_of,
    scope_name,
)
from domain.usage import SIGNAL_COUNTERS
from stores.llm_calls import LatencyRollup, UsageRollup, utc
from stores.quality import QualityRollup, QualityScore
from stores.quality_baselines import by_scope as baselines_by_scope

DEFAULT_MAX_SCOPES = 50

_usage = UsageRollup.__table__.c  # type: ignore[attr-defined]
_latency = LatencyRollup.__table__.c  # type: ignore[attr-defined]
_scores = QualityScore.__table__.c  # type: ignore[attr-defined]
_hourly = QualityRollup.__table__.c  # type: ignore[attr-defined]


def _floor_minute(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


def window_aggregates(
    engine: Engine,
    end: datetime,
    window_seconds: int,
    baseline_days: int = 7,
    *,
    max_scopes: int = DEFAULT_MAX_SCOPES,
    keep: Sequence[str] = (),
    per_scope: bool = True,
    windows: Sequence[int] = (),
    latency_windows: Sequence[int] | None = None,
) -> WindowAggregates:
    """Every minute that overlaps (end - window, end): the last window_seconds, counted in whole
    minutes (the current minute included), per scope.

    `keep` names scopes (`feature:checkout`) that take the first of the `max_scopes` places
    when they have calls in the window, ahead of busier names: a firing scope stays measured
    until it recovers, instead of vanishing into `(other)` while its incident is open.

    `windows`: narrower lengths (seconds, at most `window_seconds`) read in the same scan; the
    result's `windows` holds the same scopes' sums over each (`WindowAggregates.over`). The
    quality baseline is the one of the widest window (the 7 days before its first hour) for
    all; a feature scope with a baseline set by hand carries it (the result's `baselines`).
    `latency_windows`: the lengths whose latency histograms are summed (None: all).

    `per_scope=False` answers in the per-cell shape (folded too) that detector runs begun
    before the folding read: they stay consistent while workers of both versions run."""
    end = utc(end)
    narrower = sorted({int(s) for s in windows if int(s) != window_seconds})
    if narrower and (not per_scope or narrower[-1] > window_seconds):
        raise ValueError(f"narrower windows than {window_seconds}s, per scope, not {narrower}")
    lengths = [*narrower, window_seconds]  # band i: rows in window i and not in a narrower one
    first_minute = _floor_minute(end - timedelta(seconds=window_seconds))
    window = _Window(
        first_minute=first_minute,
        end=end,
        start=end - timedelta(seconds=window_seconds),
        baseline_since=end - timedelta(days=baseline_days),
        bands=tuple(
            (_floor_minute(end - timedelta(seconds=s)), end - timedelta(seconds=s))
            for s in narrower
        ),
        latency_bands=len(lengths)
        if latency_windows is None
        else 1 + max((i for i, s in enumerate(lengths) if s in latency_windows), default=-1),
    )
    midnight = end.replace(hour=0, minute=0, second=0, microsecond=0)
    today_query = select(func.coalesce(func.sum(_usage.cost_usd), 0.0)).where(
        _usage.minute >= midnight, _usage.minute < end
    )
    with engine.connect() as connection:
        tops = {
            kind: _top(
                connection, kind, window, max_scopes, _pinned(connection, kind, window, keep)
            )
            for kind in DIMENSIONS
        }
        bands = _folded_cells(connection, window, tops["model"].names, tops["feature"].names)
        cost_today = float(connection.execute(today_query).scalar_one())
        set_by_hand = baselines_by_scope(connection) if per_scope else {}
    summed = _windows(bands, lengths, latency_windows)
    cells = summed[window_seconds]
    by_scope = _scopes(cells)
    if not per_scope:  # the shape detector code from before the folding reads
        nested: dict[str, dict[str, Aggregate]] = {}
        for (model, feature), cell in cells.items():
            nested.setdefault(model, {})[feature] = cell
        return WindowAggregates(
            end=end,
            window_seconds=(end - first_minute).total_seconds(),
            cells=nested,
            cost_today_usd=cost_today,
        )
    folded = {
        kind: FoldedInfo(
            values=top.seen - len(top.names),
            calls=by_scope[folded_scope(kind)].calls if folded_scope(kind) in by_scope else 0,
            top=max_scopes,
        )
        for kind, top in tops.items()
        if top.seen > len(top.names)
    }
    return WindowAggregates.of_scopes(
        end,
        (end - first_minute).total_seconds(),
        by_scope,
        cost_today,
        folded,
        {
            seconds: WindowSums.of_scopes(
                (end - _floor_minute(end - timedelta(seconds=seconds))).total_seconds(),
                _scopes(summed[seconds]),
            )
            for seconds in narrower
        },
        # Only the scopes of this result: the payload stays bounded by the fold.
        {scope: baseline for scope, baseline in set_by_hand.items() if scope in by_scope},
    )


Cells = dict[tuple[str, str], Aggregate]


def _windows(
    bands: list[Cells], lengths: list[int], latency_windows: Sequence[int] | None
) -> dict[int, Cells]:
    """Each window's cells: the sums of the bands inside it (band i and the narrower ones),
    without latency histograms where they are not asked for. The baseline is not additive:
    every window has the widest's (kept in band 0)."""
    if len(lengths) == 1 and (latency_windows is None or lengths[0] in latency_windows):
        return {lengths[0]: bands[0]}  # one window, as read
    found: dict[int, Cells] = {}
    running: Cells = {}
    for index, seconds in enumerate(lengths):
        for key, cell in bands[index].items():
            running.setdefault(key, Aggregate()).add(cell)
        histograms = latency_windows is None or seconds in latency_windows
        found[seconds] = {
            key: replace(cell, latency_histogram=dict(cell.latency_histogram) if histograms else {})
            for key, cell in running.items()
        }
    return found


def _scopes(cells: dict[tuple[str, str], Aggregate]) -> dict[str, Aggregate]:
    by_scope: dict[str, Aggregate] = {GLOBAL: Aggregate()}
    for (model, feature), cell in cells.items():
        by_scope[GLOBAL].add(cell)
        for kind, key in (("model", model), ("feature", feature)):
            if key == "":  # a feature-less call: global and its model only
                continue
            name = folded_scope(kind) if key == OTHER else scope_name(kind, key)
            by_scope.setdefault(name, Aggregate()).add(cell)
    return by_scope


@dataclass(frozen=True)
class _Window:
    first_minute: datetime  # the rollups' minutes from here ...
    end: datetime  # ... to here
    start: datetime  # quality scores after this
    baseline_since: datetime  # the quality baseline's first hour
    # The narrower windows, narrowest first: (first minute, start) of each. A row falls in the
    # band of the narrowest window holding it; the rest of the widest window is the last band.
    bands: tuple[tuple[datetime, datetime], ...] = ()
    latency_bands: int = 1  # the histograms of bands from 0 up to here are summed


@dataclass(frozen=True)
class _Top:
    names: list[str]  # the names with scopes of their own
    seen: int  # distinct names in the window


def _pinned(connection: Connection, kind: str, w: _Window, keep: Sequence[str]) -> list[str]:
    """The names the kept scopes were made of. scope_name() turns each odd character into `_`,
    which LIKE reads as any one character: the names that match and make the same scope are
    the ones (a name cut at its 140th character matches as a prefix). A scope without `_`
    is its name."""
    names: list[str] = []
    for scope in keep:
        if kind_of(scope) != kind or scope == folded_scope(kind):
            continue
        name = scope.partition(":")[2]
        if "_" not in name and len(name) < SCOPE_NAME_MAX:
            names.append(name)  # the name it was made of, as it is
            continue
        pattern = name + ("%" if len(name) >= SCOPE_NAME_MAX else "")
        column = _usage[kind]
        candidates = connection.execute(
            select(column)
            .where(_usage.minute >= w.first_minute, _usage.minute < w.end, column.like(pattern))
            .distinct()
            .limit(_LIKE_CANDIDATES)
        ).scalars()
        names += [str(raw) for raw in candidates if scope_name(kind, str(raw)) == scope]
    return names


# Raw names tried for one cleaned-up scope name (distinct names that clean up alike are few).
_LIKE_CANDIDATES = 50


def _top(connection: Connection, kind: str, w: _Window, limit: int, pinned: list[str]) -> _Top:
    """The names that get a scope of their own: the pinned ones with calls, then by volume in
    the window (calls, and quality scores: a model judged only by feedback still counts)."""
    volumes = union_all(
        select(_usage[kind].label("name"), _usage.calls.label("volume")).where(
            _usage.minute >= w.first_minute, _usage.minute < w.end
        ),
        select(func.coalesce(_scores[kind], "").label("name"), literal(1).label("volume")).where(
            _scores.ts > w.start, _scores.ts <= w.end
        ),
    ).subquery()
    name = volumes.c.name
    first = [case((name.in_(pinned), 0), else_=1)] if pinned else []
    query = (
        select(name, func.count().over())  # over the groups: every distinct name
        .where(name != "")
        .group_by(name)
        .order_by(*first, func.sum(volumes.c.volume).desc(), name)
        .limit(limit + 1)
    )
    rows = connection.execute(query).all()
    # A name spelled "(other)" would merge with the fold: it folds.
    names = [str(row[0]) for row in rows if row[0] != OTHER][:limit]
    return _Top(names, int(rows[0][1]) if rows else 0)


def _keys(model: Any, feature: Any, models: list[str], features: list[str]) -> list[Any]:
    """(model key, feature key): the name when it is a top one, "" for no feature, else OTHER."""
    m, f = func.coalesce(model, ""), func.coalesce(feature, "")
    return [
        case((m.in_(models), m), else_=literal(OTHER)).label("model_key"),
        case((f.in_(features), f), (f == "", ""), else_=literal(OTHER)).label("feature_key"),
    ]


def _grouped(
    inner: Select[Any], keys: tuple[str, ...], sums: Callable[[Any], list[Any]]
) -> Select[Any]:
    """Group by the keys in an outer query: PostgreSQL does not see two CASE expressions with
    their own bound parameters as the same, so GROUP BY CASE ... would not do."""
    columns = inner.subquery().c
    by = [columns.model_key, columns.feature_key, *(columns[name] for name in keys)]
    return select(*by, *sums(columns)).group_by(*by)


def _band(column: Any, edges: list[datetime], strict: bool) -> Any:
    """Which band a row's time falls in: 0 in the narrowest window, ..., len(edges) in the
    widest only (`strict`: a window holds times after its edge, else from it on)."""
    if not edges:
        return literal(0).label("band")
    whens = [((column > edge) if strict else (column >= edge), i) for i, edge in enumerate(edges)]
    return case(*whens, else_=literal(len(edges))).label("band")


def _folded_cells(
    connection: Connection, w: _Window, models: list[str], features: list[str]
) -> list[Cells]:
    """Sums per band and (model key, feature key): at most (models + 1) * (features + 2) cells
    a band, each scanned table read once for both dimensions and every window."""
    bands: list[Cells] = [{} for _ in range(len(w.bands) + 1)]
    minutes = [first_minute for first_minute, _ in w.bands]
    starts = [start for _, start in w.bands]

    def at(band: int, model: str, feature: str) -> Aggregate:
        return bands[int(band)].setdefault((model, feature), Aggregate())

    usage = _grouped(
        select(
            *_keys(_usage.model, _usage.feature, models, features),
            _band(_usage.minute, minutes, strict=False),
            *_usage_sums(),
        ).where(_usage.minute >= w.first_minute, _usage.minute < w.end),
        ("band",),
        lambda c: [func.sum(c[n]) for n in SIGNAL_COUNTERS],
    )
    # The histograms of the windows that need them: the bands up to the widest of those.
    widest_latency = w.latency_bands - 1
    latency_from = minutes[widest_latency] if 0 <= widest_latency < len(w.bands) else w.first_minute
    latency = _grouped(
        select(
            *_keys(_latency.model, _latency.feature, models, features),
            _band(_latency.minute, minutes, strict=False),
            _latency.bucket,
            _latency.calls,
        ).where(_latency.minute >= latency_from, _latency.minute < w.end),
        ("band", "bucket"),
        lambda c: [func.sum(c.calls)],
    )
    quality = _grouped(
        select(
            *_keys(_scores.model, _scores.feature, models, features),
            _band(_scores.ts, starts, strict=True),
            _scores.score,
        ).where(_scores.ts > w.start, _scores.ts <= w.end),
        ("band",),
        lambda c: [func.count(), func.sum(c.score)],
    )
    baseline = _grouped(
        select(
            *_keys(_hourly.model, _hourly.feature, models, features),
            _hourly.scores,
            _hourly.score_sum,
            _hourly.score_sumsq,
        ).where(
            _hourly.hour >= w.baseline_since,
            _hourly.hour < w.start.replace(minute=0, second=0, microsecond=0),
        ),
        (),
        lambda c: [func.sum(c.scores), func.sum(c.score_sum), func.sum(c.score_sumsq)],
    )
    for model, feature, band, *values in connection.execute(usage):
        target = at(band, model, feature)
        for name, value in zip(SIGNAL_COUNTERS, values, strict=True):
            setattr(target, name, type(getattr(target, name))(value or 0))
    if w.latency_bands:
        for model, feature, band, bucket, calls in connection.execute(latency):
            at(band, model, feature).latency_histogram[int(bucket)] = int(calls)
    for model, feature, band, count, total in connection.execute(quality):
        at(band, model, feature).quality_count = int(count)
        at(band, model, feature).quality_sum = float(total or 0)
    for model, feature, count, total, squares in connection.execute(baseline):
        target = at(0, model, feature)  # every window's (each sums band 0)
        target.baseline_count = int(count or 0)
        target.baseline_sum = float(total or 0)
        target.baseline_sumsq = float(squares or 0)
    return bands


def _usage_sums() -> list[Any]:
    return [_usage[name] for name in SIGNAL_COUNTERS]
