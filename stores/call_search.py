"""Search the call log: a Lucene-style query compiled into a SQLAlchemy where-clause, read a
page at a time newest first, or summed up per group.

The query is parsed by luqum (a maintained Lucene query parser) and every value becomes a bound
parameter of a SQLAlchemy expression: no SQL text is ever built from the query.

    status:error AND model:gpt-4.1         field:value, AND / OR / NOT, parentheses
    latency_ms:>2000   cost_usd:<=0.01      comparisons on numeric fields (>, >=, <, <=)
    latency_ms:[500 TO 2000}                ranges: [ ] include the bound, { } leave it out, * open
    feature:chat*   error_type:*Timeout*    * any run of characters, ? one (text fields only)
    error_type:"Rate*Limit"                 a quoted phrase is literal: no wildcards
    model:(gpt-4.1 OR o3) -status:success   a field on a group; - is NOT, + is nothing
    feature:*                               the field is set (a lone * : every call)

Terms side by side are ANDed (`status:error model:o3`); precedence, tightest first: NOT, AND,
OR, then side by side (`a OR b c` is `(a OR b) AND c`). Text matches are exact and case-sensitive
on both stores (a wildcard is LIKE on PostgreSQL, GLOB on SQLite, with every other character
literal: `%`, `_`, `[` match themselves). `NOT` and `-` also match calls where the field is not
set (`NOT feature:chat` includes calls without a feature). `user:` takes the end user's raw id
and matches its pseudonym (hashed with the ingest's salt, as on arrival); `user_hash:` the
pseudonym itself.

Pages are ordered by (ts, id) descending and continue from an opaque cursor (keyset), so a page
costs the same however deep it is. The cursor also carries the range its first page resolved
(`Sweep`): a `since=1h` is the hour before the first page on every page, so following `next`
sweeps exactly that range, however long it takes. Every read is bounded: the time range and
LIMIT, and a statement timeout (SEARCH_TIMEOUT_SECONDS; PostgreSQL's statement_timeout, a
progress handler on SQLite) past which `SearchTimeoutError` is raised.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from luqum import tree
from luqum.exceptions import IllegalCharacterError, ParseError
from luqum.parser import lexer as _luqum_lexer
from luqum.parser import parser as _luqum_parser
from pagerloop_sdk.privacy import hash_user_id
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Connection,
    Engine,
    String,
    and_,
    case,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal

from domain.histogram import percentile
from domain.periods import parse_time
from stores.llm_calls import CALL_STATUSES, LLMCall, utc

MAX_QUERY_LENGTH = 2_000
MAX_TERMS = 100  # field:value terms in one query
MAX_DEPTH = 32  # nesting of parentheses and operators
DEFAULT_LIMIT = 50
MAX_LIMIT = 1_000
MAX_GROUPS = 50  # stats: the largest groups by calls; the rest are only counted
SEARCH_TIMEOUT_SECONDS = 10.0
# Statuses counted as errors by the stats, as the detector's error rate counts them: a 429
# (rate_limited) has its own column, as it has its own signal.
ERROR_STATUSES = ("error", "timeout", "server_error")

_table = LLMCall.__table__  # type: ignore[attr-defined]
_c = _table.c

Kind = Literal["text", "int", "float", "status", "user"]


@dataclass(frozen=True)
class Field:
    name: str
    column: str
    kind: Kind

    @property
    def col(self) -> Any:
        return _c[self.column]

    @property
    def nullable(self) -> bool:
        return bool(self.col.nullable)

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")


def _fields() -> dict[str, Field]:
    kinds: dict[str, tuple[str, Kind]] = {
        "status": ("status", "status"),
        "model": ("model", "text"),
        "served_model": ("response_model", "text"),
        "response_model": ("response_model", "text"),
        "feature": ("feature", "text"),
        "team": ("team", "text"),
        "environment": ("environment", "text"),
        "error_type": ("error_type", "text"),
        "http_status": ("http_status", "int"),
        "latency_ms": ("latency_ms", "float"),
        "ttft_ms": ("ttft_ms", "float"),
        "input_tokens": ("input_tokens", "int"),
        "output_tokens": ("output_tokens", "int"),
        "cached_input_tokens": ("cached_input_tokens", "int"),
        "cost_usd": ("cost_usd", "float"),
        "retry_count": ("retry_count", "int"),
        "request_id": ("request_id", "text"),
        "trace_id": ("trace_id", "text"),
        "session_id": ("session_id", "text"),
        "user": ("user_hash", "user"),
        "user_hash": ("user_hash", "text"),
        "call_id": ("call_id", "text"),
        "operation": ("operation", "text"),
        "finish_reason": ("finish_reason", "text"),
        "source": ("source", "text"),
    }
    return {name: Field(name, column, kind) for name, (column, kind) in kinds.items()}


FIELDS = _fields()
NUMERIC_FIELDS = tuple(name for name, f in FIELDS.items() if f.numeric)
# What `stats --by` groups on.
STATS_BY: dict[str, str] = {
    "model": "model",
    "served_model": "response_model",
    "feature": "feature",
    "team": "team",
    "environment": "environment",
    "status": "status",
    "error_type": "error_type",
    "http_status": "http_status",
}
_INT64 = 2**63 - 1


class QueryError(ValueError):
    """A query that cannot be searched: where (0-based character offset) and why."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(f"position {position}: {message}")
        self.position = position
        self.message = message


class CursorError(ValueError):
    """A `cursor` that is not one this module made."""


class SearchTimeoutError(RuntimeError):
    """The search ran past SEARCH_TIMEOUT_SECONDS."""


# --- parsing -----------------------------------------------------------------------------------

# luqum's parser is PLY's, which keeps state on the parser and the lexer: one parse at a time,
# each with a lexer of its own.
_PARSE_LOCK = threading.Lock()
_UNEXPECTED = re.compile(r"unexpected\s+'(?P<token>.*)' at position (?P<position>\d+)!?$", re.S)
_ILLEGAL = re.compile(r"at position (?P<position>\d+)$")


@dataclass(frozen=True)
class _Token:
    type: str
    start: int
    end: int


def _tokens(query: str) -> list[_Token]:
    """luqum's own tokens of `query`, up to the first character it cannot read."""
    lexer = _luqum_lexer.clone()
    lexer.input(query)
    found: list[_Token] = []
    while True:
        try:
            token = lexer.token()
        except IllegalCharacterError:
            return found
        if token is None:
            return found
        found.append(_Token(token.type, token.lexpos, lexer.lexpos))


def _open(tokens: Sequence[_Token]) -> tuple[list[int], int | None, bool]:
    """Where the still-open parentheses and range begin, and whether the range has its TO."""
    parens: list[int] = []
    bracket: int | None = None
    has_to = False
    for token in tokens:
        if token.type == "LPAREN":
            parens.append(token.start)
        elif token.type == "RPAREN" and parens:
            parens.pop()
        elif token.type == "LBRACKET":
            bracket, has_to = token.start, False
        elif token.type == "RBRACKET":
            bracket = None
        elif token.type == "TO" and bracket is not None:
            has_to = True
    return parens, bracket, has_to


def _expected(query: str, before: Sequence[_Token], at_end: bool) -> str | None:
    """What the parser wanted after `before`, in words; None when nothing in particular."""
    if not before:
        return "a term, like model:gpt-4.1"
    last = before[-1]
    shown = query[last.start : last.end]
    if last.type == "COLUMN":
        start = before[-2].start if len(before) > 1 else last.start
        return f"a value after '{query[start : last.end]}'"
    if last.type in ("GREATERTHAN", "LESSTHAN"):
        fielded = len(before) > 2 and before[-2].type == "COLUMN"
        start = before[-3].start if fielded else last.start
        return f"a value after '{query[start : last.end]}'"
    if last.type in ("AND_OP", "OR_OP", "NOT", "PLUS", "MINUS", "LPAREN"):
        return f"a term after '{shown}'"
    parens, bracket, has_to = _open(before)
    if bracket is not None:
        if last.type == "LBRACKET":
            return f"the range's lower bound after '{shown}'"
        if last.type == "TO":
            return "the range's upper bound after 'TO'"
        if not has_to:
            return f"'TO' in the range opened at position {bracket}"
        return f"']' or '}}' to close the range opened at position {bracket}"
    if at_end and parens:
        return f"')' to close the '(' at position {parens[-1]}"
    return None


def _syntax_error(query: str, exc: ParseError) -> QueryError:
    tokens = _tokens(query)
    if isinstance(exc, IllegalCharacterError):
        found = _ILLEGAL.search(str(exc))
        position = int(found.group("position")) if found else len(query)
        char = query[position : position + 1]
        hint = ": quote phrases with double quotes" if char == "'" else ""
        return QueryError(position, f"unexpected character {char!r}{hint}")
    found = _UNEXPECTED.search(str(exc))
    if found is None:  # the end of the query came too early
        position = len(query)
        expected = _expected(query, tokens, at_end=True)
        return QueryError(position, f"expected {expected}" if expected else "unexpected end")
    position = int(found.group("position"))
    token = next((t for t in tokens if t.start == position), None)
    shown = query[position : token.end] if token else found.group("token")
    before = [t for t in tokens if t.start < position]
    if token is not None and token.type == "RPAREN" and not _open(before)[0]:
        return QueryError(position, "unexpected ')': no '(' to close")
    expected = _expected(query, before, at_end=False)
    if expected is None:
        return QueryError(position, f"unexpected '{shown}'")
    return QueryError(position, f"expected {expected}, found '{shown}'")


def parse(query: str) -> tree.Item:
    """luqum's tree of `query`; QueryError with the position of the first problem."""
    if len(query) > MAX_QUERY_LENGTH:
        raise QueryError(MAX_QUERY_LENGTH, f"a query has at most {MAX_QUERY_LENGTH} characters")
    with _PARSE_LOCK:
        try:
            return _luqum_parser.parse(query, lexer=_luqum_lexer.clone())
        except ParseError as exc:
            error = exc
    raise _syntax_error(query, error) from None


# --- compiling ---------------------------------------------------------------------------------


class _Like(ColumnElement[bool]):
    """`column` matches a wildcard pattern, case-sensitively on both stores: `LIKE ... ESCAPE`
    on PostgreSQL (whose LIKE is case-sensitive), GLOB on SQLite (whose LIKE is not)."""

    __visit_name__ = "pagerloop_like"
    inherit_cache = True
    type = Boolean()
    _traverse_internals = [
        ("target", InternalTraversal.dp_clauseelement),
        ("like_pattern", InternalTraversal.dp_clauseelement),
        ("glob_pattern", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, target: Any, like: str, glob: str) -> None:
        self.target = target
        self.like_pattern = literal(like, String())
        self.glob_pattern = literal(glob, String())


@compiles(_Like)
def _compile_like(element: _Like, compiler: SQLCompiler, **kw: Any) -> str:
    target = compiler.process(element.target, **kw)
    return f"({target} LIKE {compiler.process(element.like_pattern, **kw)} ESCAPE '\\')"


@compiles(_Like, "sqlite")
def _compile_glob(element: _Like, compiler: SQLCompiler, **kw: Any) -> str:
    target = compiler.process(element.target, **kw)
    return f"({target} GLOB {compiler.process(element.glob_pattern, **kw)})"


_ANY, _ONE = object(), object()
_Piece = str | object


def _pieces(raw: str) -> list[_Piece]:
    """A word's characters, with its unescaped `*` and `?` as _ANY and _ONE."""
    pieces: list[_Piece] = []
    escaped = False
    for char in raw:
        if escaped:
            pieces.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "*":
            pieces.append(_ANY)
        elif char == "?":
            pieces.append(_ONE)
        else:
            pieces.append(char)
    return pieces


def _like_pattern(pieces: Sequence[_Piece]) -> str:
    out = []
    for piece in pieces:
        if piece is _ANY:
            out.append("%")
        elif piece is _ONE:
            out.append("_")
        else:
            assert isinstance(piece, str)
            out.append("\\" + piece if piece in "\\%_" else piece)
    return "".join(out)


def _glob_pattern(pieces: Sequence[_Piece]) -> str:
    out = []
    for piece in pieces:
        if piece is _ANY:
            out.append("*")
        elif piece is _ONE:
            out.append("?")
        else:
            assert isinstance(piece, str)
            out.append(f"[{piece}]" if piece in "*?[" else piece)
    return "".join(out)


_UNESCAPE = re.compile(r"\\(.)", re.S)
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": lambda c, v: c == v,
    ">": lambda c, v: c > v,
    ">=": lambda c, v: c >= v,
    "<": lambda c, v: c < v,
    "<=": lambda c, v: c <= v,
}
_INVERSE = {"=": "!=", ">": "<=", ">=": "<", "<": ">=", "<=": ">"}
_COMPARE["!="] = lambda c, v: c != v


def _known_fields() -> str:
    return ", ".join(FIELDS)


class _Compiler:
    def __init__(self, query: str, user_salt: str) -> None:
        self.query = query
        self.salt = user_salt
        self.terms = 0

    def error(self, item: Any, message: str) -> QueryError:
        position = item.pos if getattr(item, "pos", None) is not None else 0
        return QueryError(position, message)

    def node(self, item: Any, field: Field | None, negated: bool, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.error(item, f"nested more than {MAX_DEPTH} deep")
        deeper = depth + 1
        if isinstance(item, tree.AndOperation | tree.UnknownOperation | tree.OrOperation):
            parts = [self.node(o, field, negated, deeper) for o in item.operands]
            conjunction = not isinstance(item, tree.OrOperation)
            # NOT (a AND b) is (NOT a) OR (NOT b): negations are pushed down to the terms.
            return and_(*parts) if conjunction != negated else or_(*parts)
        if isinstance(item, tree.Not | tree.Prohibit):
            return self.node(item.a, field, not negated, deeper)
        if isinstance(item, tree.Plus):
            return self.node(item.a, field, negated, deeper)
        if isinstance(item, tree.BaseGroup):
            return self.node(item.expr, field, negated, deeper)
        if isinstance(item, tree.SearchField):
            if field is not None:
                raise self.error(item, f"a field inside {field.name}:(...)")
            name = item.name.lower()
            found = FIELDS.get(name)
            if found is None:
                raise self.error(item, f"unknown field '{item.name}'; fields: {_known_fields()}")
            return self.node(item.expr, found, negated, deeper)
        if field is None:
            if isinstance(item, tree.Word) and item.value == "*":  # every call
                return false() if negated else true()
            shown = self.query[item.pos : item.pos + item.size] if item.pos is not None else ""
            raise self.error(
                item, f"'{shown}' needs a field, like model:{shown}; fields: {_known_fields()}"
            )
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise self.error(item, f"a query has at most {MAX_TERMS} terms")
        if isinstance(item, tree.Word | tree.Phrase) and not isinstance(item, tree.Regex):
            return self.value(item, field, negated)
        if isinstance(item, tree.Range):
            return self.range(item, field, negated)
        if isinstance(item, tree.From | tree.To):
            return self.open_range(item, field, negated)
        what = {
            tree.Regex: "regular expressions (/.../)",
            tree.Fuzzy: "fuzzy terms (~)",
            tree.Proximity: "proximity (~)",
            tree.Boost: "boosts (^)",
        }.get(type(item), type(item).__name__)
        raise self.error(item, f"{what} are not supported")

    # -- terms -----------------------------------------------------------------------------------

    def compare(self, field: Field, ops: Sequence[tuple[str, Any]], negated: bool) -> Any:
        """The conjunction of `column op value`, or its negation, which holds where the column
        is not set (SQL's NOT of a comparison with NULL would not)."""
        col = field.col
        if not negated:
            return and_(*(_COMPARE[op](col, value) for op, value in ops))
        inverse = [_COMPARE[_INVERSE[op]](col, value) for op, value in ops]
        return or_(col.is_(None), *inverse) if field.nullable else or_(*inverse)

    def value(self, item: tree.Term, field: Field, negated: bool) -> Any:
        if isinstance(item, tree.Phrase):
            pieces: list[_Piece] = list(_UNESCAPE.sub(r"\1", item.value[1:-1]))
        else:
            pieces = _pieces(item.value)
        wild = any(p is _ANY or p is _ONE for p in pieces)
        if pieces == [_ANY]:  # field:* - the field is set
            if not field.nullable:
                return false() if negated else true()
            return field.col.is_(None) if negated else field.col.is_not(None)
        if field.numeric:
            if wild:
                raise self.error(item, f"wildcards apply to text fields, not {field.name}")
            return self.compare(field, [("=", self.number(item, field))], negated)
        if wild:
            if field.kind == "user":
                raise self.error(
                    item, "user ids are stored hashed: give the whole id, without wildcards"
                )
            match = _Like(field.col, _like_pattern(pieces), _glob_pattern(pieces))
            if not negated:
                return match
            return or_(field.col.is_(None), not_(match)) if field.nullable else not_(match)
        plain = "".join(p for p in pieces if isinstance(p, str))
        if field.kind == "status" and plain not in CALL_STATUSES:
            raise self.error(
                item, f"unknown status '{plain}'; statuses: {', '.join(CALL_STATUSES)}"
            )
        if field.kind == "user":
            plain = hash_user_id(plain, self.salt)
        return self.compare(field, [("=", plain)], negated)

    def bound(self, item: Any, field: Field) -> float | int | None:
        """A range's bound: a number, or None for `*`."""
        if isinstance(item, tree.Prohibit) and isinstance(item.a, tree.Word):
            number = self.number(item.a, field)
            return -number
        if isinstance(item, tree.Word) and item.value == "*":
            return None
        if isinstance(item, tree.Word | tree.Phrase):
            return self.number(item, field)
        raise self.error(item, "a range's bounds are numbers or *")

    def range(self, item: tree.Range, field: Field, negated: bool) -> Any:
        self.numeric_only(item, field)
        ops: list[tuple[str, Any]] = []
        low, high = self.bound(item.low, field), self.bound(item.high, field)
        if low is not None:
            ops.append((">=" if item.include_low else ">", low))
        if high is not None:
            ops.append(("<=" if item.include_high else "<", high))
        if not ops:  # [* TO *]: the field is set
            return self.value(tree.Word("*"), field, negated)
        return self.compare(field, ops, negated)

    def open_range(self, item: tree.OpenRange, field: Field, negated: bool) -> Any:
        self.numeric_only(item, field)
        op = (">" if isinstance(item, tree.From) else "<") + ("=" if item.include else "")
        return self.compare(field, [(op, self.number(item.a, field))], negated)

    def numeric_only(self, item: Any, field: Field) -> None:
        if not field.numeric:
            raise self.error(
                item,
                f"ranges and comparisons apply to numeric fields ({', '.join(NUMERIC_FIELDS)}),"
                f" not {field.name}",
            )

    def number(self, item: Any, field: Field) -> float | int:
        raw = item.value[1:-1] if isinstance(item, tree.Phrase) else item.value
        raw = _UNESCAPE.sub(r"\1", raw).strip()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise self.error(item, f"{field.name} takes a number, not '{raw}'")
        if field.kind == "float":
            return value
        if not value.is_integer():
            raise self.error(item, f"{field.name} takes a whole number, not '{raw}'")
        number = int(raw) if re.fullmatch(r"-?\d+", raw) else int(value)
        if abs(number) > _INT64:
            raise self.error(item, f"{field.name}: '{raw}' is out of range")
        return number


def compile_query(query: str, *, user_salt: str) -> ColumnElement[bool]:
    """The where-clause of `query` (every value a bound parameter); everything for an empty
    query. QueryError says where and what is wrong."""
    if not query.strip():
        if len(query) > MAX_QUERY_LENGTH:
            raise QueryError(MAX_QUERY_LENGTH, f"a query has at most {MAX_QUERY_LENGTH} characters")
        return true()
    parsed = parse(query)
    clause: ColumnElement[bool] = _Compiler(query, user_salt).node(parsed, None, False, 0)
    return clause


# --- time ranges and cursors -------------------------------------------------------------------

DEFAULT_SINCE = "1h"
CURSOR_VERSION = 1
_DIGEST_LENGTH = 12
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_REFUSED = "not a cursor this API returned (use `next` as it is)"

Key = tuple[datetime, int]  # (ts, id) of a call: the order of the pages


class ParameterError(ValueError):
    """A request parameter (`field`: q, since, until, cursor) that cannot be taken."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def time_range(since: str | None, until: str | None, now: datetime) -> tuple[datetime, datetime]:
    """[since, until) of a request (domain.periods: durations back from `now` or RFC 3339 times
    with their offset); since defaults to DEFAULT_SINCE, until to `now`. ParameterError naming
    the one that cannot be read."""
    found = []
    for name, value, default in (("since", since, DEFAULT_SINCE), ("until", until, None)):
        if value is None or not value.strip():
            found.append(now if default is None else parse_time(default, now))
            continue
        try:
            found.append(parse_time(value, now))
        except ValueError as exc:
            raise ParameterError(name, str(exc)) from None
    start, end = found
    if end <= start:
        raise ParameterError("until", "must be after since")
    return start, end


def query_digest(query: str) -> str:
    return hashlib.sha256(query.strip().encode()).hexdigest()[:_DIGEST_LENGTH]


def _micros(at: datetime) -> int:
    return (utc(at) - _EPOCH) // timedelta(microseconds=1)


def _at(micros: object) -> datetime:
    if not isinstance(micros, int) or isinstance(micros, bool):
        raise CursorError(_CURSOR_REFUSED)
    try:
        return _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise CursorError(_CURSOR_REFUSED) from None


@dataclass(frozen=True)
class Sweep:
    """What every page of one search shares: the range resolved once, on the first page (`now`
    is that page's clock: a `since=1h` means the hour before it, on every page), and the query."""

    now: datetime
    since: datetime
    until: datetime
    query: str  # query_digest of q

    def next(self, page: Page) -> str | None:
        """The cursor of the page after `page`; None on the last."""
        return None if page.last is None else Cursor(self, page.last).encode()


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended, and the sweep it belongs to: opaque to callers
    (base64url of a JSON array), validated on the way in."""

    sweep: Sweep
    after: Key

    def encode(self) -> str:
        s = self.sweep
        ts, row_id = self.after
        raw = [CURSOR_VERSION, *map(_micros, (s.now, s.since, s.until, ts)), row_id, s.query]
        text = json.dumps(raw, separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Cursor:
    """The cursor a page's `next` carried; CursorError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        found = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise CursorError(_CURSOR_REFUSED) from None
    if not isinstance(found, list) or len(found) != 7 or found[0] != CURSOR_VERSION:
        raise CursorError(_CURSOR_REFUSED)
    _, now, since, until, ts, row_id, digest = found
    if (
        not isinstance(row_id, int)
        or isinstance(row_id, bool)
        or not 0 <= row_id <= _INT64
        or not isinstance(digest, str)
        or not re.fullmatch(f"[0-9a-f]{{{_DIGEST_LENGTH}}}", digest)
    ):
        raise CursorError(_CURSOR_REFUSED)
    sweep = Sweep(_at(now), _at(since), _at(until), digest)
    if sweep.until <= sweep.since:
        raise CursorError(_CURSOR_REFUSED)
    return Cursor(sweep, (_at(ts), row_id))


def sweep_of(
    query: str, since: str | None, until: str | None, cursor: str | None, now: datetime
) -> tuple[Sweep, Cursor | None]:
    """The sweep a request pages through, and where its page starts. Without `cursor`: a new
    sweep of [since, until) as of `now`. With one: the cursor's sweep, whatever the clock says
    now; a `since` / `until` given beside it is read as of the first page's clock and must name
    the same instant (an RFC 3339 time, or the same duration), or the request is refused, as is
    a cursor of another query (ParameterError naming `cursor`)."""
    if cursor is None:
        start, end = time_range(since, until, now)
        return Sweep(now, start, end, query_digest(query)), None
    try:
        found = decode_cursor(cursor)
    except CursorError as exc:
        raise ParameterError("cursor", str(exc)) from None
    sweep = found.sweep
    if sweep.query != query_digest(query):
        raise ParameterError(
            "cursor", "this cursor continues another query: give the q of its first page"
        )
    for name, value, fixed in (("since", since, sweep.since), ("until", until, sweep.until)):
        if value is None or not value.strip():
            continue
        try:
            at = parse_time(value, sweep.now)
        except ValueError as exc:
            raise ParameterError(name, str(exc)) from None
        if at != fixed:
            raise ParameterError(
                "cursor",
                f"this cursor continues the range of its first page, {sweep.since.isoformat()} "
                f"to {sweep.until.isoformat()}; {name}={value.strip()} names another: leave "
                "since and until out (or as they were), or start again without a cursor",
            )
    return sweep, found


# --- reading -----------------------------------------------------------------------------------


def _interrupted(exc: OperationalError) -> bool:
    # PostgreSQL's query_canceled (statement_timeout); SQLite's "interrupted" (progress handler)
    return getattr(exc.orig, "sqlstate", None) == "57014" or "interrupted" in str(exc.orig)


@contextlib.contextmanager
def bounded(engine: Engine, seconds: float) -> Iterator[Connection]:
    """A connection whose statements stop after `seconds` (SearchTimeoutError)."""
    with engine.connect() as connection:
        handler: Any = None
        if engine.dialect.name == "postgresql":
            connection.execute(text(f"SET LOCAL statement_timeout = {round(seconds * 1000)}"))
            # Plans for the query's values, not a generic plan: a partial index (failed calls,
            # a set field) serves only a query whose values the planner sees.
            connection.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        elif engine.dialect.name == "sqlite":
            handler = connection.connection.driver_connection
            deadline = time.monotonic() + seconds
            handler.set_progress_handler(lambda: time.monotonic() > deadline, 1_000)
        try:
            yield connection
        except OperationalError as exc:
            if _interrupted(exc):
                raise SearchTimeoutError(
                    f"the search ran past {seconds:g} s: narrow the time range or the query"
                ) from None
            raise
        finally:
            if handler is not None:
                handler.set_progress_handler(None, 0)
            connection.rollback()


# The columns of a call as returned: the record as ingested (the user as its pseudonym), plus
# its call_id and timestamp.
CALL_COLUMNS = (
    "call_id",
    "ts",
    "model",
    "response_model",
    "status",
    "http_status",
    "latency_ms",
    "ttft_ms",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_usd",
    "feature",
    "team",
    "environment",
    "session_id",
    "user_hash",
    "error_type",
    "error_message",
    "retry_count",
    "request_id",
    "trace_id",
    "operation",
    "finish_reason",
    "source",
    "controls",
    "metadata",
)


def _record(row: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in CALL_COLUMNS:
        if name == "ts":
            found["timestamp"] = utc(row.ts)
        else:
            found[name] = row._mapping[name]
    return found


@dataclass(frozen=True)
class Page:
    calls: list[dict[str, Any]]  # newest first; "timestamp" an aware datetime (UTC)
    last: Key | None  # (ts, id) of the page's last call when more follow; None on the last page


def search(
    engine: Engine,
    where: ColumnElement[bool],
    *,
    since: datetime,
    until: datetime,
    limit: int = DEFAULT_LIMIT,
    after: Key | None = None,
    timeout_seconds: float = SEARCH_TIMEOUT_SECONDS,
) -> Page:
    """The calls in [since, until) matching `where`, newest first, `limit` of them after the
    call `after` (keyset: `Sweep.next` makes the cursor of it). SearchTimeoutError past the
    timeout."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit: 1 to {MAX_LIMIT}")
    conditions = [_c.ts >= utc(since), _c.ts < utc(until), where]
    if after is not None:
        last_ts, last_id = after
        # (ts, id) < (last_ts, last_id), with a bound on ts alone that an index can use.
        conditions += [_c.ts <= last_ts, or_(_c.ts < last_ts, _c.id < last_id)]
    columns = [_c.id, *(_c[name] for name in CALL_COLUMNS)]
    statement = (
        select(*columns).where(*conditions).order_by(_c.ts.desc(), _c.id.desc()).limit(limit + 1)
    )
    with bounded(engine, timeout_seconds) as connection:
        rows = connection.execute(statement).all()
    more = len(rows) > limit
    rows = rows[:limit]
    last = (utc(rows[-1].ts), int(rows[-1].id)) if more else None
    return Page([_record(row) for row in rows], last)


@dataclass(frozen=True)
class GroupStats:
    key: str | int | None  # None: calls without the field
    calls: int
    errors: int  # statuses of ERROR_STATUSES
    rate_limited: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: float

    @property
    def error_pct(self) -> float:
        return 100.0 * self.errors / self.calls if self.calls else 0.0

    @property
    def rate_limited_pct(self) -> float:
        return 100.0 * self.rate_limited / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class Stats:
    by: str
    calls: int  # every matching call, in shown groups or not
    groups_total: int  # groups found; the MAX_GROUPS largest are shown
    groups: list[GroupStats]


def _count_if(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def stats(
    engine: Engine,
    where: ColumnElement[bool],
    *,
    by: str,
    since: datetime,
    until: datetime,
    max_groups: int = MAX_GROUPS,
    timeout_seconds: float = SEARCH_TIMEOUT_SECONDS,
) -> Stats:
    """Per group of `by` (STATS_BY), the largest `max_groups` by calls: calls, errors, 429s,
    latency percentiles (from each call's latency bucket, domain.histogram: within 2.5 %),
    tokens and cost. One read of the matching calls, summed per (group, latency bucket); the
    groups are ranked in SQL, so at most `max_groups` x buckets rows come back."""
    key = _c[STATS_BY[by]]
    cells = (
        select(
            key.label("key"),
            _c.latency_bucket.label("bucket"),
            func.count().label("calls"),
            _count_if(_c.status.in_(ERROR_STATUSES)).label("errors"),
            _count_if(_c.status == "rate_limited").label("rate_limited"),
            func.coalesce(func.sum(_c.input_tokens), 0).label("input_tokens"),
            func.coalesce(func.sum(_c.output_tokens), 0).label("output_tokens"),
            func.coalesce(func.sum(_c.cost_usd), 0.0).label("cost_usd"),
        )
        .where(_c.ts >= utc(since), _c.ts < utc(until), where)
        .group_by(key, _c.latency_bucket)
        .subquery("cells")
    )
    totals = select(
        cells,
        func.sum(cells.c.calls).over(partition_by=cells.c.key).label("group_calls"),
        func.sum(cells.c.calls).over().label("calls_total"),
    ).subquery("totals")
    ranked = select(
        totals,
        func.dense_rank()
        .over(order_by=(totals.c.group_calls.desc(), totals.c.key.is_(None), totals.c.key))
        .label("rank"),
    ).subquery("ranked")
    counted = select(ranked, func.max(ranked.c.rank).over().label("groups_total")).subquery()
    statement = select(counted).where(counted.c.rank <= max_groups)
    with bounded(engine, timeout_seconds) as connection:
        rows = connection.execute(statement).all()
    if not rows:
        return Stats(by, 0, 0, [])
    sums: dict[int, dict[str, Any]] = {}
    for row in rows:
        group = sums.setdefault(
            int(row.rank), {"key": row.key, "histogram": {}, **dict.fromkeys(_SUMMED, 0)}
        )
        for name in _SUMMED:
            group[name] += row._mapping[name]
        if row.bucket is not None:
            group["histogram"][int(row.bucket)] = int(row.calls)
    shown = []
    for rank in sorted(sums):
        group = sums[rank]
        histogram = group["histogram"]
        shown.append(
            GroupStats(
                key=group["key"],
                calls=int(group["calls"]),
                errors=int(group["errors"]),
                rate_limited=int(group["rate_limited"]),
                latency_p50_ms=percentile(histogram, 0.50),
                latency_p95_ms=percentile(histogram, 0.95),
                latency_p99_ms=percentile(histogram, 0.99),
                input_tokens=int(group["input_tokens"]),
                output_tokens=int(group["output_tokens"]),
                cost_usd=float(group["cost_usd"]),
            )
        )
    return Stats(by, int(rows[0].calls_total), int(rows[0].groups_total), shown)


_SUMMED = ("calls", "errors", "rate_limited", "input_tokens", "output_tokens", "cost_usd")
