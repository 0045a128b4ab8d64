"""domain.runway (pure): the daily budget's runway counting the reset at midnight UTC, a rate
quota's runway on its trend, and how both read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from domain.runway import (
    DAY,
    HORIZON_SECONDS,
    HOUR,
    budget_runway,
    describe,
    in_sight,
    next_reset,
    rate_runway,
)

MIN = 60.0


def at(hh: int, mm: int = 0, ss: int = 0) -> datetime:
    return datetime(2026, 3, 10, hh, mm, ss, tzinfo=UTC)


MIDNIGHT = datetime(2026, 3, 11, tzinfo=UTC)

# (case, now, limit, spent, burn $/h, seconds left or None, runs out before the reset)
BUDGET_CASES = [
    ("noon, half spent: the rest lasts 5 h", at(12), 500, 250, 50, 5 * HOUR, True),
    ("noon, slow burn: today outlasts the day", at(12), 500, 250, 10, None, False),
    ("23:30, 95 % spent, fast burn: out in 15 min", at(23, 30), 500, 475, 100, 15 * MIN, True),
    (
        "23:30, 95 % spent, 40 $/h: resets first, tomorrow's 500 last 12.5 h",
        at(23, 30),
        500,
        475,
        40,
        30 * MIN + 12.5 * HOUR,
        False,
    ),
    ("23:30, 95 % spent, 10 $/h: resets first, never", at(23, 30), 500, 475, 10, None, False),
    ("23:30, 95 % spent, out exactly at midnight", at(23, 30), 500, 475, 50, 30 * MIN, True),
    ("just after midnight, 25 $/h: out at 20:00:30", at(0, 0, 30), 500, 0, 25, 20 * HOUR, True),
    ("just after midnight, 20 $/h: 500 $ outlast the day", at(0, 0, 30), 500, 0, 20, None, False),
    ("exactly midnight: a whole day ahead", at(0), 240, 0, 10, 24 * HOUR, True),
    (
        "23:00, 80 % spent, 20 $/h: resets first, and 480 $ a day never reach 500",
        at(23),
        500,
        400,
        20,
        None,
        False,
    ),
    ("no burn", at(12), 500, 100, 0, None, False),
    ("a negative burn is no burn", at(12), 500, 100, -5, None, False),
    ("over budget: now", at(12), 500, 600, 30, 0.0, True),
    ("exactly at the budget: now", at(12), 500, 500, 0, 0.0, True),
    ("no budget: now", at(12), 0, 0, 1, 0.0, True),
]


@pytest.mark.parametrize(
    ("now", "limit", "spent", "burn", "seconds", "before_reset"),
    [case[1:] for case in BUDGET_CASES],
    ids=[case[0] for case in BUDGET_CASES],
)
def test_budget_runway(
    now: datetime,
    limit: float,
    spent: float,
    burn: float,
    seconds: float | None,
    before_reset: bool,
) -> None:
    runway = budget_runway(limit, spent, burn, now)
    if seconds is None:
        assert runway.seconds_left is None
        assert runway.exhausted_at(now) is None
    else:
        assert runway.seconds_left == pytest.approx(seconds)
        exhausted = runway.exhausted_at(now)
        assert exhausted is not None
        assert exhausted == pytest.approx(now + timedelta(seconds=seconds), abs=timedelta(0))
    assert runway.before_reset is before_reset
    assert runway.resets_at == next_reset(now)
    assert runway.burn_per_hour == max(burn, 0)
    assert runway.remaining == max(limit - spent, 0)
    # Never past the horizon: a number beyond it would be "not in sight".
    assert runway.seconds_left is None or runway.seconds_left <= HORIZON_SECONDS


def test_projected_spend_at_the_reset() -> None:
    runway = budget_runway(500, 475, 40, at(23, 30))
    assert runway.projected_at_reset == pytest.approx(495)
    assert runway.used_ratio == pytest.approx(0.95)
    assert budget_runway(0, 0, 0, at(1)).used_ratio is None


def test_the_reset_is_midnight_utc_whatever_the_zone_of_now() -> None:
    tokyo = timezone(timedelta(hours=9))
    now = at(23, 30).astimezone(tokyo)  # 08:30 the next day in Tokyo
    assert next_reset(now) == MIDNIGHT
    assert next_reset(at(0)) == MIDNIGHT
    assert next_reset(MIDNIGHT - timedelta(microseconds=1)) == MIDNIGHT
    assert budget_runway(500, 475, 100, now).seconds_left == pytest.approx(15 * MIN)


def test_a_runway_found_after_the_reset_stays_within_a_day_of_it() -> None:
    """Whatever the hour and burn, a runway past the reset is tomorrow's budget in its own day
    (a slower burn resets again first): never more than a day beyond the next reset."""
    for hour in range(24):
        for burn in (1, 5, 10, 15, 20, 21, 25, 50, 100, 1000):
            now = at(hour, 17)
            runway = budget_runway(480, 400, burn, now)
            if runway.seconds_left is None:
                assert 480 / burn > 24 or runway.projected_at_reset < 480
                continue
            to_reset = (runway.resets_at - now).total_seconds()
            assert runway.seconds_left <= to_reset + DAY


# (case, limit, recent rate, earlier rate, seconds between, seconds left or None)
RATE_CASES = [
    ("rising: reaches the quota in 2 min", 1000, 800, 600, 120, 120.0),
    ("over the quota: now", 1000, 1200, 600, 120, 0.0),
    ("at the quota: now", 1000, 1000, 1000, 120, 0.0),
    ("flat: not in sight", 1000, 800, 800, 120, None),
    ("falling: not in sight", 1000, 600, 800, 120, None),
    ("no interval: not in sight", 1000, 800, 600, 0, None),
    ("no quota: now", 0, 0, 0, 120, 0.0),
    ("rising too slowly: beyond the horizon", 1_000_000, 10, 9, 120, None),
]


@pytest.mark.parametrize(
    ("limit", "recent", "earlier", "between", "seconds"),
    [case[1:] for case in RATE_CASES],
    ids=[case[0] for case in RATE_CASES],
)
def test_rate_runway(
    limit: float, recent: float, earlier: float, between: float, seconds: float | None
) -> None:
    found = rate_runway(limit, recent, earlier, between)
    if seconds is None:
        assert found is None
    else:
        assert found == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "not in sight"),
        (HORIZON_SECONDS, "not in sight"),
        (HORIZON_SECONDS + 1, "not in sight"),
        (0.0, "now"),
        (-3.0, "now"),
        (20.0, "1 min"),
        (40 * MIN, "40 min"),
        (5.5 * HOUR, "5.5 h"),
        (47 * HOUR, "47.0 h"),
    ],
)
def test_describe(seconds: float | None, text: str) -> None:
    assert describe(seconds) == text


def test_in_sight_is_the_horizon_when_not_in_sight() -> None:
    assert in_sight(None) == HORIZON_SECONDS
    assert in_sight(HORIZON_SECONDS * 3) == HORIZON_SECONDS
    assert in_sight(90.0) == 90.0
