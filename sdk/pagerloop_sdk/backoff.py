"""How a `backoff` control retries 429s: full jitter under an exponential ceiling, never
sooner than the server's Retry-After, and not at all when the server asks for longer than a
caller can reasonably be held."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import openai

BACKOFF_BASE = 0.5  # seconds: the jitter ceiling before the first retry, doubling after
BACKOFF_CAP = 20.0
RETRY_AFTER_MAX = 60.0  # a server asking for longer than this gets its 429 passed on


def is_rate_limit(exc: BaseException) -> bool:
    return isinstance(exc, openai.RateLimitError) or getattr(exc, "status_code", None) == 429


def retry_after(exc: BaseException) -> float | None:
    """The wait a 429 asks for, in seconds (Retry-After-Ms, Retry-After seconds or date)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if (millis := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(millis) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def backoff_delay(
    retry: int, asked: float | None, rand: Callable[[], float] = random.random
) -> float | None:
    """Seconds before retry number `retry` (1-based): full jitter over an exponential ceiling,
    never sooner than the server asked; None when the server asks for too long to hold the
    caller."""
    if asked is not None and asked > RETRY_AFTER_MAX:
        return None
    ceiling: float = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** (retry - 1))
    return max(rand() * ceiling, asked or 0.0)
