"""Quality baselines set by hand, one per feature (`pagerloop quality baseline ...`): the drift
rule of a `feature:` scope compares its recent mean with this one instead of the rolling 7 days,
until it is cleared (the seed's `set_baseline`).

A baseline is typed in (mean and standard deviation) or measured once from the hourly quality
rollups over a window (`from_window`): a fixed reference, so that a slow slide does not become
its own baseline, or one for a feature too new to have 7 days of scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Column, Connection, DateTime, Engine, delete, func, select
from sqlmodel import Field, SQLModel

from domain.baselines import BASELINE_MIN_SCORES, TYPED_IN, QualityBaseline, mean_and_stddev
from domain.scopes import scope_name
from stores import dialect
from stores.llm_calls import BIG, utc
from stores.quality import QualityRollup

FEATURE_MAX = 128  # as the quality scores' feature column
SOURCE_MAX = 64
SET_BY_MAX = 128
# A measured baseline reads at most this far back (the hourly rollups are kept longer).
MAX_WINDOW = timedelta(days=90)
MIN_WINDOW = timedelta(hours=1)
# Equal scores summed in floating point leave a spread of rounding errors, not of scores.
MIN_MEASURED_STDDEV = 1e-6


class QualityBaselineRow(SQLModel, table=True):
    __tablename__ = "quality_baselines"

    feature: str = Field(primary_key=True, max_length=FEATURE_MAX)
    mean: float
    stddev: float
    # The scores it was measured from; None when typed in.
    scores: int | None = Field(default=None, sa_type=BIG, nullable=True)
    source: str = Field(max_length=SOURCE_MAX)  # "set by hand", "from the last 7d"
    set_by: str = Field(max_length=SET_BY_MAX)
    set_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


_table = QualityBaselineRow.__table__  # type: ignore[attr-defined]
_hourly = QualityRollup.__table__.c  # type: ignore[attr-defined]


class BaselineRefusedError(ValueError):
    """A baseline that cannot be set; `field` names what is wrong (feature, mean, stddev,
    window)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StoredBaseline:
    feature: str
    mean: float
    stddev: float
    scores: int | None
    source: str
    set_by: str
    set_at: datetime

    def baseline(self) -> QualityBaseline:
        return QualityBaseline(self.mean, self.stddev, self.source)


@dataclass(frozen=True)
class MeasuredBaseline:
    mean: float
    stddev: float
    scores: int


def check(feature: str, mean: float, stddev: float) -> None:
    """Scores run from 0 to 1: so does a mean, and a deviation of 0 would make any move an
    infinite drift."""
    if not feature or len(feature) > FEATURE_MAX:
        raise BaselineRefusedError("feature", f"a feature name of 1 to {FEATURE_MAX} characters")
    if not (math.isfinite(mean) and 0.0 <= mean <= 1.0):
        raise BaselineRefusedError("mean", f"mean {mean}: a quality score, from 0 to 1")
    if not (math.isfinite(stddev) and 0.0 < stddev <= 1.0):
        raise BaselineRefusedError(
            "stddev",
            f"stddev {stddev}: above 0 (a deviation of 0 makes any move infinite), at most 1",
        )


def set_baseline(
    engine: Engine,
    feature: str,
    mean: float,
    stddev: float,
    *,
    set_by: str,
    at: datetime,
    scores: int | None = None,
    source: str = TYPED_IN,
) -> StoredBaseline:
    """Set the feature's baseline, replacing any it had (one statement: two people setting one
    at once leave one row)."""
    check(feature, mean, stddev)
    values: dict[str, Any] = {
        "mean": mean,
        "stddev": stddev,
        "scores": scores,
        "source": source[:SOURCE_MAX],
        "set_by": set_by[:SET_BY_MAX],
        "set_at": utc(at),
    }
    statement = (
        dialect.insert(engine)(_table)
        .values(feature=feature, **values)
        .on_conflict_do_update(index_elements=[_table.c.feature], set_=values)
    )
    with engine.begin() as connection:
        connection.execute(statement)
    return StoredBaseline(feature=feature, **values)


def _stored(row: Any) -> StoredBaseline:
    return StoredBaseline(
        feature=row.feature,
        mean=float(row.mean),
        stddev=float(row.stddev),
        scores=None if row.scores is None else int(row.scores),
        source=row.source,
        set_by=row.set_by,
        set_at=utc(row.set_at),
    )


def get(engine: Engine, feature: str) -> StoredBaseline | None:
    with engine.connect() as connection:
        row = connection.execute(select(_table).where(_table.c.feature == feature)).first()
    return None if row is None else _stored(row)


def listed(engine: Engine) -> list[StoredBaseline]:
    with engine.connect() as connection:
        rows = connection.execute(select(_table).order_by(_table.c.feature))
        return [_stored(row) for row in rows]


def clear(engine: Engine, feature: str) -> bool:
    """Back to the rolling baseline; False when the feature had none set."""
    with engine.begin() as connection:
        deleted = connection.execute(delete(_table).where(_table.c.feature == feature)).rowcount
    return bool(deleted)


def by_scope(connection: Connection) -> dict[str, QualityBaseline]:
    """Every baseline set, by the feature scope it applies to (`feature:<name>`, as the
    detector names scopes). Two names that make one scope: the first by name holds it."""
    found: dict[str, QualityBaseline] = {}
    for row in connection.execute(select(_table).order_by(_table.c.feature)):
        stored = _stored(row)
        found.setdefault(scope_name("feature", stored.feature), stored.baseline())
    return found


def for_scope(engine: Engine, scope: str) -> QualityBaseline | None:
    """The baseline set by hand for a `feature:` scope, if any."""
    with engine.connect() as connection:
        return by_scope(connection).get(scope)


def from_window(
    engine: Engine, feature: str, days: float, now: datetime | None = None
) -> MeasuredBaseline:
    """The feature's mean and sample standard deviation over the hourly quality rollups of the
    last `days` days (the hours starting from `now - days` on, the current one included);
    refused with fewer than BASELINE_MIN_SCORES scores, or none apart."""
    window = timedelta(days=days)
    if not MIN_WINDOW <= window <= MAX_WINDOW:
        raise BaselineRefusedError(
            "window", f"a window from {MIN_WINDOW} to {MAX_WINDOW.days} days, not {window}"
        )
    now = utc(now) if now is not None else datetime.now(UTC)
    query = select(
        func.coalesce(func.sum(_hourly.scores), 0),
        func.coalesce(func.sum(_hourly.score_sum), 0.0),
        func.coalesce(func.sum(_hourly.score_sumsq), 0.0),
    ).where(_hourly.feature == feature, _hourly.hour >= now - window, _hourly.hour <= now)
    with engine.connect() as connection:
        count, total, squares = connection.execute(query).one()
    count = int(count)
    if count < BASELINE_MIN_SCORES:
        raise BaselineRefusedError(
            "window",
            f"{count} quality scores for feature {feature!r} in that window: a baseline needs "
            f"at least {BASELINE_MIN_SCORES}",
        )
    mean, stddev = mean_and_stddev(count, float(total), float(squares))
    if stddev < MIN_MEASURED_STDDEV:
        raise BaselineRefusedError(
            "window",
            f"the {count} scores of feature {feature!r} in that window are all {mean:.3f}: no "
            "spread to measure a drift in",
        )
    return MeasuredBaseline(mean=mean, stddev=stddev, scores=count)
