"""The documented bounds of everything a request may send (README: "Limits").

A value past a bound is refused with a 4xx naming it; nothing of its request is stored. The
bounds are what a real OpenAI call can have, with room, and what both stores accept: finite
numbers, integers that fit 64-bit columns with room for a minute's sums, and text without NUL
(PostgreSQL refuses it) or lone surrogates (not encodable as UTF-8).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, Field, PlainValidator, WithJsonSchema

MAX_CALLS_PER_BATCH = 10_000
MAX_FEEDBACK_PER_REQUEST = 1_000
MAX_LATENCY_MS = 24 * 3600 * 1000.0  # a day: longer is a clock error, not a call
MAX_TOKENS = 1_000_000_000  # per call; a minute's sum stays far inside 64 bits
MAX_COST_USD = 10_000.0  # per call; the priciest model on a whole context costs ~$100
MAX_RETRIES = 100
MAX_ERROR_MESSAGE = 10_000  # accepted; the store keeps the first ERROR_MESSAGE_MAX characters
MAX_METADATA_KEYS = 32
MAX_METADATA_VALUE = 512
MAX_INT64 = 2**63 - 1
# Records may arrive late (a spooling client, a replayed export), not from the far past or
# future: older ones would miss every detector window and fall to retention at once.
MAX_RECORD_AGE = timedelta(days=7)
MAX_CLOCK_SKEW = timedelta(minutes=5)

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: str) -> str:
    if _UNSTORABLE.search(value):
        raise ValueError("text must not contain NUL or unpaired surrogate characters")
    return value


Storable = AfterValidator(_storable)
# Strings both stores accept, of bounded length (aliases so that type checkers read them).
Text64 = Annotated[str, Field(min_length=1, max_length=64), Storable]
Text128 = Annotated[str, Field(min_length=1, max_length=128), Storable]
Text256 = Annotated[str, Field(min_length=1, max_length=256), Storable]
Text1000 = Annotated[str, Field(min_length=1, max_length=1000), Storable]
ErrorMessage = Annotated[str, Field(max_length=MAX_ERROR_MESSAGE), Storable]


def _recent(value: datetime) -> datetime:
    now = datetime.now(UTC)
    try:
        at = value.astimezone(UTC)
    except (OverflowError, ValueError):
        at = None  # year 1 at +14:00 is before UTC's year 1
    if at is None or at < now - MAX_RECORD_AGE or at > now + MAX_CLOCK_SKEW:
        raise ValueError(
            f"timestamp must lie within the last {MAX_RECORD_AGE.days} days "
            f"(and at most {int(MAX_CLOCK_SKEW.total_seconds() // 60)} minutes ahead)"
        )
    return at


RecentTimestamp = Annotated[AwareDatetime, AfterValidator(_recent)]


def _metadata_value(value: object) -> object:
    # One validator, not a union: an error names the key, not pydantic's union members.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and -MAX_INT64 <= value <= MAX_INT64:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= MAX_METADATA_VALUE:
        return _storable(value)
    raise ValueError(
        f"a metadata value is a string of at most {MAX_METADATA_VALUE} characters, an integer "
        "within 64 bits, a finite number, a boolean or null"
    )


MetadataValue = Annotated[
    object,
    PlainValidator(_metadata_value),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": MAX_METADATA_VALUE},
                {"type": "integer", "minimum": -MAX_INT64, "maximum": MAX_INT64},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "null"},
            ]
        }
    ),
]
Metadata = Annotated[dict[Text64, MetadataValue], Field(max_length=MAX_METADATA_KEYS)]
