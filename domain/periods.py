"""Points in time as operators type them (pure): a duration back from now or an RFC 3339 time.

One parser for every reader of the stores that takes a `since` / `until` (the call search, the
cost report): durations `90s`, `30m`, `1h`, `7d`, `2w` (a whole number, then one of s m h d w)
and RFC 3339 times **with their UTC offset** (`2026-12-01T10:00:00Z`, `...+01:00`). A time
without an offset is refused rather than guessed: the same words would name a different hour for
an operator in another time zone. Each reader applies its own rules on top (the cost report:
whole minutes, a longest period).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
MAX_LOOKBACK = timedelta(days=3_650)
_DURATION = re.compile(r"^(\d{1,9})([smhdw])$")
EXPECTED = (
    "a duration back from now (90s, 30m, 1h, 7d, 2w) or an RFC 3339 time with its UTC offset "
    "(2026-12-01T10:00:00Z)"
)


class TimeError(ValueError):
    """A time that cannot be read; the message says what is taken."""


class TooLongError(TimeError):
    """A duration longer than the reader takes."""

    def __init__(self, seconds: int, longest: timedelta) -> None:
        days = longest / timedelta(days=1)
        super().__init__(f"at most {days:g} days back")
        self.seconds = seconds
        self.longest = longest


def parse_duration(text: str, longest: timedelta = MAX_LOOKBACK) -> timedelta | None:
    """`90s`, `30m`, `1h`, `7d`, `2w` as a timedelta; None when `text` is not a duration;
    TooLongError past `longest` (checked before any arithmetic: `999999999w` has no date)."""
    found = _DURATION.match(text.strip())
    if found is None:
        return None
    seconds = int(found.group(1)) * UNIT_SECONDS[found.group(2)]
    if seconds > longest.total_seconds():
        raise TooLongError(seconds, longest)
    return timedelta(seconds=seconds)


def parse_instant(text: str) -> datetime:
    """An RFC 3339 time with its offset, in UTC. TimeError without an offset, or out of range."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TimeError(EXPECTED) from None
    if at.tzinfo is None:
        raise TimeError(
            f"{text.strip()!r} has no UTC offset: add Z for UTC, or the offset (+01:00)"
        )
    try:
        return at.astimezone(UTC)
    except (OverflowError, ValueError):  # year 1 at +14:00 has no UTC time
        raise TimeError("out of range") from None


def parse_time(text: str, now: datetime, longest: timedelta = MAX_LOOKBACK) -> datetime:
    """A duration back from `now` or an RFC 3339 time with its offset, in UTC (TimeError)."""
    duration = parse_duration(text, longest)
    if duration is not None:
        return now.astimezone(UTC) - duration
    return parse_instant(text)
