"""Runway (pure): at the recent burn rate, how long until a limit is used up.

Two kinds of limit:
- the daily budget, a sum that starts again at midnight UTC (the stores count "today" from
  there). What is left today lasts `remaining / burn`; if that reaches past the reset, the day
  ends first and tomorrow's full budget is what runs out, `budget / burn` after midnight, if
  it ever does at this rate: only when that is within a day (a burn of at least budget / 24 h
  an hour); a slower burn never exhausts a day's budget before the next reset.
- a rate quota (tokens per minute), which resets every minute: nothing accumulates, so the
  runway is how long until the rate itself reaches the quota on its current trend (a recent
  rate against an earlier one, like Prometheus' predict_linear), 0 once over it.

Beyond the horizon a runway is "not in sight": None here, `HORIZON_SECONDS` where a number is
needed (a rule's signal, a gauge), so that a firing runway rule recovers when the burn stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

HOUR = 3600.0
DAY = 24 * HOUR
HORIZON_SECONDS = 2 * DAY


def next_reset(now: datetime) -> datetime:
    """The next midnight UTC after `now`: when the daily budget starts again."""
    now = now.astimezone(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


@dataclass(frozen=True)
class BudgetRunway:
    limit: float
    spent: float
    burn_per_hour: float
    resets_at: datetime
    # Seconds until the budget runs out at this burn, counting the reset; None: not in sight.
    seconds_left: float | None
    # Spent by the reset at this burn: over `limit` means today's budget runs out first.
    projected_at_reset: float

    @property
    def remaining(self) -> float:
        return max(self.limit - self.spent, 0.0)

    @property
    def used_ratio(self) -> float | None:
        return self.spent / self.limit if self.limit > 0 else None

    def exhausted_at(self, now: datetime) -> datetime | None:
        if self.seconds_left is None:
            return None
        return now + timedelta(seconds=self.seconds_left)

    @property
    def before_reset(self) -> bool:
        """Runs out today, before the budget starts again."""
        return self.projected_at_reset >= self.limit


def budget_runway(limit: float, spent: float, burn_per_hour: float, now: datetime) -> BudgetRunway:
    resets_at = next_reset(now)
    to_reset = (resets_at - now.astimezone(UTC)).total_seconds()
    burn = max(burn_per_hour, 0.0) / HOUR  # per second
    projected = spent + burn * to_reset
    seconds: float | None
    if limit <= 0 or spent >= limit:
        seconds = 0.0
    elif burn == 0:
        seconds = None
    elif (limit - spent) / burn <= to_reset:
        seconds = (limit - spent) / burn
    elif limit / burn <= DAY:  # tomorrow's whole budget runs out within tomorrow
        seconds = to_reset + limit / burn
    else:  # every day resets before its budget is used up: never, at this burn
        seconds = None
    if seconds is not None and seconds > HORIZON_SECONDS:
        seconds = None
    return BudgetRunway(limit, spent, max(burn_per_hour, 0.0), resets_at, seconds, projected)


def rate_runway(
    limit: float, recent_rate: float, earlier_rate: float, seconds_between: float
) -> float | None:
    """Seconds until a rate reaches `limit` on the trend from `earlier_rate` to `recent_rate`
    (measured `seconds_between` apart); 0 when over it now, None when not in sight."""
    if limit <= 0 or recent_rate >= limit:
        return 0.0
    if seconds_between <= 0:
        return None
    slope = (recent_rate - earlier_rate) / seconds_between
    if slope <= 0:
        return None
    seconds = (limit - recent_rate) / slope
    return seconds if seconds <= HORIZON_SECONDS else None


def in_sight(seconds: float | None) -> float:
    """A runway as a number for rules and gauges: the horizon when not in sight."""
    return HORIZON_SECONDS if seconds is None else min(seconds, HORIZON_SECONDS)


def describe(seconds: float | None) -> str:
    """ "40 min", "5.5 h", "now", "not in sight"."""
    if seconds is None or seconds >= HORIZON_SECONDS:
        return "not in sight"
    if seconds <= 0:
        return "now"
    if seconds < HOUR:
        return f"{max(round(seconds / 60), 1)} min"
    return f"{seconds / HOUR:.1f} h"
