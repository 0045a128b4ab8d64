"""The bulk write path of the call log: the instrumentation's writer, ingest and OTLP use it.

SQLite gets one `executemany` of plain tuples and sums the usage rollup itself in SQL;
PostgreSQL gets `COPY`, and both rollups summed in Python from the same rows, each upserted in
one statement of arrays: the ORM, or a statement per rollup row, would cost a third of the
throughput.

Text PostgreSQL refuses (NUL) or no UTF-8 encoder takes (lone surrogates: `"\\ud800"`) would
fail the whole batch; it is replaced by U+FFFD. It is rare, so the batch's strings are checked
in one pass in C and only a batch that holds such a string pays for mending it.

Calls the response cache answered (source "cache") are written to the call log but left out of
both rollups: they never reached OpenAI, and counting their successes would hide an outage.
SQLite checks a batch for them once, in C, and only a batch that holds one pays for filtering
it; PostgreSQL's one pass over the rows skips them.

A call_id is written once: a batch sent again (a client retrying after a timeout, the recorder
retrying after an ambiguous commit, an OTLP exporter re-sending) writes nothing twice, and the
rollups count only the rows actually inserted. SQLite inserts with `ON CONFLICT (call_id) DO
NOTHING` (its usage rollup already sums only the new ids; the latency histogram is recomputed
from the inserted rows when the insert count says some were duplicates). PostgreSQL `COPY`s the
batch under a savepoint, which a duplicate fails as a whole: only then is the batch copied into
a temporary table and inserted with `ON CONFLICT (call_id) DO NOTHING RETURNING call_id`, and
the rollups are summed from the rows it returned.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from domain.histogram import bucket as latency_bucket
from domain.usage import ERROR_COUNTER, FLOAT_COUNTERS, STATUS_COUNTERS, USAGE_COUNTERS
from stores.llm_calls import CACHE_SOURCE, CallRecord, utc

# The plain columns first, then those that need converting or computing.
_PLAIN = tuple(f.name for f in fields(CallRecord) if f.name not in ("ts", "metadata"))
CALL_COLUMNS: tuple[str, ...] = (*_PLAIN, "ts", "metadata", "latency_bucket")
_plain_values = attrgetter(*_PLAIN)
_SOURCE_INDEX = CALL_COLUMNS.index("source")
_source_of = itemgetter(_SOURCE_INDEX)
_TS_INDEX = CALL_COLUMNS.index("ts")
_TEXT = tuple(f.name for f in fields(CallRecord) if f.type in ("str", "str | None"))
ROLLUP_KEYS = ("minute", "model", "feature", "team", "environment")


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode()  # in C, and faster than a regex scan
    except UnicodeEncodeError:
        return True
    return False


def _unfit(text: str) -> bool:
    return "\x00" in text or _has_surrogate(text)


def fit_text(text: str) -> str:
    """`text` with NUL and lone surrogates replaced by U+FFFD (a surrogate pair is joined)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if _has_surrogate(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


_TEXT_INDEXES = tuple(CALL_COLUMNS.index(name) for name in _TEXT)
_row_texts = itemgetter(*_TEXT_INDEXES)


def fit_rows(rows: Sequence[tuple[Any, ...]]) -> Sequence[tuple[Any, ...]]:
    """The batch, with the rows whose strings no store would take mended (copies)."""
    try:
        if not _unfit("".join(filter(None, chain.from_iterable(map(_row_texts, rows))))):
            return rows
    except TypeError:
        pass  # a non-string where a string belongs: check each row
    return [_fit_row(row) for row in rows]


def _fit_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    bad = [i for i in _TEXT_INDEXES if isinstance(row[i], str) and _unfit(row[i])]
    if not bad:
        return row
    return tuple(fit_text(value) if i in bad else value for i, value in enumerate(row))


def _fit_json(value: Any) -> Any:
    if isinstance(value, str):
        return fit_text(value)
    if isinstance(value, dict):
        return {fit_text(k): _fit_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fit_json(v) for v in value]
    return value


def sqlite_datetime(value: datetime) -> str:
    """The text SQLAlchemy's SQLite DateTime type stores and compares (UTC, naive)."""
    if value.tzinfo is not UTC:
        value = utc(value)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def has_cache_hits(rows: Sequence[tuple[Any, ...]]) -> bool:
    """Whether any call of the batch was served from the response cache (one pass in C)."""
    return CACHE_SOURCE in map(_source_of, rows)


def _json(value: dict[str, Any]) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    # The text is ASCII: NUL and surrogates show as escapes (a pair too, for characters past
    # U+FFFF). Decoding it also reaches the strings `default=str` made.
    if "\\u0000" in text or "\\ud" in text:
        text = json.dumps(_fit_json(json.loads(text)), separators=(",", ":"))
    return text


_COLUMN_LIST = ", ".join(CALL_COLUMNS)


def _call_tuple(record: CallRecord, ts: Any) -> tuple[Any, ...]:
    metadata = record.metadata
    return (
        *_plain_values(record),
        ts(record.ts),
        None if metadata is None else _json(metadata),
        latency_bucket(record.latency_ms),
    )


def rows_from_columns(columns: Mapping[str, Sequence[Any]]) -> list[tuple[Any, ...]]:
    """The rows (CALL_COLUMNS, `ts` an aware datetime) of calls given as one sequence per
    CallRecord field: what `write_rows` takes, made without a CallRecord per call."""
    metadata = [None if value is None else _json(value) for value in columns["metadata"]]
    buckets = list(map(latency_bucket, columns["latency_ms"]))
    return list(
        zip(*(columns[name] for name in _PLAIN), columns["ts"], metadata, buckets, strict=True)
    )


_KNOWN_STATUSES = ", ".join(f"'{status}'" for status in STATUS_COUNTERS)
# What the call rows add to each counter, in SQLite's SQL.
_SQLITE_SUMS = {
    "calls": "count(*)",
    **{counter: f"sum(status = '{status}')" for status, counter in STATUS_COUNTERS.items()},
    ERROR_COUNTER: f"sum(status NOT IN ({_KNOWN_STATUSES}))",
    "input_tokens": "sum(coalesce(input_tokens, 0))",
    "output_tokens": "sum(coalesce(output_tokens, 0))",
    "cached_input_tokens": "sum(coalesce(cached_input_tokens, 0))",
    "cost_usd": "sum(coalesce(cost_usd, 0))",
    "unpriced_calls": "sum(cost_usd IS NULL AND input_tokens IS NOT NULL)",
    "latency_ms_sum": "sum(latency_ms)",
}


# SQLite sums the batch it has just inserted itself (in C, without the GIL): the rows with
# an id above the largest before the insert, which the IMMEDIATE transaction keeps ours.
def _sqlite_rollup(where: str) -> str:
    return (
        f"INSERT INTO usage_rollup ({', '.join(ROLLUP_KEYS + USAGE_COUNTERS)}) "  # noqa: S608
        "SELECT substr(ts, 1, 16) || ':00.000000', model, coalesce(feature, ''), "
        "coalesce(team, ''), coalesce(environment, ''), "
        + ", ".join(_SQLITE_SUMS[name] for name in USAGE_COUNTERS)
        + f" FROM llm_calls WHERE {where} GROUP BY 1, 2, 3, 4, 5 "
        f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}) DO UPDATE SET "
        + ", ".join(f"{name} = usage_rollup.{name} + excluded.{name}" for name in USAGE_COUNTERS)
    )


_SQLITE_ROLLUP = _sqlite_rollup("id > ?")
# Only for batches that hold cache hits: the filter costs a column read per row otherwise.
_SQLITE_ROLLUP_UNCACHED = _sqlite_rollup(f"id > ? AND source != '{CACHE_SOURCE}'")


_HISTOGRAM_KEY = tuple(
    CALL_COLUMNS.index(name)
    for name in ("ts", "model", "feature", "team", "environment", "latency_bucket")
)


def _sqlite_latency_rows(calls: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Count the batch's calls per minute, dimensions and latency bucket, from the rows about to
    be inserted (cheaper here than a six-column GROUP BY over them in the write transaction)."""
    ts, model, feature, team, environment, bucket = _HISTOGRAM_KEY
    counts: Counter[tuple[Any, ...]] = Counter(
        (
            row[ts][:16] + ":00.000000",
            row[model],
            row[feature] or "",
            row[team] or "",
            row[environment] or "",
            row[bucket],
        )
        for row in calls
    )
    return [(*key, count) for key, count in counts.items()]


@contextlib.contextmanager
def _transaction(engine: Engine) -> Iterator[Any]:
    """A DBAPI connection for one transaction. Driver errors come out as SQLAlchemy's, as the
    ORM path would raise them: IntegrityError, OperationalError for a lock timeout or a lost
    server (its connection then leaves the pool)."""
    dbapi_error = engine.dialect.loaded_dbapi.Error
    connection = None
    try:
        connection = engine.raw_connection()
        yield connection
        connection.commit()
    except dbapi_error as exc:
        lost = connection is not None and engine.dialect.is_disconnect(
            exc, connection.dbapi_connection, None
        )
        if connection is not None:
            if lost:
                connection.invalidate(exc)
            else:
                with contextlib.suppress(dbapi_error):
                    connection.rollback()
        raise DBAPIError.instance(
            "INSERT INTO llm_calls",
            None,
            exc,
            dbapi_error,
            connection_invalidated=lost,
            dialect=engine.dialect,
        ) from exc
    except BaseException:
        if connection is not None:
            connection.rollback()
        raise
    finally:
        if connection is not None:
            connection.close()


UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE
_INSERT_SQLITE = (
    f"INSERT INTO llm_calls ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(CALL_COLUMNS))}) "  # noqa: S608
    "ON CONFLICT (call_id) DO NOTHING"
)


# The latency histogram of the rows with an id above the largest before the insert: only for a
# batch that held duplicates (the batch's own histogram, computed in Python, is cheaper).
def _sqlite_latency_sql(where: str) -> str:
    return (
        f"INSERT INTO latency_rollup ({', '.join(ROLLUP_KEYS)}, bucket, calls) "  # noqa: S608
        "SELECT substr(ts, 1, 16) || ':00.000000', model, coalesce(feature, ''), "
        "coalesce(team, ''), coalesce(environment, ''), latency_bucket, count(*) "
        f"FROM llm_calls WHERE {where} GROUP BY 1, 2, 3, 4, 5, 6 "
        f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}, bucket) DO UPDATE SET "
        "calls = latency_rollup.calls + excluded.calls"
    )


_SQLITE_LATENCY = _sqlite_latency_sql("id > ?")
_SQLITE_LATENCY_UNCACHED = _sqlite_latency_sql(f"id > ? AND source != '{CACHE_SOURCE}'")


_SQLITE_LATENCY_UPSERT = (
    f"INSERT INTO latency_rollup ({', '.join(ROLLUP_KEYS)}, bucket, calls) "  # noqa: S608
    "VALUES (?, ?, ?, ?, ?, ?, ?) "
    f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}, bucket) DO UPDATE SET "
    "calls = latency_rollup.calls + excluded.calls"
)


def _write_sqlite(engine: Engine, calls: Sequence[tuple[Any, ...]]) -> int:
    cached = has_cache_hits(calls)
    rollup_sql = _SQLITE_ROLLUP_UNCACHED if cached else _SQLITE_ROLLUP
    # The batch's latency histogram is counted before the write transaction, which only
    # upserts it (the database stays locked for the writes alone). Used when every row is new.
    counted_calls = [c for c in calls if c[_SOURCE_INDEX] != CACHE_SOURCE] if cached else calls
    histogram = _sqlite_latency_rows(counted_calls)
    with _transaction(engine) as connection:
        cursor = connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        (before,) = cursor.execute("SELECT coalesce(max(id), 0) FROM llm_calls").fetchone()
        cursor.executemany(_INSERT_SQLITE, calls)
        inserted = int(cursor.rowcount)
        cursor.execute(rollup_sql, (before,))  # sums the new ids only, duplicates or not
        if inserted == len(calls):
            cursor.executemany(_SQLITE_LATENCY_UPSERT, histogram)
        else:  # some were recorded already: the histogram of the rows inserted
            cursor.execute(_SQLITE_LATENCY_UNCACHED if cached else _SQLITE_LATENCY, (before,))
    return inserted


def _copy(cursor: Any, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    with cursor.copy(f"COPY {table} ({_COLUMN_LIST}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


_CALL_ID_INDEX = CALL_COLUMNS.index("call_id")


def _insert_new_postgres(cursor: Any, rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Insert the rows whose call_id is not recorded yet; those rows, in batch order (a
    call_id twice in the batch is inserted, and returned, once)."""
    cursor.execute(
        f"CREATE TEMP TABLE pagerloop_incoming ON COMMIT DROP AS "  # noqa: S608
        f"SELECT {_COLUMN_LIST} FROM llm_calls WITH NO DATA"
    )
    _copy(cursor, "pagerloop_incoming", rows)
    cursor.execute(
        f"INSERT INTO llm_calls ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} "  # noqa: S608
        "FROM pagerloop_incoming ON CONFLICT (call_id) DO NOTHING RETURNING call_id"
    )
    new = {call_id for (call_id,) in cursor.fetchall()}
    inserted = []
    for row in rows:
        if row[_CALL_ID_INDEX] in new:
            new.discard(row[_CALL_ID_INDEX])
            inserted.append(row)
    return inserted


_INDEX = {name: CALL_COLUMNS.index(name) for name in CALL_COLUMNS}
_SUM_INDEX = {name: i for i, name in enumerate(USAGE_COUNTERS)}
_STATUS_SUM = {status: _SUM_INDEX[name] for status, name in STATUS_COUNTERS.items()}


def rollups(
    rows: Sequence[tuple[Any, ...]],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The usage and latency rollup rows of a batch of call rows (CALL_COLUMNS, `ts` a UTC
    datetime), each sorted by key, in one pass; cache hits are left out. Missing dimensions
    are ""."""
    ts_, model_, feature_, team_, environment_, status_, bucket_, source_ = (
        _INDEX[name]
        for name in (
            "ts", "model", "feature", "team", "environment", "status", "latency_bucket", "source"
        )
    )  # fmt: skip
    input_, output_, cached_ = (
        _INDEX["input_tokens"],
        _INDEX["output_tokens"],
        _INDEX["cached_input_tokens"],
    )
    cost_, latency_ = _INDEX["cost_usd"], _INDEX["latency_ms"]
    calls, errors, unpriced = (
        _SUM_INDEX["calls"],
        _SUM_INDEX[ERROR_COUNTER],
        _SUM_INDEX["unpriced_calls"],
    )
    inputs, outputs, cached = (
        _SUM_INDEX[name] for name in ("input_tokens", "output_tokens", "cached_input_tokens")
    )
    cost, latency_sum = _SUM_INDEX["cost_usd"], _SUM_INDEX["latency_ms_sum"]
    empty = [0.0 if name in FLOAT_COUNTERS else 0 for name in USAGE_COUNTERS]
    usage: dict[tuple[Any, ...], list[Any]] = {}
    histogram: Counter[tuple[Any, ...]] = Counter()
    for row in rows:
        if row[source_] == CACHE_SOURCE:
            continue
        key = (
            row[ts_].replace(second=0, microsecond=0),
            row[model_],
            row[feature_] or "",
            row[team_] or "",
            row[environment_] or "",
        )
        sums = usage.get(key)
        if sums is None:
            sums = usage[key] = empty.copy()
        sums[calls] += 1
        sums[_STATUS_SUM.get(row[status_], errors)] += 1
        sums[inputs] += row[input_] or 0
        sums[outputs] += row[output_] or 0
        sums[cached] += row[cached_] or 0
        if row[cost_] is not None:
            sums[cost] += row[cost_]
        elif row[input_] is not None:
            sums[unpriced] += 1  # tokens known, model without a price
        sums[latency_sum] += row[latency_]
        histogram[(*key, row[bucket_])] += 1
    return (
        sorted((*key, *sums) for key, sums in usage.items()),
        sorted((*key, count) for key, count in histogram.items()),
    )


_KEY_TYPES = ("timestamptz", "text", "text", "text", "text")
_SUM_TYPES = tuple("float8" if name in FLOAT_COUNTERS else "int8" for name in USAGE_COUNTERS)


def _unnest_upsert(table: str, columns: Sequence[str], types: Sequence[str], update: str) -> str:
    """One statement for all of a batch's rollup rows, passed as one array per column: a
    round of parsing and planning per row (a thousand latency buckets per batch) cost the API
    more than the call rows' COPY."""
    arrays = ", ".join(f"%b::{kind}[]" for kind in types)  # binary: no quoting to scan for
    # ORDER BY position: the rows are locked in the order given, which `rollups` sorts by key.
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
        f"SELECT {', '.join(columns)} FROM unnest({arrays}) WITH ORDINALITY "
        f"AS rows ({', '.join(columns)}, position) ORDER BY position "
        f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}{update}"
    )


_USAGE_UNNEST = _unnest_upsert(
    "usage_rollup",
    ROLLUP_KEYS + USAGE_COUNTERS,
    _KEY_TYPES + _SUM_TYPES,
    ") DO UPDATE SET "
    + ", ".join(f"{name} = usage_rollup.{name} + excluded.{name}" for name in USAGE_COUNTERS),
)
_LATENCY_UNNEST = _unnest_upsert(
    "latency_rollup",
    (*ROLLUP_KEYS, "bucket", "calls"),
    (*_KEY_TYPES, "int2", "int8"),
    ", bucket) DO UPDATE SET calls = latency_rollup.calls + excluded.calls",
)


def _as_arrays(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


def _write_postgres(engine: Engine, rows: Sequence[tuple[Any, ...]]) -> int:
    with _transaction(engine) as connection:
        cursor = connection.cursor()
        cursor.execute("SAVEPOINT pagerloop_copy")
        try:
            _copy(cursor, "llm_calls", rows)
            inserted: Sequence[tuple[Any, ...]] = rows
        except engine.dialect.loaded_dbapi.Error as exc:
            if getattr(exc, "sqlstate", None) != UNIQUE_VIOLATION:
                raise
            cursor.execute("ROLLBACK TO SAVEPOINT pagerloop_copy")
            inserted = _insert_new_postgres(cursor, rows)
        # Sorted by key: batches written at once (API workers, a sink's parallel requests) then
        # lock the rollup rows they share in the same order, and wait for one another instead
        # of deadlocking.
        usage, histogram = rollups(inserted)
        if usage:
            cursor.execute(_USAGE_UNNEST, _as_arrays(usage))
            cursor.execute(_LATENCY_UNNEST, _as_arrays(histogram))
    return len(inserted)


_WRITERS = {"sqlite": (_write_sqlite, sqlite_datetime), "postgresql": (_write_postgres, utc)}


def _backend(engine: Engine) -> tuple[Any, Any]:
    """The backend's writer and how it stores `ts`."""
    found = _WRITERS.get(engine.dialect.name)
    if found is None:
        raise ValueError(
            f"unsupported store backend {engine.dialect.name!r}: use SQLite or PostgreSQL"
        )
    return found


def write_calls(engine: Engine, records: Sequence[CallRecord]) -> int:
    """Insert the batch's calls not recorded yet and their rollups, in one transaction (all of
    it lands or none does); the number of rows inserted. A call_id already recorded, or twice
    in the batch, is left as it is: the first write wins (a retried batch writes nothing twice,
    and the rollups count only the rows inserted)."""
    if not records:
        return 0
    write, ts = _backend(engine)
    return int(write(engine, fit_rows([_call_tuple(record, ts) for record in records])))


def write_rows(engine: Engine, rows: Sequence[tuple[Any, ...]]) -> int:
    """`write_calls` for calls already made into rows (`rows_from_columns`)."""
    if not rows:
        return 0
    write, ts = _backend(engine)
    if ts is not utc:
        rows = [(*row[:_TS_INDEX], ts(row[_TS_INDEX]), *row[_TS_INDEX + 1 :]) for row in rows]
    return int(write(engine, fit_rows(rows)))
