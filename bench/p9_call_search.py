"""P9: searching the call log on PostgreSQL with 10,000,000 calls, without and with the search
indexes of migration 0008.

A throwaway database is migrated to 0007 (the call log without the search indexes) and loaded
in SQL (`INSERT ... SELECT` over `generate_series`, a million rows a statement): 7 days of calls
in time order; 20 models (a few large, a long tail, one at 0.01 %); 2,000 features (skewed:
the largest ~2 %, the smallest ~0.03 %); 1 % failures (error 0.4 %, rate_limited 0.3 %,
timeout 0.15 %, server_error 0.15 %) with their error types and retries; 1 % of successful
calls retried; latencies lognormal (median 800 ms, about 13 % over 2 s); a request id on every
call, a trace id on 30 %, a session on 50 %, an end user on 60 % (100,000 of them). Then
`VACUUM ANALYZE`, and each search is timed as `GET /v1/calls` runs it
(`stores.call_search.search`: the first page of 50, newest first, over the whole 7 days), the
median of `--runs` after one warm-up; then migration 0008 builds the indexes (timed), `ANALYZE`,
and the same searches again. Also timed, before and after the indexes: a few
`stores.call_search.stats` reads, and the write path's throughput (`stores.writer.write_calls`,
`--ingest` calls in batches of 10,000 with the same distributions, timestamped after the searched
range), which pays for every index, with the WAL it writes and the index pages it touches per
call (steadier than the rate on a busy machine).

    uv run python -m bench.p9_call_search [--rows 10000000] [--runs 5] [--ingest 1000000]
        [--postgres URL] [--keep]

Target: <= 500 ms for a selective search on 10 M rows.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from pagerloop_sdk.privacy import hash_user_id
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from domain.histogram import GROWTH, LAST_BUCKET
from stores import call_search, schema
from stores.call_search import SearchTimeoutError, compile_query
from stores.engine import make_engine
from stores.llm_calls import CallRecord
from stores.writer import write_calls

TARGET_MS = 500.0
CHUNK = 1_000_000
SALT = "bench-salt"
TIMEOUT_SECONDS = 60.0
RARE_MODEL = "ft:gpt-4.1-mini:acme:legacy"
MODELS = [
    "gpt-4.1-mini",
    "gpt-4.1",
    "gpt-4o-mini",
    "o4-mini",
    "gpt-4o",
    "o3",
    "gpt-4.1-nano",
    "o3-mini",
    "gpt-5-mini",
    "gpt-5",
    "o1",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "o1-mini",
    "gpt-5-nano",
    "chatgpt-4o-latest",
    "gpt-4o-2024-08-06",
    "gpt-4.1-2025-04-14",
    "o3-pro",
]
FEATURES = 2_000
USERS = 100_000
DAYS = 7

# One statement per chunk of ids [:lo, :hi]; random() is drawn once per row in `r` (OFFSET 0
# keeps the planner from copying the volatile expressions into each use).
LOAD = f"""
INSERT INTO llm_calls (
    call_id, ts, operation, model, response_model, status, http_status, latency_ms, ttft_ms,
    input_tokens, output_tokens, cached_input_tokens, cost_usd, feature, team, environment,
    session_id, user_hash, error_type, error_message, retry_count, finish_reason, request_id,
    trace_id, source, latency_bucket
)
SELECT
    lpad(to_hex(g), 32, '0'), ts, 'chat', model, model || '-snapshot', status,
    CASE status WHEN 'success' THEN 200 WHEN 'rate_limited' THEN 429 WHEN 'server_error' THEN 503
        WHEN 'error' THEN 400 END,
    latency, latency * 0.3, input_tokens, output_tokens, 0,
    (input_tokens * 2 + output_tokens * 8) / 1e6,
    'feature-' || feature_n, 'team-' || (feature_n % 25),
    CASE WHEN r_env < 0.9 THEN 'prod' ELSE 'staging' END,
    CASE WHEN r_session < 0.5 THEN 'sess_' || (g / 20) END,
    CASE WHEN r_user < 0.6 THEN 'user_' || substr(md5('u' || user_n), 1, 24) END,
    CASE status WHEN 'success' THEN NULL WHEN 'rate_limited' THEN 'RateLimitError'
        WHEN 'timeout' THEN 'APITimeoutError' WHEN 'server_error' THEN 'InternalServerError'
        ELSE CASE WHEN r_kind < 0.5 THEN 'APIError' ELSE 'BadRequestError' END END,
    CASE WHEN status <> 'success' THEN 'synthetic failure' END,
    CASE WHEN status <> 'success' THEN floor(r_retry * 3)::int
        WHEN r_retry < 0.01 THEN 1 ELSE 0 END,
    'stop', 'req_' || md5(g::text),
    CASE WHEN r_trace < 0.3 THEN md5('t' || g) END,
    'sdk',
    CASE WHEN latency < 1 THEN 0
        ELSE least(floor(ln(latency) / ln({GROWTH}))::int + 1, {LAST_BUCKET}) END
FROM (
    SELECT
        g, r_env, r_session, r_user, r_kind, r_retry, r_trace, user_n,
        :start + (g - 1) * :step * interval '1 microsecond' - r_jitter * interval '2 seconds'
            AS ts,
        CASE WHEN r_model < 0.0001 THEN '{RARE_MODEL}'
            ELSE (ARRAY[{", ".join(f"'{m}'" for m in MODELS)}])[
                1 + floor(pow(r_model2, 4) * {len(MODELS)})::int] END AS model,
        CASE WHEN r_status < 0.99 THEN 'success' WHEN r_status < 0.994 THEN 'error'
            WHEN r_status < 0.997 THEN 'rate_limited' WHEN r_status < 0.9985 THEN 'timeout'
            ELSE 'server_error' END AS status,
        exp(ln(800) + 0.8 * sqrt(-2 * ln(1 - r_n1)) * cos(2 * pi() * r_n2)) AS latency,
        floor(pow(r_feature, 2) * {FEATURES})::int AS feature_n,
        50 + floor(r_in * 4000)::int AS input_tokens,
        10 + floor(r_out * 800)::int AS output_tokens
    FROM (
        SELECT g, random() AS r_env, random() AS r_session, random() AS r_user,
            random() AS r_kind, random() AS r_retry, random() AS r_trace,
            floor(random() * {USERS})::int AS user_n, random() AS r_jitter,
            random() AS r_model, random() AS r_model2, random() AS r_status,
            random() AS r_n1, random() AS r_n2, random() AS r_feature, random() AS r_in,
            random() AS r_out
        FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS g
        OFFSET 0
    ) AS r
    OFFSET 0
) AS s
"""  # noqa: S608 (this module's constants, no input)


def load(engine: Engine, rows: int, end: datetime) -> float:
    start = end - timedelta(days=DAYS)
    step = timedelta(days=DAYS) / timedelta(microseconds=1) / rows
    began = time.perf_counter()
    for lo in range(1, rows + 1, CHUNK):
        hi = min(lo + CHUNK - 1, rows)
        with engine.begin() as connection:
            connection.execute(text(LOAD), {"lo": lo, "hi": hi, "start": start, "step": step})
        print(f"  loaded {hi:,} rows ({time.perf_counter() - began:,.0f} s)", flush=True)
    return time.perf_counter() - began


def vacuum_analyze(url: str) -> None:
    with psycopg.connect(dsn(make_url(url)), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE llm_calls")


def dsn(url: object) -> str:
    return make_url(str(url)).set(drivername="postgresql").render_as_string(hide_password=False)


def one(engine: Engine, sql: str, **params: object) -> str:
    with engine.connect() as connection:
        return str(connection.execute(text(sql), params).scalar_one())


def searches(engine: Engine, rows: int) -> list[tuple[str, str]]:
    """(what, query): the seed's examples, and selective ones with values from the data."""
    middle = rows // 2
    first_set = (
        "SELECT {0} FROM llm_calls WHERE id > :middle AND {0} IS NOT NULL ORDER BY id LIMIT 1"
    )
    trace = one(engine, first_set.format("trace_id"), middle=middle)
    session = one(engine, first_set.format("session_id"), middle=middle)
    user = one(engine, first_set.format("user_hash"), middle=middle)
    request = "req_" + hashlib.md5(str(middle).encode()).hexdigest()  # noqa: S324
    return [
        ("seed", "status:error AND model:gpt-4.1"),
        ("seed", "latency_ms:>2000"),
        ("seed", "retry_count:>0"),
        ("seed", "error_type:RateLimitError"),
        ("selective", f"request_id:{request}"),
        ("selective", f"trace_id:{trace}"),
        ("selective", f"session_id:{session}"),
        ("selective", f"user_hash:{user}"),
        ("selective", f"feature:feature-{FEATURES - 1}"),
        ("selective", "status:timeout AND feature:feature-7"),
        ("selective", "error_type:BadRequestError AND model:o3"),
        ("no index", f'model:"{RARE_MODEL}"'),
        ("selective", "latency_ms:>60000"),
        ("no index", "feature:feature-19* AND environment:staging"),
    ]


def timed(action: Callable[[], object], runs: int) -> float | None:
    """Median milliseconds of `runs` after a warm-up; None when it runs past the timeout."""
    try:
        action()
    except SearchTimeoutError:
        return None
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        action()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def time_searches(
    engine: Engine, queries: list[tuple[str, str]], since: datetime, until: datetime, runs: int
) -> dict[str, tuple[float | None, int]]:
    found = {}
    for _, query in queries:
        where = compile_query(query, user_salt=SALT)

        def search(where: object = where) -> call_search.Page:
            return call_search.search(
                engine,
                where,  # type: ignore[arg-type]
                since=since,
                until=until,
                limit=50,
                timeout_seconds=TIMEOUT_SECONDS,
            )

        median = timed(search, runs)
        count = len(search().calls) if median is not None else -1
        found[query] = (median, count)
        print(f"  {_ms(median):>10}  {count:>3} rows  {query}", flush=True)
    return found


STATS = [
    ("", "model", timedelta(hours=1)),
    ("", "feature", timedelta(hours=1)),
    ("status:error", "error_type", timedelta(days=DAYS)),
    ("latency_ms:>2000", "model", timedelta(hours=24)),
]


def time_stats(engine: Engine, until: datetime, runs: int) -> dict[str, float | None]:
    found = {}
    for query, by, back in STATS:
        where = compile_query(query, user_salt=SALT)

        def read(where: object = where, by: str = by, back: timedelta = back) -> object:
            return call_search.stats(
                engine,
                where,  # type: ignore[arg-type]
                by=by,
                since=until - back,
                until=until,
                timeout_seconds=TIMEOUT_SECONDS,
            )

        label = _stats_label(query, by, back)
        found[label] = timed(read, runs)
        print(f"  {_ms(found[label]):>10}  {label}", flush=True)
    return found


def _stats_label(query: str, by: str, back: timedelta) -> str:
    span = f"{back.days}d" if back.days else f"{back.seconds // 3600}h"
    return f"stats '{query}' --by {by} --since {span}"


def ingest_records(count: int, seed: int, start: datetime) -> list[CallRecord]:
    """Calls as the ingest writes them, with the load's distributions, from `start` on."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        status = "success" if rng.random() < 0.99 else rng.choice(call_search.ERROR_STATUSES)
        latency = rng.lognormvariate(6.68, 0.8)
        records.append(
            CallRecord(
                ts=start + timedelta(milliseconds=i),
                model=rng.choice(MODELS),
                status=status,
                latency_ms=latency,
                ttft_ms=latency * 0.3,
                http_status=200 if status == "success" else 503,
                input_tokens=rng.randint(50, 4050),
                output_tokens=rng.randint(10, 810),
                cost_usd=0.001,
                feature=f"feature-{int(rng.random() ** 2 * FEATURES)}",
                team="team-1",
                environment="prod",
                session_id=f"sess_w{seed}_{i // 20}" if rng.random() < 0.5 else None,
                user_hash=hash_user_id(f"u{rng.randrange(USERS)}", SALT)
                if rng.random() < 0.6
                else None,
                error_type=None if status == "success" else "APIError",
                retry_count=1 if rng.random() < 0.01 else 0,
                request_id=f"req_{rng.getrandbits(128):032x}",
                trace_id=f"{rng.getrandbits(128):032x}" if rng.random() < 0.3 else None,
            )
        )
    return records


@dataclass(frozen=True)
class Ingest:
    calls_per_second: float
    wal_bytes_per_call: float  # steadier than the rate on a busy machine
    index_pages_per_call: float  # index buffers touched (hit or read)
    index_reads_per_call: float  # of which not in shared buffers


def _io(engine: Engine) -> tuple[str, int, int]:
    with engine.connect() as connection:
        lsn = str(connection.execute(text("SELECT pg_current_wal_lsn()")).scalar_one())
        hit, read = connection.execute(
            text(
                "SELECT coalesce(sum(idx_blks_hit), 0), coalesce(sum(idx_blks_read), 0) "
                "FROM pg_statio_user_indexes WHERE relname = 'llm_calls'"
            )
        ).one()
    return lsn, int(hit), int(read)


def ingest(engine: Engine, count: int, seed: int, start: datetime) -> Ingest:
    """The write path's rate (after the searched range, so that the searches are unchanged)."""
    records = ingest_records(count, seed, start)
    time.sleep(1)  # the statistics of what came before reach the views
    lsn, hits, reads = _io(engine)
    began = time.perf_counter()
    for first in range(0, count, 10_000):
        write_calls(engine, records[first : first + 10_000])
    elapsed = time.perf_counter() - began
    time.sleep(1)
    lsn_after, hits_after, reads_after = _io(engine)
    with engine.connect() as connection:
        wal = connection.execute(
            text("SELECT pg_wal_lsn_diff(:after, :before)"), {"after": lsn_after, "before": lsn}
        ).scalar_one()
    return Ingest(
        count / elapsed,
        float(wal) / count,
        (hits_after + reads_after - hits - reads) / count,
        (reads_after - reads) / count,
    )


def _ms(value: float | None) -> str:
    return f">{TIMEOUT_SECONDS:.0f} s" if value is None else f"{value:,.1f} ms"


def index_sizes(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
                "WHERE relname = 'llm_calls' ORDER BY indexrelname"
            )
        ).all()
    return [(str(name), int(size)) for name, size in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per search (median)")
    parser.add_argument("--ingest", type=int, default=1_000_000, help="calls written (ingest)")
    parser.add_argument(
        "--postgres",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a server where a throwaway database can be created",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()

    admin = make_url(args.postgres)
    name = f"pagerloop_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        run(engine, url, args)
    finally:
        engine.dispose()
        if args.keep:
            print(f"kept: {url}")
        else:
            with psycopg.connect(dsn(admin), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(engine: Engine, url: str, args: argparse.Namespace) -> None:
    schema.upgrade(engine, "0007")
    end = datetime.now(UTC)
    print(f"loading {args.rows:,} calls over {DAYS} days ...", flush=True)
    load_seconds = load(engine, args.rows, end)
    began = time.perf_counter()
    vacuum_analyze(url)
    vacuum_seconds = time.perf_counter() - began
    table_size = int(one(engine, "SELECT pg_table_size('llm_calls')"))
    queries = searches(engine, args.rows)
    since, until = end - timedelta(days=DAYS + 1), end + timedelta(minutes=1)

    print("without the search indexes (migration 0007):", flush=True)
    before = time_searches(engine, queries, since, until, args.runs)
    stats_before = time_stats(engine, end, args.runs)
    ingest_before = ingest(engine, args.ingest, 1, end + timedelta(hours=1))
    print(f"  ingest: {ingest_before}", flush=True)

    print("migration 0008: building the search indexes ...", flush=True)
    began = time.perf_counter()
    schema.upgrade(engine)
    build_seconds = time.perf_counter() - began
    with psycopg.connect(dsn(make_url(url)), autocommit=True) as conn:
        conn.execute("ANALYZE llm_calls")
    print(f"  built in {build_seconds:,.1f} s", flush=True)

    print("with the search indexes (migration 0008):", flush=True)
    after = time_searches(engine, queries, since, until, args.runs)
    stats_after = time_stats(engine, end, args.runs)
    ingest_after = ingest(engine, args.ingest, 2, end + timedelta(hours=2))
    print(f"  ingest: {ingest_after}", flush=True)

    sizes = index_sizes(engine)
    version = one(engine, "SHOW server_version")
    print()
    print(
        f"P9 call search on PostgreSQL {version} ({args.rows:,} calls over {DAYS} days, "
        f"table {table_size / 2**30:,.1f} GiB; loaded in {load_seconds:,.0f} s, "
        f"VACUUM ANALYZE {vacuum_seconds:,.0f} s): first page of 50, newest first, over the "
        f"whole {DAYS} days; median of {args.runs} runs after a warm-up\n"
    )
    print(f"| kind | query | rows | without 0008 | with 0008 | target {TARGET_MS:.0f} ms |")
    print("|---|---|---|---|---|---|")
    for kind, query in queries:
        (without, count), (with_, _) = before[query], after[query]
        verdict = "met" if with_ is not None and with_ <= TARGET_MS else "**NOT met**"
        print(f"| {kind} | `{query}` | {count} | {_ms(without)} | {_ms(with_)} | {verdict} |")
    print()
    print("| stats | without 0008 | with 0008 |")
    print("|---|---|---|")
    for label in stats_before:
        print(f"| `{label}` | {_ms(stats_before[label])} | {_ms(stats_after[label])} |")
    print()
    print(
        f"| ingest (stores.writer.write_calls, {args.ingest:,} calls, batches of 10,000) "
        "| without 0008 | with 0008 | change |"
    )
    print("|---|---|---|---|")
    for label, attribute, form in (
        ("calls/s", "calls_per_second", "{:,.0f}"),
        ("WAL bytes per call", "wal_bytes_per_call", "{:,.0f}"),
        ("index pages touched per call", "index_pages_per_call", "{:,.1f}"),
        ("of which read (not in shared buffers)", "index_reads_per_call", "{:,.2f}"),
    ):
        was, now = getattr(ingest_before, attribute), getattr(ingest_after, attribute)
        change = f"{(now / was - 1) * 100:+.0f} %" if was else "-"
        print(f"| {label} | {form.format(was)} | {form.format(now)} | {change} |")
    print()
    print(f"migration 0008 built its indexes on {args.rows:,} rows in {build_seconds:,.1f} s")
    print("index sizes: " + ", ".join(f"{n} {s / 2**20:,.0f} MiB" for n, s in sizes))


if __name__ == "__main__":
    main()
