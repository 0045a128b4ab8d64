"""Values on their way to a vendor: finite, strictly JSON-encodable, and still telling.

A poisoned record (an ingested `cost_usd: Infinity`) makes a metric infinite. Strict JSON has
no spelling for that: encoders refuse it (`allow_nan=False`) or write a token vendors' parsers
reject, and a page that can never be encoded must not wait a day of retries. What the stores
hold is not trusted here: whatever they say, what leaves is JSON, and an absurd value still
reads as absurd. The vendor activities apply it; standard library only, so that workflow code
may too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Set
from datetime import date, time
from enum import Enum
from typing import TypeAlias

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None

# The spellings JavaScript and lenient JSON parsers use: a responder sees what happened.
POSITIVE_INFINITY = "Infinity"
NEGATIVE_INFINITY = "-Infinity"
NOT_A_NUMBER = "NaN"
_HUMAN = {POSITIVE_INFINITY: "∞", NEGATIVE_INFINITY: "-∞", NOT_A_NUMBER: "NaN"}

# Beyond 2**53 a JSON number is no longer exact for most parsers (and past 4,300 digits
# Python refuses to print an int at all).
MAX_EXACT_INT = 2**53
# Deeper than any payload we build: past it (or in a cycle) the rest is summarised as text.
MAX_DEPTH = 32
# Text made from an object that is not JSON; the strings we are given are left to each
# vendor's own field limits.
MAX_TEXT = 1000


def json_safe(value: object) -> JSONValue:
    """`value` as something `json.dumps(..., allow_nan=False)` always accepts.

    - non-finite floats become the strings "Infinity", "-Infinity" and "NaN" (not None: a
      page must still show that the value was absurd); Decimal and other real numbers too;
    - ints beyond 2**53 become floats, or text such as "~1e+400" when no float holds them;
    - mappings become dicts with string keys, sequences and sets become lists (sets in a
      stable order), dataclasses become dicts of their fields, enums their value;
    - dates and times become ISO 8601, bytes UTF-8 text, anything else `str(value)`,
      cut to MAX_TEXT characters; nesting past MAX_DEPTH is summarised the same way.
    """
    return _safe(value, 0, set())


def human_number(value: object, *, percent: bool = False) -> str:
    """A metric for people: "∞", "-∞" and "NaN" for the non-finite (also when given as
    json_safe's strings), no 300-digit integers, and `percent` for ratios (0.4 -> "40.0%")."""
    if isinstance(value, str):
        return _HUMAN.get(value, _text(value))
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"{_huge_int(value * 100)}%" if percent else _huge_int(value)
    number = _float(value)
    if number is None:
        return _text(value)
    if not math.isfinite(number):
        return _HUMAN[_label(number)]
    if percent:
        scaled = number * 100
        return f"{number:.1%}" if abs(scaled) < 1000 else f"{human_number(scaled)}%"
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return f"{number:.3g}"


def _safe(value: object, depth: int, path: set[int]) -> JSONValue:
    """`path` holds the containers being walked: a cycle ends as text, not a blow-up."""
    if value is None or isinstance(value, bool | str):
        return value
    if depth > MAX_DEPTH or id(value) in path:
        return _text(value)
    if isinstance(value, int):
        return value if abs(value) <= MAX_EXACT_INT else _huge_int_value(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else _label(value)
    if isinstance(value, Enum):
        return _safe(value.value, depth + 1, path)
    if isinstance(value, numbers.Real):
        number = _float(value)
        return _text(value) if number is None else _safe(number, depth + 1, path)
    path.add(id(value))
    try:
        return _container(value, depth + 1, path)
    finally:
        path.discard(id(value))


def _container(value: object, depth: int, path: set[int]) -> JSONValue:
    if isinstance(value, Mapping):
        return {_key(k): _safe(v, depth, path) for k, v in value.items()}
    if isinstance(value, list | tuple | range):
        return [_safe(item, depth, path) for item in value]
    if isinstance(value, Set):
        return [_safe(item, depth, path) for item in sorted(value, key=repr)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return {f.name: _safe(getattr(value, f.name), depth, path) for f in fields}
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return _text(bytes(value).decode("utf-8", errors="replace"))
    return _text(value)


def _key(key: object) -> str:
    # As `json.dumps` names keys, except that a non-finite one gets its readable label.
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return {None: "null", True: "true", False: "false"}[key]
    if isinstance(key, numbers.Real):
        safe = _safe(key, 0, set())
        return safe if isinstance(safe, str) else _text(safe)
    return _text(key)


def _label(number: float) -> str:
    if math.isnan(number):
        return NOT_A_NUMBER
    return POSITIVE_INFINITY if number > 0 else NEGATIVE_INFINITY


def _float(value: object) -> float | None:
    if not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int or Fraction past the largest float: infinite in effect
        return -math.inf if value < 0 else math.inf
    except (TypeError, ValueError):
        return None


def _huge_int_value(value: int) -> JSONValue:
    try:
        return float(value)
    except OverflowError:
        return _huge_int(value)


def _huge_int(value: int) -> str:
    # Only the order of magnitude: printing every digit is unreadable (and, past 4,300
    # digits, refused by Python).
    try:
        return f"{float(value):.3g}"
    except OverflowError:
        sign = "-" if value < 0 else ""
        return f"{sign}~1e+{int(math.log10(abs(value)))}"


def _text(value: object) -> str:
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a broken __str__ must not cost the page
        text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"
