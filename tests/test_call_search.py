"""Searching the call log (stores.call_search): the Lucene-style query compiled to SQL with bound
parameters, on SQLite and on a real PostgreSQL; keyset pages; per-group stats."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pagerloop_sdk.privacy import hash_user_id
from sqlalchemy import Engine, literal_column
from sqlalchemy.dialects import postgresql, sqlite

from domain.histogram import RELATIVE_ERROR, exact_percentile
from domain.periods import TimeError, parse_time
from stores import call_search
from stores.call_search import (
    ERROR_STATUSES,
    MAX_QUERY_LENGTH,
    Cursor,
    CursorError,
    ParameterError,
    QueryError,
    SearchTimeoutError,
    Sweep,
    compile_query,
    decode_cursor,
    query_digest,
    sweep_of,
    time_range,
)
from stores.llm_calls import CallRecord
from stores.writer import write_calls

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SALT = "test-salt"
SINCE, UNTIL = T0 - timedelta(hours=1), T0


def record(name: str, seconds_ago: float, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {"model": "gpt-4.1", "status": "success", "latency_ms": 100.0}
    values.update(fields)
    return CallRecord(ts=T0 - timedelta(seconds=seconds_ago), request_id=name, **values)


# Each row's request_id is its name; they are a second apart, r1 the newest.
ROWS = [
    record(
        "r1",
        1,
        feature="chat",
        team="platform",
        environment="prod",
        http_status=200,
        input_tokens=10,
        output_tokens=20,
        cost_usd=0.001,
        ttft_ms=40.0,
        user_hash=hash_user_id("u42", SALT),
        session_id="s1",
        trace_id="t1",
        response_model="gpt-4.1-2025-04-14",
    ),
    record(
        "r2",
        2,
        status="error",
        latency_ms=2500.0,
        feature="chat",
        error_type="APIError",
        http_status=500,
        retry_count=2,
    ),
    record(
        "r3",
        3,
        model="o3",
        status="rate_limited",
        latency_ms=50.0,
        feature="search",
        error_type="RateLimitError",
        http_status=429,
        retry_count=1,
    ),
    record(
        "r4",
        4,
        model="gpt-4.1-mini",
        latency_ms=3000.0,
        feature="50%_off",
        response_model="gpt-4.1-mini-2025-04-14",
    ),
    record("r5", 5, model="o3", status="timeout", latency_ms=30000.0, error_type="APITimeoutError"),
    record("r6", 6, latency_ms=800.0, feature="500_off"),
    record("r7", 7, latency_ms=799.5, feature="500xoff"),
    record("r8", 8, feature="a*b", cost_usd=0.5),
    record("r9", 9, feature="axxb", status="server_error", http_status=503),
]
ALL = {r.request_id for r in ROWS}


@pytest.fixture
def calls(store: Engine) -> Engine:
    write_calls(store, ROWS)
    return store


def found(engine: Engine, query: str, **window: Any) -> list[str]:
    where = compile_query(query, user_salt=SALT)
    page = call_search.search(
        engine, where, since=window.get("since", SINCE), until=window.get("until", UNTIL)
    )
    return [c["request_id"] for c in page.calls]


# Each query and the rows it finds, newest first.
EXAMPLES: list[tuple[str, list[str]]] = [
    ("", sorted(ALL, key=lambda r: int(r[1:]))),
    ("   ", sorted(ALL, key=lambda r: int(r[1:]))),
    # field:value, exact and case-sensitive
    ("model:gpt-4.1", ["r1", "r2", "r6", "r7", "r8", "r9"]),
    ("model:GPT-4.1", []),
    ("status:error", ["r2"]),
    ("served_model:gpt-4.1-2025-04-14", ["r1"]),
    ("response_model:gpt-4.1-mini-2025-04-14", ["r4"]),
    ("team:platform environment:prod", ["r1"]),
    ("session_id:s1 AND trace_id:t1", ["r1"]),
    ("request_id:r3", ["r3"]),
    ("error_type:RateLimitError", ["r3"]),
    # AND / OR / NOT, implicit AND, parentheses, - and +
    ("status:error AND model:gpt-4.1", ["r2"]),
    ("model:o3 status:timeout", ["r5"]),
    ("status:error OR status:timeout", ["r2", "r5"]),
    ("(model:o3 OR model:gpt-4.1-mini) AND NOT status:success", ["r3", "r5"]),
    ("model:(o3 OR gpt-4.1-mini)", ["r3", "r4", "r5"]),
    ("-status:success", ["r2", "r3", "r5", "r9"]),
    ("+model:o3", ["r3", "r5"]),
    ("NOT (status:success OR model:o3)", ["r2", "r9"]),
    ("model:o3 OR model:gpt-4.1-mini feature:search", ["r3"]),  # (a OR b) AND c
    ("status:success AND model:o3 OR status:timeout", ["r5"]),  # (a AND b) OR c
    # NOT matches the calls without the field too
    ("NOT feature:chat", ["r3", "r4", "r5", "r6", "r7", "r8", "r9"]),
    ("NOT http_status:200", ["r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"]),
    ("feature:*", ["r1", "r2", "r3", "r4", "r6", "r7", "r8", "r9"]),
    ("NOT feature:*", ["r5"]),
    ("NOT model:*", []),
    # numbers: comparisons and ranges
    ("latency_ms:>2000", ["r2", "r4", "r5"]),
    ("latency_ms:>=3000", ["r4", "r5"]),
    ("latency_ms:<100", ["r3"]),
    ("latency_ms:<=100", ["r1", "r3", "r8", "r9"]),
    ("latency_ms:[799.5 TO 800]", ["r6", "r7"]),
    ("latency_ms:{799.5 TO 800]", ["r6"]),
    ("latency_ms:[799.5 TO 800}", ["r7"]),
    ("latency_ms:[2500 TO *]", ["r2", "r4", "r5"]),
    ("latency_ms:[* TO 50]", ["r3"]),
    ("NOT latency_ms:[100 TO 30000]", ["r3"]),
    ("latency_ms:3000", ["r4"]),
    ("http_status:[400 TO 499]", ["r3"]),
    ("http_status:{429 TO 503}", ["r2"]),
    ("http_status:>=500", ["r2", "r9"]),
    ("retry_count:>0", ["r2", "r3"]),
    ("retry_count:2", ["r2"]),
    ("cost_usd:>0.01", ["r8"]),
    ("cost_usd:[-1 TO 0.001]", ["r1"]),
    ("input_tokens:10 AND output_tokens:>=20", ["r1"]),
    ("ttft_ms:*", ["r1"]),
    ('http_status:"429"', ["r3"]),
    # wildcards: * any run, ? one character; %, _ and [ are literal
    ("model:gpt*", ["r1", "r2", "r4", "r6", "r7", "r8", "r9"]),
    ("model:GPT*", []),
    ("model:*mini", ["r4"]),
    ("model:o?", ["r3", "r5"]),
    ("error_type:*Error", ["r2", "r3", "r5"]),
    ("feature:50%_off", ["r4"]),
    ("feature:50%*", ["r4"]),
    ("feature:*_off", ["r4", "r6"]),
    ("feature:5?0_off", ["r6"]),
    ("feature:500?off", ["r6", "r7"]),
    ("feature:%", []),
    ("feature:_*", []),
    ("feature:a*b", ["r8", "r9"]),
    ("NOT model:gpt*", ["r3", "r5"]),
    ("NOT feature:*_off", ["r1", "r2", "r3", "r5", "r7", "r8", "r9"]),
    ("*", sorted(ALL, key=lambda r: int(r[1:]))),
    ("NOT *", []),
    # quoted phrases and escapes are literal
    ('feature:"a*b"', ["r8"]),
    ("feature:a\\*b", ["r8"]),
    ('feature:"50%_off"', ["r4"]),
    ('feature:"[a]"', []),
    # the end user, hashed as ingest hashes it
    ("user:u42", ["r1"]),
    ("user:u43", []),
    (f"user_hash:{hash_user_id('u42', SALT)}", ["r1"]),
    ("NOT user:u42", ["r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"]),
    # injection attempts find nothing and break nothing
    ('model:"x\' OR 1=1 --"', []),
    ("model:x'--", []),
    ('model:"gpt-4.1\\" OR \\"1\\"=\\"1"', []),
    ('feature:"\'; DROP TABLE llm_calls; --"', []),
    ("request_id:\"r1' OR 'a'='a\"", []),
]


def test_each_syntax_finds_exactly_its_rows(calls: Engine) -> None:
    wrong = {}
    for query, expected in EXAMPLES:
        got = found(calls, query)
        if got != expected:
            wrong[query] = (got, expected)
    assert wrong == {}, "query: (found, expected)"
    # The table is still there and whole after them all.
    assert len(found(calls, "")) == len(ROWS)

    # [since, until): since included, until excluded.
    at_r3 = T0 - timedelta(seconds=3)
    assert found(calls, "", since=at_r3, until=T0) == ["r1", "r2", "r3"]
    assert found(calls, "", since=SINCE, until=at_r3)[0] == "r4"

    # A page holds the call as ingested, with its id and time (UTC).
    page = call_search.search(
        calls, compile_query("request_id:r1", user_salt=SALT), since=SINCE, until=UNTIL
    )
    (call,) = page.calls
    assert call["timestamp"] == T0 - timedelta(seconds=1)
    assert call["timestamp"].tzinfo is not None
    assert call["user_hash"] == hash_user_id("u42", SALT)
    assert (call["model"], call["status"], call["feature"], call["cost_usd"]) == (
        "gpt-4.1",
        "success",
        "chat",
        0.001,
    )
    assert call["call_id"] == ROWS[0].call_id

    # Stats by each dimension add up to every call; calls without the field are a group.
    everything = compile_query("", user_salt=SALT)
    for by in call_search.STATS_BY:
        result = call_search.stats(calls, everything, by=by, since=SINCE, until=UNTIL)
        assert result.calls == len(ROWS)
        assert sum(g.calls for g in result.groups) == len(ROWS)
    http = call_search.stats(calls, everything, by="http_status", since=SINCE, until=UNTIL)
    assert {g.key for g in http.groups} == {None, 200, 429, 500, 503}
    nothing = compile_query("model:nothing", user_salt=SALT)
    none = call_search.stats(calls, nothing, by="model", since=SINCE, until=UNTIL)
    assert (none.calls, none.groups_total, none.groups) == (0, 0, [])


def test_values_are_bound_parameters_never_sql_text() -> None:
    query = 'model:"x\' OR 1=1 --" AND feature:50%* AND latency_ms:>5'
    where = compile_query(query, user_salt="s")
    for dialect in (postgresql.dialect(), sqlite.dialect()):
        compiled = where.compile(dialect=dialect)
        assert "1=1" not in str(compiled)
        assert "50" not in str(compiled)
        assert "x' OR 1=1 --" in compiled.params.values()


BAD = [
    ("latency_ms:>", 12, "expected a value after 'latency_ms:>'"),
    ("status:error AND latency_ms:>", 29, "expected a value after 'latency_ms:>'"),
    ("latency_ms:> AND model:x", 13, "expected a value after 'latency_ms:>', found 'AND'"),
    ("model:", 6, "expected a value after 'model:'"),
    ("status:error AND", 16, "expected a term after 'AND'"),
    ("status:error AND (model:x", 25, "expected ')' to close the '(' at position 17"),
    ("model:x)", 7, "unexpected ')': no '(' to close"),
    ("latency_ms:[1 TO", 16, "expected the range's upper bound after 'TO'"),
    ("latency_ms:[1 2]", 14, "expected 'TO' in the range opened at position 11, found '2'"),
    ("latency_ms:[1 TO 2", 18, "expected ']' or '}' to close the range opened at position 11"),
    ("AND model:x", 0, "expected a term, like model:gpt-4.1, found 'AND'"),
    ("model:'x'", 6, 'unexpected character "\'": quote phrases with double quotes'),
    ("status:ok", 7, "unknown status 'ok'; statuses: success, error, timeout, rate_limited"),
    ("latency_ms:fast", 11, "latency_ms takes a number, not 'fast'"),
    ("latency_ms:>2s", 12, "latency_ms takes a number, not '2s'"),
    ("latency_ms:[1 TO x]", 17, "latency_ms takes a number, not 'x'"),
    ("latency_ms:nan", 11, "latency_ms takes a number, not 'nan'"),
    ("retry_count:>0.5", 13, "retry_count takes a whole number, not '0.5'"),
    ("input_tokens:99999999999999999999", 13, "out of range"),
    ("latency_ms:2*", 11, "wildcards apply to text fields, not latency_ms"),
    ("model:>gpt", 6, "ranges and comparisons apply to numeric fields (http_status, latency_ms"),
    ("model:[a TO b]", 6, "ranges and comparisons apply to numeric fields"),
    ("user:u4*", 5, "user ids are stored hashed"),
    ("model:(a feature:b)", 9, "a field inside model:(...)"),
    ("gpt-4.1", 0, "'gpt-4.1' needs a field, like model:gpt-4.1"),
    ("status:error timeout", 13, "'timeout' needs a field"),
    ("model:a~", 6, "fuzzy terms (~) are not supported"),
    ("model:a^2", 6, "boosts (^) are not supported"),
    ("model:/gpt.*/", 6, "regular expressions (/.../) are not supported"),
    ("status:error AND modle:gpt-4.1", 17, "unknown field 'modle'; fields: status, model,"),
]


@pytest.mark.parametrize(("query", "position", "message"), BAD, ids=[q for q, _, _ in BAD])
def test_a_bad_query_says_where_and_what(query: str, position: int, message: str) -> None:
    with pytest.raises(QueryError) as raised:
        compile_query(query, user_salt=SALT)
    assert raised.value.position == position
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"position {position}: ")


def test_an_unknown_field_names_the_known_ones() -> None:
    with pytest.raises(QueryError) as raised:
        compile_query("modle:x", user_salt=SALT)
    for name in call_search.FIELDS:
        assert name in raised.value.message


def test_queries_are_bounded() -> None:
    with pytest.raises(QueryError, match="at most 2000 characters"):
        compile_query("model:" + "x" * MAX_QUERY_LENGTH, user_salt=SALT)
    with pytest.raises(QueryError, match="at most 100 terms"):
        compile_query(" OR ".join(["model:x"] * 101), user_salt=SALT)
    with pytest.raises(QueryError, match="nested more than 32 deep"):
        compile_query("(" * 40 + "model:x" + ")" * 40, user_salt=SALT)
    compile_query(" OR ".join(["model:x"] * 100), user_salt=SALT)


def test_keyset_pages_walk_calls_of_one_timestamp_without_loss_or_repeat(store: Engine) -> None:
    same = [record(f"same{i}", 10) for i in range(23)]
    write_calls(store, [record("newer", 5), *same, record("older", 20)])
    where = compile_query("model:gpt-4.1", user_salt=SALT)
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = call_search.search(store, where, since=SINCE, until=UNTIL, limit=7, after=after)
        pages += 1
        seen += [c["request_id"] for c in page.calls]
        assert len(page.calls) <= 7
        if page.last is None:
            break
        after = page.last
    assert pages == 4  # 25 calls, 7 a page
    assert len(seen) == len(set(seen)) == 25
    assert seen[0] == "newer"
    assert seen[-1] == "older"
    assert set(seen[1:-1]) == {c.request_id for c in same}
    # Ties on ts come in id order, newest id first: the order of their writing, reversed.
    assert seen[1:-1] == [c.request_id for c in reversed(same)]
    # An exact page: no `next` when nothing follows.
    whole = call_search.search(store, where, since=SINCE, until=UNTIL, limit=25)
    assert whole.last is None
    assert len(whole.calls) == 25


def test_cursors_round_trip_and_refuse_forgeries() -> None:
    at = datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)
    sweep = Sweep(T0, SINCE, UNTIL, query_digest("model:o3"))
    cursor = Cursor(sweep, (at, 42))
    assert decode_cursor(cursor.encode()) == cursor
    assert len(Cursor(sweep, (at, 2**63 - 1)).encode()) <= 200  # api.calls takes 256
    backwards = Cursor(Sweep(T0, UNTIL, SINCE, sweep.query), (at, 1)).encode()
    huge = Cursor(sweep, (at, 2**63)).encode()
    forged = [
        "",
        "x",
        "!!!",
        "bm90IGEgY3Vyc29y",
        cursor.encode() + "A" * 10,
        "MTc5NjU3MzA0NDczOTkzOS41ODE",  # a cursor of before the sweeps: (ts, id) only
        backwards,
        huge,
    ]
    for bad in forged:
        with pytest.raises(CursorError):
            decode_cursor(bad)


def test_a_sweep_keeps_the_range_of_its_first_page() -> None:
    first, first_after = sweep_of("status:error", "1h", None, None, T0)
    assert (first.since, first.until, first_after) == (SINCE, UNTIL, None)
    cursor = Cursor(first, (T0 - timedelta(minutes=50), 7)).encode()
    later = T0 + timedelta(hours=3)
    # Without since/until, or with the same words as the first page: the first page's range.
    for since, until in ((None, None), ("1h", None), ("1h", ""), (SINCE.isoformat(), "0s")):
        sweep, after = sweep_of("status:error ", since, until, cursor, later)
        assert (sweep.since, sweep.until) == (SINCE, UNTIL)
        assert after is not None
        assert after.after == (T0 - timedelta(minutes=50), 7)
    refused = [
        ("status:error", "2h", None, "another"),
        ("status:error", None, (T0 - timedelta(minutes=1)).isoformat(), "another"),
        ("model:o3", None, None, "another query"),
        ("status:error", "yesterday", None, "RFC 3339"),
    ]
    for query, since, until, words in refused:
        with pytest.raises(ParameterError, match=words) as caught:
            sweep_of(query, since, until, cursor, later)
        assert caught.value.field == ("since" if since == "yesterday" else "cursor")
    with pytest.raises(ParameterError) as bad:
        sweep_of("", None, None, "not-a-cursor", later)
    assert bad.value.field == "cursor"


def test_following_next_as_time_passes_returns_every_call_once(store: Engine) -> None:
    """The pages of a `since=1h` sweep asked for ten minutes apart: the oldest calls, which
    have left "the last hour" by the time their page is asked for, are still on it."""
    write_calls(store, [record(f"r{i:02d}", 60 * (50 + i)) for i in range(10)])
    where = compile_query("", user_salt=SALT)
    now, cursor, seen = T0, None, []
    while True:
        sweep, after = sweep_of("", "1h", None, cursor, now)
        page = call_search.search(
            store,
            where,
            since=sweep.since,
            until=sweep.until,
            limit=3,
            after=None if after is None else after.after,
        )
        seen += [c["request_id"] for c in page.calls]
        cursor = sweep.next(page)
        if cursor is None:
            break
        now += timedelta(minutes=10)
    assert seen == [f"r{i:02d}" for i in range(10)]


def test_times_are_rfc3339_with_an_offset_or_durations_back() -> None:
    now = T0
    assert parse_time("1h", now) == T0 - timedelta(hours=1)
    assert parse_time("90s", now) == T0 - timedelta(seconds=90)
    assert parse_time(" 2w ", now) == T0 - timedelta(weeks=2)
    assert parse_time("2026-12-01T10:00:00Z", now) == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert parse_time("2026-12-01T11:00:00+01:00", now) == datetime(2026, 12, 1, 10, tzinfo=UTC)
    with pytest.raises(TimeError, match="no UTC offset: add Z"):
        parse_time("2026-12-01 10:00", now)
    for bad in ("yesterday", "1y", "-1h", "99999999d", "0001-01-01T00:00:00+01:00", "", "1 h"):
        with pytest.raises(TimeError):
            parse_time(bad, now)
    assert time_range(None, None, now) == (SINCE, UNTIL)
    with pytest.raises(ParameterError, match="after since") as backwards:
        time_range("1h", "2h", now)
    assert backwards.value.field == "until"


def test_a_search_past_its_time_stops(store: Engine) -> None:
    write_calls(store, [record(f"r{i}", i % 3000) for i in range(2000)])
    if store.dialect.name == "postgresql":
        where = literal_column("pg_sleep(0.5)").is_not(None)
        timeout = 0.1
    else:
        where = compile_query("feature:*x*", user_salt=SALT)
        timeout = 0.0
    with pytest.raises(SearchTimeoutError, match="narrow"):
        call_search.search(store, where, since=SINCE, until=UNTIL, timeout_seconds=timeout)
    # The connection is usable again, without the timeout.
    assert len(found(store, "")) == 50


def test_stats_match_a_brute_force_count(store: Engine) -> None:
    rng = random.Random(7)
    models = ["gpt-4.1", "o3", "gpt-4.1-mini"]
    statuses = ["success"] * 14 + list(ERROR_STATUSES) + ["rate_limited"]
    rows = [
        record(
            f"c{i}",
            rng.uniform(0, 3000),
            model=rng.choice(models),
            status=rng.choice(statuses),
            latency_ms=rng.lognormvariate(6, 1),
            feature=rng.choice(["chat", "search", None]),
            input_tokens=rng.randint(1, 500),
            output_tokens=rng.choice([None, rng.randint(1, 100)]),
            cost_usd=rng.choice([None, rng.uniform(0, 0.01)]),
        )
        for i in range(600)
    ]
    write_calls(store, rows)
    query = "NOT model:gpt-4.1-mini"
    chosen = [r for r in rows if r.model != "gpt-4.1-mini"]
    found_stats = call_search.stats(
        store, compile_query(query, user_salt=SALT), by="feature", since=SINCE, until=UNTIL
    )
    assert found_stats.calls == len(chosen)
    assert found_stats.groups_total == 3
    by_key: dict[str | None, list[CallRecord]] = defaultdict(list)
    for r in chosen:
        by_key[r.feature].append(r)
    assert [g.calls for g in found_stats.groups] == sorted(
        (len(v) for v in by_key.values()), reverse=True
    )
    for group in found_stats.groups:
        assert isinstance(group.key, str | None)
        mine = by_key[group.key]
        assert group.calls == len(mine)
        assert group.errors == sum(r.status in ERROR_STATUSES for r in mine)
        assert group.rate_limited == sum(r.status == "rate_limited" for r in mine)
        assert group.error_pct == pytest.approx(100 * group.errors / len(mine))
        assert group.input_tokens == sum(r.input_tokens or 0 for r in mine)
        assert group.output_tokens == sum(r.output_tokens or 0 for r in mine)
        assert group.cost_usd == pytest.approx(sum(r.cost_usd or 0 for r in mine))
        latencies = [r.latency_ms for r in mine]
        for q, value in (
            (0.5, group.latency_p50_ms),
            (0.95, group.latency_p95_ms),
            (0.99, group.latency_p99_ms),
        ):
            exact = exact_percentile(latencies, q)
            assert value == pytest.approx(exact, rel=RELATIVE_ERROR), (group.key, q)

    by_model = call_search.stats(
        store, compile_query("", user_salt=SALT), by="model", since=SINCE, until=UNTIL, max_groups=2
    )
    assert by_model.groups_total == 3
    assert len(by_model.groups) == 2
    assert by_model.calls == len(rows)
    counts = sorted((sum(r.model == m for r in rows) for m in models), reverse=True)
    assert [g.calls for g in by_model.groups] == counts[:2]
